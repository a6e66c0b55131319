"""Splitting across ranks and DataLoader workers, with 2 CPU processes over gloo.

Without resampling, one epoch yields every sample exactly once over all ranks and workers. Every
rank runs the same number of steps: a rank whose share is short trains on no-loss padding batches,
so that no rank waits forever in a collective. Each rank is a child process: this file run as a
script (see `child_main`), which writes the keys of every batch per epoch to a JSON file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_datamodule import caption_shard, sample_keys, text_shard

CHILD_TIMEOUT_S = 120
RANKS = 2


def child_main(config_path: str) -> None:
    import torch
    from torch import distributed as dist

    from fusionlab.batch import IGNORE_INDEX
    from fusionlab.data.datamodule import FusionDataModule, Source

    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = []
    for case in config["cases"]:
        dm = FusionDataModule(
            [Source(**source) for source in case["sources"]], image_size=8, patch_size=4, context=32,
            batch_size=2, num_workers=case["num_workers"], resample=case["resample"],
            batches_per_epoch=case.get("batches_per_epoch"), shuffle_buffer=4,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        epochs = []
        for _ in range(2):
            steps = []
            for batch in loader:
                has_loss = bool((batch.targets != IGNORE_INDEX).any())
                steps.append({"keys": sample_keys(batch), "has_loss": has_loss})
            epochs.append(steps)
        results.append(epochs)
    dist.barrier()
    Path(config["out"]).with_suffix(f".rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, cases: list[dict]) -> list[list]:
    """Run every case on RANKS processes; return results[rank][case][epoch][step]."""
    config_path = tmp_path / "config.json"
    out = tmp_path / "result.json"
    config_path.write_text(json.dumps({"cases": cases, "out": str(out)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(RANKS)}
    children = [
        subprocess.Popen([sys.executable, __file__, str(config_path)], env=env | {"RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        for rank in range(RANKS)
    ]
    for child in children:
        try:
            output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in children:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"ranks ran past {CHILD_TIMEOUT_S} s: a rank is waiting for the other")
        assert child.returncode == 0, output.decode(errors="replace")[-4000:]
    return [json.loads(out.with_suffix(f".rank{rank}.json").read_text()) for rank in range(RANKS)]


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory) -> tuple[list[list], list[list[str]]]:
    """One launch of both ranks for every case: (results[rank][case][epoch][step], expected keys per case)."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    four = caption_shard(tmp_path / "four.tar", [f"a{i}" for i in range(4)])
    for s in range(3):
        caption_shard(tmp_path / f"three-{s}.tar", [f"b{s}x{i}" for i in range(4)])
    for s in range(2):
        text_shard(tmp_path / f"txt-{s}.tar", [f"t{s}x{i}" for i in range(7)])
    five = caption_shard(tmp_path / "five.tar", [f"f{i}" for i in range(5)])
    one_shard = [{"urls": four, "type": "caption"}]
    three_shards = [{"urls": str(tmp_path / "three-{0..2}.tar"), "type": "caption"}]
    mixed = three_shards + [{"urls": str(tmp_path / "txt-{0..1}.tar"), "type": "text"}]
    cases = [
        {"sources": one_shard, "num_workers": 2, "resample": False},  # 1 shard, 2 ranks x 2 workers
        {"sources": three_shards, "num_workers": 0, "resample": False},  # 3 shards, 2 ranks
        {"sources": three_shards, "num_workers": 2, "resample": False},
        {"sources": mixed, "num_workers": 2, "resample": False},
        {"sources": [{"urls": five, "type": "caption"}], "num_workers": 0, "resample": False},  # 3 + 2 rows
        {"sources": one_shard, "num_workers": 2, "resample": True, "batches_per_epoch": 3},
    ]
    three = [f"b{s}x{i}" for s in range(3) for i in range(4)]
    expected = [[f"a{i}" for i in range(4)], three, three, three + [f"t{s}x{i}" for s in range(2) for i in range(7)],
                [f"f{i}" for i in range(5)]]
    return run_ranks(tmp_path, cases), expected


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_epoch_covers_every_sample_once(split_runs, case):
    results, expected = split_runs
    for epoch in range(2):
        per_rank = [results[rank][case][epoch] for rank in range(RANKS)]
        assert len(per_rank[0]) == len(per_rank[1]), "ranks ran different numbers of steps"
        seen = [[key for step in steps for key in step["keys"]] for steps in per_rank]
        assert not set(seen[0]) & set(seen[1]), "ranks share samples"
        assert sorted(seen[0] + seen[1]) == sorted(expected[case])
        for steps in per_rank:
            # padding batches come only after a rank's own data has run out
            has_loss = [step["has_loss"] for step in steps]
            assert has_loss == sorted(has_loss, reverse=True)
            assert all(step["has_loss"] == bool(step["keys"]) for step in steps)


def test_leftover_shard_split_by_sample(split_runs):
    results, _ = split_runs
    # 3 shards on 2 ranks: one whole shard each, the third shared sample by sample: 6 samples each.
    for rank in range(RANKS):
        assert len([key for step in results[rank][1][0] for key in step["keys"]]) == 6


def test_resampled_epochs_have_equal_length(split_runs):
    results, _ = split_runs
    for rank in range(RANKS):
        assert [len(steps) for steps in results[rank][5]] == [3, 3]
        assert all(step["has_loss"] for steps in results[rank][5] for step in steps)


def test_short_rank_padded(split_runs):
    results, _ = split_runs
    # 5 one-row samples on 2 ranks: 3 rows (2 batches) and 2 rows (1 batch, then 1 padding batch).
    assert [[step["has_loss"] for step in results[rank][4][0]] for rank in range(RANKS)] == [[True, True], [True, False]]


if __name__ == "__main__":
    child_main(sys.argv[1])
