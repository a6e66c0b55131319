"""Stream positions: a loader resumed from the position of any batch continues with the next one.

Unit-level counterpart of test_resume.py, without Lightning: the position tagged on batch k is
given to a new DataModule through load_state_dict, as a resumed run would, and the new loader
must yield exactly batches k+1, k+2, ... of the uninterrupted pass, whatever the worker count and
however unevenly the workers' streams run out.
"""

from __future__ import annotations

from itertools import islice

import pytest

from fusionlab.data.datamodule import FusionDataModule, Source
from fusionlab.data.loader import StreamPosition
from fusionlab.data.streams import split_shards
from test_datamodule import caption_shard, sample_keys, text_shard

GEOMETRY = dict(image_size=8, patch_size=4, context=40, batch_size=2, shuffle_buffer=4, seed=3)
MAX_BATCHES = 14


@pytest.fixture
def uneven_sources(tmp_path) -> list[Source]:
    sizes = [9, 2, 5]  # shards of very different lengths: workers run out at different batches
    for s, n in enumerate(sizes):
        text_shard(tmp_path / f"t-{s}.tar", [f"t{s}x{i}" for i in range(n)], body=" A few more words.")
    caption_shard(tmp_path / "c-0.tar", [f"c{i}" for i in range(4)])
    return [Source(str(tmp_path / "t-{0..2}.tar"), "text", weight=2.0), Source(str(tmp_path / "c-0.tar"), "caption")]


def one_pass(dm: FusionDataModule) -> list[tuple[StreamPosition, list[str]]]:
    out = []
    for batch in islice(dm.train_dataloader(), MAX_BATCHES):
        position = StreamPosition.pop_from(batch.stats)
        out.append((position, sample_keys(batch)))
    return out


@pytest.mark.parametrize(("num_workers", "resample"), [(0, False), (2, False), (3, False), (2, True)])
def test_resume_from_any_batch(uneven_sources, num_workers, resample):
    settings = dict(num_workers=num_workers, resample=resample, **GEOMETRY)
    reference = one_pass(FusionDataModule(uneven_sources, **settings))
    assert len(reference) >= 5
    assert [position.batches for position, _ in reference] == list(range(1, len(reference) + 1))
    for cut in sorted({1, 2, len(reference) // 2, len(reference) - 1}):
        dm = FusionDataModule(uneven_sources, **settings)
        dm.load_state_dict({"seed": GEOMETRY["seed"], "world_size": 1, "n_streams": max(1, num_workers),
                            "positions": [reference[cut - 1][0].as_dict()]})
        rest = one_pass(dm)[: len(reference) - cut]
        assert [keys for _, keys in rest] == [keys for _, keys in reference[cut:]], f"resumed after batch {cut}"
        assert [position for position, _ in rest] == [position for position, _ in reference[cut:]]


def test_mismatched_checkpoint_restarts_epoch(uneven_sources, caplog):
    reference = one_pass(FusionDataModule(uneven_sources, num_workers=0, **GEOMETRY))
    dm = FusionDataModule(uneven_sources, num_workers=2, **GEOMETRY)
    dm.load_state_dict({"seed": GEOMETRY["seed"], "world_size": 1, "n_streams": 1,
                        "positions": [reference[2][0].as_dict()]})
    assert "restarts at the beginning" in caplog.text
    assert one_pass(dm)[0][0].batches == 1


def test_zero_and_one_worker_read_the_same_stream(uneven_sources):
    in_process = one_pass(FusionDataModule(uneven_sources, num_workers=0, **GEOMETRY))
    one_worker = one_pass(FusionDataModule(uneven_sources, num_workers=1, **GEOMETRY))
    assert [keys for _, keys in in_process] == [keys for _, keys in one_worker]


@pytest.mark.parametrize(("n_shards", "n_readers"), [(1, 4), (3, 2), (4, 2), (5, 2), (7, 3)])
def test_split_shards_balanced_and_disjoint(n_shards, n_readers):
    shards = [f"s{i}" for i in range(n_shards)]
    splits = [split_shards(shards, reader, n_readers) for reader in range(n_readers)]
    whole = [shard for own, _ in splits for shard in own]
    shared = splits[0][1]
    assert sorted(whole + shared) == shards
    assert len(set(whole)) == len(whole)
    assert len(shared) == n_shards % n_readers
    assert all(other == shared for _, other in splits)
    assert len({len(own) for own, _ in splits}) == 1  # every reader gets as many whole shards
