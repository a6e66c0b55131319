"""The machine-readable summary of a finished run, read by the scaling tools."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import time
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
_VERSIONED_PACKAGES = ("fusionlab", "torch", "lightning", "torchmetrics", "timm", "webdataset", "tokenizers")


class RunSummary(L.Callback):
    """Write `summary.json` into the run folder when fit ends, and report where things are."""

    def __init__(self) -> None:
        self._start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # NOTE: trainer.log_dir is a collective call under DDP: every rank must reach it.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        summary = build_summary(trainer, pl_module, run_dir)
        summary["wall_clock_seconds"] = time.perf_counter() - self._start if self._start else None
        summary["peak_memory_bytes"] = peak_memory_bytes(pl_module.device)
        # Callbacks with a `summary_section()` add their part (MoE routing, for example).
        for callback in trainer.callbacks:
            section = getattr(callback, "summary_section", None)
            if callable(section):
                summary.update(section())
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        print(format_report(summary, run_dir, trainer), flush=True)


def build_summary(trainer: L.Trainer, module: Any, run_dir: Path) -> dict[str, Any]:
    counts = module.parameter_counts
    D = int(module.tokens_seen.item())
    D_v = int(module.image_tokens_seen.item())
    return {
        "architecture": type(module.backbone).__name__,
        "run_name": run_dir.name,
        "backbone": module.backbone.init_arguments(),
        "parameters": {"N": counts.N, "N_v": counts.N_v, "active": counts.active, "total": counts.total},
        "tokens": {"D": D, "D_v": D_v},
        "flops": 6.0 * (counts.N * D + counts.N_v * D_v),
        "steps": trainer.global_step,
        "val_loss": dict(module.last_val_losses),
        "data_counters": dict(module.data_counters),
        "nonfinite_steps": module.nonfinite_steps,
        "provenance": provenance(trainer),
    }


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in kilobytes on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def provenance(trainer: L.Trainer) -> dict[str, Any]:
    datamodule = getattr(trainer, "datamodule", None)
    return {
        "git_commit": _git_commit(),
        "packages": {name: _version(name) for name in _VERSIONED_PACKAGES},
        "seed": _int_or_none(os.environ.get("PL_GLOBAL_SEED")),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "hardware": _hardware(),
        "shards": _shard_patterns(datamodule),
    }


def format_report(summary: dict[str, Any], run_dir: Path, trainer: L.Trainer) -> str:
    losses = summary["val_loss"]
    lines = [f"fusionlab: run finished after {summary['steps']} steps, {summary['tokens']['D']:,} tokens"]
    if losses:
        lines.append("validation loss per data type:")
        lines += [f"  {name:<30} {value:.4f}" for name, value in losses.items()]
    lines.append(f"logs and summary: {run_dir}")
    checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    if checkpoint:
        lines.append(f"last checkpoint: {checkpoint}")
    lines.append(f"TensorBoard: tensorboard --logdir {Path(run_dir).parent}")
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _shard_patterns(datamodule: Any) -> dict[str, list[dict[str, Any]]]:
    patterns: dict[str, list[dict[str, Any]]] = {}
    for split in ("train", "val"):
        sources = getattr(datamodule, f"{split}_sources", None) or []
        patterns[split] = [asdict(s) if is_dataclass(s) else dict(vars(s)) for s in sources]
    return patterns
