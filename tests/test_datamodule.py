"""FusionDataModule end to end: tiny shards in, Batches out; mixture, empty sources, rank/worker splits."""

from __future__ import annotations

import json
import logging
import re
import tarfile
from itertools import islice

import pytest
import torch
from jsonargparse import ArgumentParser

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX, Batch
from fusionlab.data.datamodule import FusionDataModule, Source, expand_shards
from fusionlab.data.errors import StrictDataError
from fusionlab.data.tokenizer import ByteTokenizer
from test_formats import png, truncated_copy, write_tar

GEOMETRY = dict(image_size=16, patch_size=8, context=64, batch_size=4, shuffle_buffer=8)


def caption_shard(path, keys):
    members = []
    for i, key in enumerate(keys):
        members += [(f"{key}.png", png((20 * i % 256, 90, 160))), (f"{key}.txt", f"sample {key}.")]
    return write_tar(path, members)


def interleaved_shard(path, keys):
    members = []
    for key in keys:
        document = {"texts": [f"sample {key}.", None, "then", None], "images": [None, "img0.png", None, "img1.png"]}
        members += [(f"{key}.img0.png", png((250, 0, 0))), (f"{key}.img1.png", png((0, 0, 250))),
                    (f"{key}.json", json.dumps(document))]
    return write_tar(path, members)


def text_shard(path, keys, body=""):
    return write_tar(path, [(f"{key}.txt", f"sample {key}.{body}") for key in keys])


def empty_shard(path):
    with tarfile.open(path, "w"):
        pass
    return str(path)


def sample_keys(batch: Batch) -> list[str]:
    tok = ByteTokenizer()
    return [key for row in batch.tokens.tolist() for key in re.findall(r"sample (\w+)\.", tok.decode(row))]


def check_batch(batch: Batch, dm: FusionDataModule) -> None:
    B, T = batch.tokens.shape
    assert B <= dm.batch_size
    assert T == dm.context
    n_images = batch.images.shape[0]
    assert batch.images.shape[1:] == (3, dm.image_size, dm.image_size)
    assert batch.images.dtype == torch.uint8
    assert sorted(batch.image_index[batch.image_index >= 0].unique().tolist()) == list(range(n_images))
    assert int((batch.image_index >= 0).sum()) == n_images * dm.tokens_per_image
    assert ((batch.tokens == dm.tokenizer.image_id) == (batch.image_index >= 0)).all()
    has_target = batch.targets != IGNORE_INDEX
    assert not has_target[:, -1].any()
    same_document = batch.document[:, 1:] == batch.document[:, :-1]
    assert (batch.targets[:, :-1][has_target[:, :-1]] == batch.tokens[:, 1:][has_target[:, :-1]]).all()
    assert same_document[has_target[:, :-1]].all()
    assert ((batch.source >= 0) == (batch.document >= 0)).all()
    assert batch.stats["positions"] == B * T


@pytest.fixture
def three_types(tmp_path):
    caption = [caption_shard(tmp_path / f"cap-{s}.tar", [f"c{s}x{i}" for i in range(4)]) for s in range(2)]
    interleaved_shard(tmp_path / "il-0.tar", [f"i{i}" for i in range(3)])
    text_shard(tmp_path / "txt-0.tar", [f"t{i}" for i in range(5)], body=" More words follow here.")
    return [
        Source(str(tmp_path / "cap-{0..1}.tar"), "caption"),
        Source(str(tmp_path / "il-*.tar"), "interleaved"),
        Source(str(tmp_path / "txt-0.tar"), "text", weight=0.5),
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_end_to_end_batches(three_types, num_workers):
    dm = FusionDataModule(three_types, three_types, num_workers=num_workers, **GEOMETRY)
    assert dm.vocab_size == 264
    assert dm.tokens_per_image == 4
    assert isinstance(dm.tokenizer, ByteTokenizer)
    dm.setup("fit")
    sources = set()
    for batch in islice(dm.train_dataloader(), 6):
        assert batch.tokens.shape == (4, 64)
        check_batch(batch, dm)
        sources.update(batch.source.unique().tolist())
    assert {DATA_TYPES.index(name) for name in ("caption", "interleaved", "text")} <= sources


@pytest.mark.parametrize(("n_shards", "world_size", "num_workers"), [(1, 2, 2), (3, 2, 1), (5, 2, 2), (2, 1, 1)])
def test_validation_reads_each_sample_once(tmp_path, monkeypatch, n_shards, world_size, num_workers):
    keys = []
    for s in range(n_shards):
        keys += [f"c{s}x{i}" for i in range(4)]
        caption_shard(tmp_path / f"cap-{s}.tar", keys[-4:])
    text_shard(tmp_path / "txt.tar", ["t0", "t1", "t2"])
    keys += ["t0", "t1", "t2"]
    val = [Source(str(tmp_path / "cap-*.tar"), "caption"), Source(str(tmp_path / "txt.tar"), "text")]
    seen = []
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        dm = FusionDataModule(val, val, num_workers=num_workers, **GEOMETRY)
        dm.setup("validate")
        rank_keys = []
        for batch in dm.val_dataloader():
            check_batch(batch, dm)
            rank_keys += sample_keys(batch)
        assert rank_keys, f"rank {rank} read nothing"
        seen += rank_keys
    assert sorted(seen) == sorted(keys)


def test_finite_training_epoch_once(tmp_path):
    keys = [f"c{s}x{i}" for s in range(3) for i in range(4)]
    for s in range(3):
        caption_shard(tmp_path / f"cap-{s}.tar", keys[4 * s : 4 * s + 4])
    dm = FusionDataModule([Source(str(tmp_path / "cap-*.tar"), "caption")], resample=False, num_workers=2, **GEOMETRY)
    loader = dm.train_dataloader()
    first = [key for batch in loader for key in sample_keys(batch)]
    second = [key for batch in loader for key in sample_keys(batch)]
    assert sorted(first) == sorted(keys)
    assert sorted(second) == sorted(keys)
    assert first != second  # each epoch shuffles anew


def test_empty_source_warned_and_renormalised(tmp_path, caplog):
    caption_shard(tmp_path / "cap.tar", ["a", "b", "c"])
    empty_shard(tmp_path / "il.tar")
    text_shard(tmp_path / "txt.tar", ["t"])
    sources = [Source(str(tmp_path / "cap.tar"), "caption"), Source(str(tmp_path / "il.tar"), "interleaved"),
               Source(str(tmp_path / "txt.tar"), "text")]
    dm = FusionDataModule(sources, **GEOMETRY)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        batches = list(islice(dm.train_dataloader(), 3))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "il.tar" in warnings[0]
    assert "renormalised" in warnings[0]
    used = torch.cat([batch.source.flatten() for batch in batches]).unique().tolist()
    assert DATA_TYPES.index("interleaved") not in used
    assert DATA_TYPES.index("caption") in used
    assert DATA_TYPES.index("text") in used


def test_all_sources_empty_raises(tmp_path):
    sources = [Source(empty_shard(tmp_path / f"{t}.tar"), t) for t in DATA_TYPES]
    dm = FusionDataModule(sources, **GEOMETRY)
    with pytest.raises(ValueError, match="every train source is empty"):
        dm.setup("fit")


def test_unusable_source_dropped_at_run_time(tmp_path, caplog):
    bad = write_tar(tmp_path / "bad.tar", [("a.png", png()), ("a.txt", " "), ("b.png", png()), ("b.txt", "")])
    text_shard(tmp_path / "txt.tar", ["t0", "t1"])
    dm = FusionDataModule([Source(bad, "caption"), Source(str(tmp_path / "txt.tar"), "text")], **GEOMETRY)
    with caplog.at_level(logging.WARNING):
        batches = list(islice(dm.train_dataloader(), 2))
    assert "produced no usable sample" in caplog.text
    assert all(batch.source.max() == DATA_TYPES.index("text") for batch in batches)
    assert sum(batch.stats.get("skipped/empty_text", 0) for batch in batches) == 2

    alone = FusionDataModule([Source(bad, "caption")], **GEOMETRY)
    with pytest.raises(RuntimeError, match="every training source stopped"):
        next(iter(alone.train_dataloader()))


def test_mixture_follows_weights(tmp_path):
    text_shard(tmp_path / "a.tar", [f"a{i}" for i in range(40)])
    text_shard(tmp_path / "b.tar", [f"b{i}" for i in range(40)])
    sources = [Source(str(tmp_path / "a.tar"), "text", weight=3.0), Source(str(tmp_path / "b.tar"), "text")]
    settings = {**GEOMETRY, "context": 100, "batch_size": 8}

    def first_keys(seed, n_batches=8):
        dm = FusionDataModule(sources, seed=seed, **settings)
        return [key for batch in islice(dm.train_dataloader(), n_batches) for key in sample_keys(batch)]

    keys = first_keys(seed=0)
    share_a = sum(key.startswith("a") for key in keys) / len(keys)
    assert len(keys) > 400
    assert abs(share_a - 0.75) < 0.08
    assert first_keys(seed=0, n_batches=1) == keys[: len(first_keys(seed=0, n_batches=1))]
    assert first_keys(seed=1, n_batches=1) != first_keys(seed=0, n_batches=1)


def test_mixture_of_many_sources(tmp_path):
    weights = {"a": 4.0, "b": 2.0, "c": 1.0, "d": 1.0}
    sources = []
    for name, weight in weights.items():
        text_shard(tmp_path / f"{name}.tar", [f"{name}{i}" for i in range(30)])
        sources.append(Source(str(tmp_path / f"{name}.tar"), "text", weight=weight))
    dm = FusionDataModule(sources, **{**GEOMETRY, "context": 100, "batch_size": 8})
    keys = [key for batch in islice(dm.train_dataloader(), 8) for key in sample_keys(batch)]
    assert len(keys) > 400
    for name, weight in weights.items():
        share = sum(key.startswith(name) for key in keys) / len(keys)
        assert abs(share - weight / sum(weights.values())) < 0.07, name


def test_skip_counts_reach_batches_once(tmp_path):
    members = [("a.png", png()), ("a.txt", "sample a."), ("b.png", png()), ("b.txt", ""),
               ("c.png", b""), ("c.txt", "sample c."), ("d.png", png()), ("d.txt", "sample d.")]
    val = [Source(write_tar(tmp_path / "v.tar", members), "caption")]
    dm = FusionDataModule(val, val, **GEOMETRY)
    batches = list(dm.val_dataloader())
    total = {}
    for batch in batches:
        for key, value in batch.stats.items():
            total[key] = total.get(key, 0) + value
    assert total["skipped/empty_text"] == 1
    assert total["skipped/empty_member"] == 1
    assert sorted(k for batch in batches for k in sample_keys(batch)) == ["a", "d"]


def test_damaged_shard_in_workers(tmp_path):
    full = caption_shard(tmp_path / "full.tar", [f"a{i}" for i in range(5)])
    truncated_copy(full, "a2.png", 100, tmp_path / "v-0.tar")
    caption_shard(tmp_path / "v-1.tar", ["b0", "b1", "b2"])
    val = [Source(str(tmp_path / "v-*.tar"), "caption")]
    dm = FusionDataModule(val, val, num_workers=2, **GEOMETRY)
    batches = list(dm.val_dataloader())
    assert sorted(k for batch in batches for k in sample_keys(batch)) == ["a0", "a1", "b0", "b1", "b2"]
    assert sum(batch.stats.get("skipped/damaged_shard", 0) for batch in batches) == 1


def test_strict_mode_raises_from_loader(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", png()), ("a.txt", "")])
    dm = FusionDataModule([Source(shard, "caption")], strict=True, **GEOMETRY)
    with pytest.raises(StrictDataError, match="s.tar"):
        next(iter(dm.train_dataloader()))


def test_train_and_val_convert_identically(tmp_path):
    shard = caption_shard(tmp_path / "one.tar", ["only"])
    dm = FusionDataModule([Source(shard, "caption")], [Source(shard, "caption")], **GEOMETRY)
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(train.images[0], val.images[0])


def test_resample_false_on_many_ranks_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = FusionDataModule([Source(caption_shard(tmp_path / "c.tar", ["a"]), "caption")], resample=False, **GEOMETRY)
    with pytest.raises(ValueError, match="resample=True"):
        dm.train_dataloader()


def test_expand_shards_patterns(tmp_path):
    for i in range(3):
        text_shard(tmp_path / f"s-{i}.tar", [f"k{i}"])
    assert len(expand_shards(str(tmp_path / "s-{0..2}.tar"))) == 3
    assert len(expand_shards(str(tmp_path / "s-*.tar"))) == 3
    assert len(expand_shards(str(tmp_path))) == 3
    assert len(expand_shards(f"{tmp_path}/s-0.tar::file://{tmp_path}/s-1.tar")) == 2
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="s-3.tar"):
        expand_shards(str(tmp_path / "s-{0..7}.tar"))


def test_pipe_url_reads_shard(tmp_path):
    shard = caption_shard(tmp_path / "c.tar", ["p0", "p1"])
    val = [Source(f"pipe:cat {shard}", "caption")]
    dm = FusionDataModule(val, val, **GEOMETRY)
    assert sorted(k for batch in dm.val_dataloader() for k in sample_keys(batch)) == ["p0", "p1"]


def test_sources_parse_from_config(tmp_path):
    shard = caption_shard(tmp_path / "c.tar", ["a"])
    parser = ArgumentParser()
    parser.add_class_arguments(FusionDataModule, "data")
    config = {"data": {"train": [{"urls": shard, "type": "caption", "weight": 2}], "val": [],
                       "image_size": 16, "patch_size": 8, "context": 64, "batch_size": 2}}
    parsed = parser.parse_object(config)
    dm = parser.instantiate(parsed).data
    assert dm.train_sources == [Source(shard, "caption", 2.0)]
    with pytest.raises(ValueError, match="video"):
        Source(shard, "video")
    with pytest.raises(ValueError, match="weight"):
        Source(shard, "text", weight=0)
