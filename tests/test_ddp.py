"""Training across processes: the tiny recipe under DDP over gloo with 2 CPU processes, and the
cluster files of docs/cluster (strategy overlays, the SLURM batch script).

The DDP run goes through the real command line (`python -m fusionlab.cli fit`), which makes
Lightning start the second rank as a subprocess. A callback in this module, loaded by the ranks from
the recipe, saves the batches each rank trained on and its weights. The single-process run that it is
compared with trains the same initial weights on those batches, each global batch being rank 0's
rows followed by rank 1's. It cannot use the streaming loader, which would read other samples in a
single process, because each rank seeds its shard draws, shuffles and mixture with its own rank.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader

from conftest import tiny_recipe, write_recipe
from fusionlab.batch import TENSOR_FIELDS, Batch
from fusionlab.models import EarlyFusion
from fusionlab.models.decoder import Block
from fusionlab.training.cli import run_lightning_cli
from fusionlab.training.module import FusionModule

TESTS = Path(__file__).parent
STEPS = 6
DDP_TIMEOUT_S = 180  # the run takes 15-40 s on 2 busy cores; a hang fails instead of blocking CI


class RecordSteps(L.Callback):
    """Save each rank's training batches, the initial weights and each rank's final weights."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: FusionModule) -> None:
        if trainer.global_rank == 0:
            torch.save(
                {
                    "state_dict": pl_module.backbone.state_dict(),
                    "init_args": pl_module.backbone.init_arguments(),
                    "hparams": dict(pl_module.hparams),
                },
                self.out_dir / "start.pt",
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: FusionModule, batch: Batch, batch_idx: int
    ) -> None:
        fields = {name: getattr(batch, name) for name in TENSOR_FIELDS}
        torch.save(fields, self.out_dir / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: FusionModule) -> None:
        torch.save(pl_module.backbone.state_dict(), self.out_dir / f"rank{trainer.global_rank}_end.pt")


def concatenate(first: dict, second: dict) -> Batch:
    """One batch of first's rows then second's, with second's image indices moved past first's images."""
    offset = first["images"].shape[0]
    fields = {name: torch.cat([first[name], second[name]]) for name in TENSOR_FIELDS}
    shifted = torch.where(second["image_index"] >= 0, second["image_index"] + offset, second["image_index"])
    fields["image_index"] = torch.cat([first["image_index"], shifted])
    return Batch(**fields)


def logged(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(launcher: str, config: Path) -> list[str]:
    """Build the `fusionlab fit` command for the Lightning launcher (it spawns rank 1) or for torchrun."""
    fit = ["-m", "fusionlab.cli", "fit", "--config", str(config)]
    if launcher == "lightning":
        return [sys.executable, *fit]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    return [*torchrun, "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *fit]


def log_tail(log: Path, chars: int = 6000) -> str:
    # faulthandler's list of extension modules is one long line per rank, of no use for a hang
    lines = [line for line in log.read_text().splitlines() if not line.startswith("Extension modules:")]
    return "\n".join(lines)[-chars:]


def run_ddp(command: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env["MASTER_ADDR"] = "127.0.0.1"  # the ranks talk over the loopback interface only
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT then writes every rank's Python stack to the log
    with log.open("w") as output:
        # A new session makes the ranks one process group, stopped together on a timeout.
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # A hang is usually two ranks waiting in different collectives: show where each one is.
            os.killpg(process.pid, signal.SIGABRT)
            time.sleep(5)
            with contextlib.suppress(ProcessLookupError):  # every rank may have ended on SIGABRT
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            stacks = log_tail(log)
            pytest.fail(f"the DDP run did not finish in {DDP_TIMEOUT_S} s; stacks at the timeout:\n{stacks}")
    assert returncode == 0, f"the DDP run failed:\n{log_tail(log)}"


def train_single_process(record: Path, batches: list[Batch], log_dir: Path) -> FusionModule:
    start = torch.load(record / "start.pt", weights_only=False)
    # the CLI adds keys of its own (such as _instantiator) to the saved hyperparameters
    arguments = inspect.signature(FusionModule).parameters
    hparams = {key: value for key, value in start["hparams"].items() if key in arguments}
    module = FusionModule(EarlyFusion(**start["init_args"]), **hparams)
    module.backbone.load_state_dict(start["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=len(batches),
        log_every_n_steps=1,
        logger=L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="single"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module


def train_ddp(sample_dir: Path, root: Path, launcher: str) -> Path:
    """Train the tiny recipe for STEPS steps with 2 processes; return the folder of the run and records."""
    record = root / "record"
    record.mkdir()
    recipe = tiny_recipe(
        sample_dir,
        root,
        trainer={
            "strategy": "ddp",
            "devices": 2,
            "max_steps": STEPS,
            "val_check_interval": STEPS,
            "log_every_n_steps": 1,
            "callbacks": [{"class_path": "test_ddp.RecordSteps", "init_args": {"out_dir": str(record)}}],
        },
    )
    run_ddp(launch_command(launcher, write_recipe(root / "ddp.yaml", recipe)), root / "ddp.log")
    return root


@pytest.fixture(scope="module")
def ddp_run(sample_dir, tmp_path_factory) -> Path:
    return train_ddp(sample_dir, tmp_path_factory.mktemp("ddp"), "lightning")


def test_ranks_read_different_data(ddp_run):
    record = ddp_run / "record"
    for step in range(STEPS):
        rank0 = torch.load(record / f"rank0_step{step}.pt")
        rank1 = torch.load(record / f"rank1_step{step}.pt")
        assert rank0["tokens"].shape == rank1["tokens"].shape
        assert not torch.equal(rank0["tokens"], rank1["tokens"]), (
            f"both ranks trained on the same rows at step {step}"
        )


def test_ranks_end_with_identical_weights(ddp_run):
    rank0 = torch.load(ddp_run / "record" / "rank0_end.pt")
    rank1 = torch.load(ddp_run / "record" / "rank1_end.pt")
    start = torch.load(ddp_run / "record" / "start.pt", weights_only=False)["state_dict"]
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    assert any(not torch.equal(rank0[name], start[name]) for name in rank0), "training changed no weight"


def test_loss_matches_single_process_with_same_global_batch(ddp_run, tmp_path):
    record = ddp_run / "record"
    batches = [
        concatenate(torch.load(record / f"rank0_step{step}.pt"), torch.load(record / f"rank1_step{step}.pt"))
        for step in range(STEPS)
    ]
    module = train_single_process(record, batches, tmp_path)

    ddp_loss = logged(ddp_run / "tiny" / "version_0", "train/loss")
    single_loss = logged(tmp_path / "single" / "version_0", "train/loss")
    assert len(ddp_loss) == len(single_loss) == STEPS
    # The step loss is the target-weighted mean over the global batch on both sides, so only the
    # order of floating-point sums differs.
    torch.testing.assert_close(torch.tensor(ddp_loss), torch.tensor(single_loss), rtol=1e-5, atol=0)
    assert ddp_loss[-1] < ddp_loss[0], "the loss did not go down"

    ddp_weights = torch.load(record / "rank0_end.pt")
    for name, value in module.backbone.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_launch_matches_lightning_launch(ddp_run, sample_dir, tmp_path):
    """torchrun starts both ranks itself; the ranks then read the same data and log the same losses."""
    torchrun_run = train_ddp(sample_dir, tmp_path, "torchrun")
    for step in range(STEPS):
        for rank in (0, 1):
            name = f"rank{rank}_step{step}.pt"
            lightning_batch = torch.load(ddp_run / "record" / name)
            assert torch.equal(
                torch.load(torchrun_run / "record" / name)["tokens"], lightning_batch["tokens"]
            ), name
    torchrun_loss = logged(torchrun_run / "tiny" / "version_0", "train/loss")
    lightning_loss = logged(ddp_run / "tiny" / "version_0", "train/loss")
    torch.testing.assert_close(torch.tensor(torchrun_loss), torch.tensor(lightning_loss), rtol=1e-5, atol=0)


CLUSTER = TESTS.parent / "docs" / "cluster"


@pytest.mark.parametrize("overlay", ["ddp.yaml", "fsdp.yaml"])
def test_cluster_overlay_parses_over_recipe(overlay, sample_dir, tmp_path, capsys):
    config = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(sample_dir, tmp_path))
    args = [
        "fit",
        "--config",
        str(config),
        "--config",
        str(CLUSTER / overlay),
        "--trainer.num_nodes",
        "2",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == 2
    assert printed["model"]["backbone"]["class_path"] == "fusionlab.models.EarlyFusion", (
        "the overlay replaced the model"
    )
    strategy = printed["trainer"]["strategy"]["class_path"]
    assert (
        strategy
        == {
            "ddp.yaml": "lightning.pytorch.strategies.DDPStrategy",
            "fsdp.yaml": "lightning.pytorch.strategies.FSDPStrategy",
        }[overlay]
    )


def test_fsdp_overlay_wraps_each_decoder_block():
    """Lightning builds FSDP only on GPUs; the strategy object itself can be built and inspected here."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    overlay = yaml.safe_load((CLUSTER / "fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate(parser.parse_object({"strategy": overlay})).strategy
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {Block}


def run_sbatch(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the sbatch template as SLURM would start it on the first node, with srun replaced by a recorder."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    recorded = tmp_path / "srun-args"
    (stub / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{recorded}"\n')
    (stub / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "4321"}
    result = subprocess.run(
        ["bash", str(CLUSTER / "fit.sbatch"), *args],
        env={**os.environ, **slurm, **env, "PATH": f"{stub}:{os.environ['PATH']}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, recorded.read_text().splitlines() if recorded.exists() else []


def test_sbatch_template_runs_fit_with_slurm_layout(tmp_path):
    result, srun = run_sbatch(tmp_path, "recipe.yaml", "overlay.yaml", "--trainer.max_steps", "10")
    assert result.returncode == 0, result.stderr
    assert srun == [
        "fusionlab",
        "fit",
        "--config",
        "recipe.yaml",
        "--config",
        "overlay.yaml",
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "8",
        "--trainer.default_root_dir",
        "runs/slurm-4321",
        "--trainer.max_steps",
        "10",
    ]
    _, default_overlay = run_sbatch(tmp_path, "recipe.yaml")
    assert default_overlay[3:6] == ["recipe.yaml", "--config", "docs/cluster/ddp.yaml"]


@pytest.mark.parametrize("container", ["apptainer", "pyxis"])
def test_sbatch_template_in_container(tmp_path, container):
    paths = {
        "FUSIONLAB_IMAGE": "/images/fusionlab.img",
        "FUSIONLAB_DATA": "/shards",
        "FUSIONLAB_RUNS": "/scratch/runs",
    }
    result, srun = run_sbatch(
        tmp_path, "/opt/fusionlab/recipes/tiny_early.yaml", FUSIONLAB_CONTAINER=container, **paths
    )
    assert result.returncode == 0, result.stderr
    command = " ".join(srun)
    if container == "apptainer":
        assert command.startswith("apptainer exec --nv --pwd /workspace")
        mounts = "--bind /shards:/workspace/data:ro --bind /scratch/runs:/workspace/runs"
        assert f"{mounts} /images/fusionlab.img fusionlab fit" in command
    else:
        assert command.startswith("--container-image /images/fusionlab.img --container-workdir /workspace")
        assert (
            "--container-mounts /shards:/workspace/data:ro,/scratch/runs:/workspace/runs fusionlab fit"
            in command
        )


def test_sbatch_template_rejects_unknown_container(tmp_path):
    result, srun = run_sbatch(tmp_path, "recipe.yaml", FUSIONLAB_CONTAINER="docker")
    assert result.returncode == 2
    assert "FUSIONLAB_CONTAINER=docker is invalid" in result.stderr
    assert srun == []
