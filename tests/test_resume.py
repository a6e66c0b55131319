"""Exact resume: a run killed with SIGKILL and resumed from its last checkpoint trains the same
batches in the same order, and ends with the same weights, as a run that was never interrupted.

Each training run is a child process: this file run as a script (see `child_main`). Children
record the sample keys of every trained batch, per rank, and kill themselves with SIGKILL at the
start of a chosen step, so the kill lands at a known step with no timing involved.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

# A child that runs longer than this is killed and the test fails, so a hang cannot stall CI.
CHILD_TIMEOUT_S = 180
MAX_STEPS = 8


# ---------------------------------------------------------------------------------------------
# the child: one training run (one rank of it)


def child_main(config_path: str) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fusionlab.data.datamodule import FusionDataModule, Source
    from fusionlab.models import EarlyFusion
    from fusionlab.training.module import FusionModule

    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    if config.get("kill_during_save_at") is not None:
        _kill_during_file_write(config["kill_during_save_at"])
    L.seed_everything(0, verbose=False)
    sources = [Source(**source) for source in config["sources"]]
    dm = FusionDataModule(
        sources, image_size=8, patch_size=4, context=config.get("context", 48), batch_size=2,
        num_workers=config["num_workers"], seed=0, shuffle_buffer=config.get("shuffle_buffer", 4),
        resample=config["resample"], batches_per_epoch=config.get("batches_per_epoch"),
    )
    backbone = EarlyFusion(vocab_size=dm.vocab_size, image_size=8, patch_size=4, d_model=16, n_layers=1,
                           n_heads=2, ffn_multiple_of=16)
    module = FusionModule(backbone, lr=1e-2, warmup_steps=1, shuffled_image_eval=False)
    ranks = config.get("ranks", 1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy="ddp" if ranks > 1 else "auto",
        max_steps=config.get("max_steps", MAX_STEPS),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[
            ModelCheckpoint(dirpath=config["checkpoints"], every_n_train_steps=config.get("every", 2),
                            save_top_k=-1, save_last=True),
            _Recorder(Path(config["keys"]), config.get("kill_at")),
        ],
    )
    trainer.fit(module, datamodule=dm, ckpt_path="last" if config["resume"] else None)
    if trainer.is_global_zero:
        torch.save(module.backbone.state_dict(), config["weights"])


def _batch_keys(batch) -> list[str]:
    from fusionlab.data.tokenizer import ByteTokenizer

    text = [ByteTokenizer().decode(row) for row in batch.tokens.tolist()]
    return [key for row in text for key in re.findall(r"sample (\w+)\.", row)]


class _Recorder(Callback):
    """Append "step rank keys..." per trained batch, and SIGKILL the process at step `kill_at`."""

    def __init__(self, path: Path, kill_at: int | None) -> None:
        self.path = path
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(self.path, "a") as out:
            out.write(" ".join([str(trainer.global_step), str(trainer.global_rank), *_batch_keys(batch)]) + "\n")


def _kill_during_file_write(save_number: int) -> None:
    """SIGKILL this process halfway through writing the `save_number`-th checkpoint file."""
    from fsspec.implementations.local import LocalFileOpener

    write = LocalFileOpener.write
    saves = {"n": 0}

    def write_half_then_die(self, data):
        saves["n"] += 1
        if saves["n"] == save_number:
            write(self, data[: len(data) // 2])
            self.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, data)

    LocalFileOpener.write = write_half_then_die


# ---------------------------------------------------------------------------------------------
# the parent: shards, runs, comparisons


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[dict]]:
    from test_datamodule import caption_shard, text_shard

    root = tmp_path_factory.mktemp("resume-shards")
    for s in range(2):
        caption_shard(root / f"cap-{s}.tar", [f"c{s}x{i}" for i in range(6)])
    for s in range(3):
        text_shard(root / f"txt-{s}.tar", [f"t{s}x{i}" for i in range(5)], body=" Some more words.")
    mixed = [
        {"urls": str(root / "cap-{0..1}.tar"), "type": "caption", "weight": 0.5},
        {"urls": str(root / "txt-{0..2}.tar"), "type": "text", "weight": 0.5},
    ]
    return {"mixed": mixed}


def run(tmp_path: Path, name: str, ranks: int = 1, **config) -> Path:
    """Run one child training run (all its ranks) and return its folder; fails on a hang."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    config = {
        "checkpoints": str(tmp_path / name.split("-")[0] / "checkpoints"),
        "keys": str(folder / "keys.txt"),
        "weights": str(folder / "weights.pt"),
        "ranks": ranks,
        "resume": False,
        **config,
    }
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TMPDIR": str(folder)}
    if ranks > 1:
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(ranks), "NODE_RANK": "0"}
    children = []
    for rank in range(ranks):
        rank_env = env | ({"RANK": str(rank), "LOCAL_RANK": str(rank)} if ranks > 1 else {})
        children.append(subprocess.Popen(
            [sys.executable, __file__, str(config_path)], env=rank_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    outputs = []
    for child in children:
        try:
            out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in children:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"training child {name} ran past {CHILD_TIMEOUT_S} s")
        outputs.append((child.returncode, out.decode(errors="replace")))
    expected = -signal.SIGKILL if config.get("kill_at") is not None or config.get("kill_during_save_at") else 0
    for code, out in outputs:
        assert code == expected, f"child {name} exited with {code}, expected {expected}:\n{out[-4000:]}"
    return folder


def trained_keys(folder: Path) -> dict[tuple[int, int], list[str]]:
    """{(step, rank): keys of the batch trained at that step}."""
    steps = {}
    for line in (folder / "keys.txt").read_text().splitlines():
        step, rank, *keys = line.split()
        steps[(int(step), int(rank))] = keys
    return steps


def max_weight_difference(a: Path, b: Path) -> float:
    first = torch.load(a / "weights.pt", weights_only=True)
    second = torch.load(b / "weights.pt", weights_only=True)
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    """Uninterrupted reference runs, one per configuration, shared by the tests of this module."""
    folders = {}

    def get(num_workers: int, resample: bool, ranks: int = 1, batches_per_epoch: int | None = None) -> Path:
        config = (num_workers, resample, ranks, batches_per_epoch)
        if config not in folders:
            tmp_path = tmp_path_factory.mktemp("whole")
            folders[config] = run(tmp_path, "whole", sources=shards["mixed"], num_workers=num_workers,
                                  resample=resample, ranks=ranks, batches_per_epoch=batches_per_epoch)
        return folders[config]

    return get


@pytest.mark.parametrize(
    ("num_workers", "resample", "ranks", "batches_per_epoch"),
    [(0, True, 1, 3), (2, True, 1, None), (2, False, 1, None), (1, False, 2, None)],
)
def test_killed_run_resumes_exactly(tmp_path, shards, uninterrupted, num_workers, resample, ranks, batches_per_epoch):
    # With 3 batches per epoch, the checkpoint of step 4 and the kill at step 5 fall in epoch 1.
    common = dict(sources=shards["mixed"], num_workers=num_workers, resample=resample, ranks=ranks,
                  batches_per_epoch=batches_per_epoch)
    whole = uninterrupted(num_workers, resample, ranks, batches_per_epoch)
    run(tmp_path, "cut-killed", kill_at=5, **common)  # the last checkpoint is the one of step 4
    resumed = run(tmp_path, "cut-resumed", resume=True, **common)

    reference = trained_keys(whole)
    assert sorted(reference) == [(step, rank) for step in range(MAX_STEPS) for rank in range(ranks)]
    assert sum(len(keys) for keys in reference.values()) > 2 * MAX_STEPS * ranks
    killed = trained_keys(tmp_path / "cut-killed")
    assert max(step for step, _ in killed) == 4
    assert {k: v for k, v in reference.items() if k[0] <= 4} == killed
    after = trained_keys(resumed)
    assert min(step for step, _ in after) == 4
    assert {k: v for k, v in reference.items() if k[0] >= 4} == after
    assert max_weight_difference(whole, resumed) <= 1e-6

    # Only rank 0 writes the checkpoint: it must hold the position of every rank, after step 4.
    (step_4,) = (tmp_path / "cut" / "checkpoints").glob("*step=4.ckpt")
    checkpoint = torch.load(step_4, weights_only=True)
    positions = checkpoint["FusionDataModule"]["positions"]
    assert len(positions) == ranks
    epoch, batches = divmod(4, batches_per_epoch) if batches_per_epoch else (0, 4)
    assert [(position["epoch"], position["batches"]) for position in positions] == [(epoch, batches)] * ranks


class _PositionProbe(Callback):
    """At each checkpoint: the batches trained, what the loader has handed out, and what is stored."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        handed_out = trainer.train_dataloader.position.batches
        stored = trainer.datamodule.state_dict()["positions"][0]["batches"]
        self.seen.append((trainer.global_step, handed_out, stored))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checkpoint_stores_trained_not_fetched_position(tmp_path, shards, num_workers):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fusionlab.data.datamodule import FusionDataModule, Source
    from fusionlab.models import EarlyFusion
    from fusionlab.training.module import FusionModule

    dm = FusionDataModule([Source(**source) for source in shards["mixed"]], image_size=8, patch_size=4, context=48,
                          batch_size=2, num_workers=num_workers)
    backbone = EarlyFusion(vocab_size=dm.vocab_size, image_size=8, patch_size=4, d_model=16, n_layers=1, n_heads=2,
                           ffn_multiple_of=16)
    probe = _PositionProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=False), probe])
    trainer.fit(FusionModule(backbone, warmup_steps=1, shuffled_image_eval=False), datamodule=dm)
    # Lightning's fetcher has pulled batch 4 when the checkpoint after step 3 is written.
    assert probe.seen == [(3, 4, 3)]


def test_fixed_order_resume_sees_next_keys(tmp_path):
    from test_datamodule import text_shard

    # 16 text samples k00..k15, each exactly one packed row of 32 positions: bos + 30 bytes + eos.
    keys = [f"k{i:02d}" for i in range(16)]
    shard = text_shard(tmp_path / "k.tar", keys, body=" " + "x" * 18)
    common = dict(sources=[{"urls": shard, "type": "text"}], num_workers=0, resample=False, shuffle_buffer=0,
                  context=32, every=3)
    run(tmp_path, "run-first", max_steps=3, **common)
    second = run(tmp_path, "run-second", max_steps=6, resume=True, **common)
    seen = [key for (_, _), batch in sorted(trained_keys(second).items()) for key in batch]
    assert seen == keys[6:12]


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, shards, uninterrupted):
    common = dict(sources=shards["mixed"], num_workers=0, resample=True, batches_per_epoch=3)
    whole = uninterrupted(0, True, 1, 3)
    # Checkpoint files are written at steps 2 (step=2 and last) and 4 (step=4, then last): the
    # 4th write is last.ckpt of step 4, so the previous last.ckpt (step 2) must survive the kill.
    run(tmp_path, "cut-killed", kill_during_save_at=4, **common)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2
    (step_4,) = last.parent.glob("*step=4.ckpt")
    assert torch.load(step_4, weights_only=True)["global_step"] == 4
    resumed = run(tmp_path, "cut-resumed", resume=True, **common)
    after = trained_keys(resumed)
    reference = trained_keys(whole)
    first = min(step for step, _ in after)
    assert first == checkpoint["global_step"]
    assert {k: v for k, v in reference.items() if k[0] >= first} == after
    assert max_weight_difference(whole, resumed) <= 1e-6


if __name__ == "__main__":
    child_main(sys.argv[1])
