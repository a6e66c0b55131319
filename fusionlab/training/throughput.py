"""Throughput and model FLOPs utilisation (MFU) for the progress bar and TensorBoard."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

# Dense peak FLOP/s per device by (name fragment, compute dtype), from the vendors' data sheets
# (no sparsity). A device or dtype missing here gets no MFU rather than a guessed one.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989e12,
    ("H100 SXM", "bf16"): 989e12,
    ("H100 80GB HBM3", "bf16"): 989e12,
    ("H100 PCIe", "bf16"): 756e12,
    ("H100 NVL", "bf16"): 835e12,
    ("A100", "bf16"): 312e12,
    ("A100", "tf32"): 156e12,
    ("L40S", "bf16"): 362e12,
    ("L4", "bf16"): 121e12,
    ("A10G", "bf16"): 70e12,
    ("A10", "bf16"): 125e12,
    ("V100", "fp16"): 125e12,
    ("RTX 4090", "bf16"): 165e12,
    ("RTX 3090", "bf16"): 71e12,
    ("MI300X", "bf16"): 1307e12,
    ("MI250X", "bf16"): 383e12,
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Return the peak FLOP/s of a named accelerator for a compute dtype, or None if unknown."""
    matches = [(len(key), flops) for (key, kind), flops in PEAK_FLOPS.items() if key in device_name and kind == dtype]
    return max(matches)[1] if matches else None


def compute_dtype(precision: str, device_type: str) -> str:
    precision = str(precision)
    if "bf16" in precision:
        return "bf16"
    if "16" in precision:
        return "fp16"
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


class ThroughputMonitor(L.Callback):
    """Log tokens/s, samples/s, FLOP/s and MFU every `log_every_n_steps` optimiser steps.

    Rates are measured over the interval since the last log, across all ranks. MFU is logged only
    on accelerators with a known peak; on CPUs it is absent.
    """

    def __init__(self) -> None:
        self._last: tuple[float, float, float, float] | None = None
        self._peak: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = peak_flops(name, compute_dtype(trainer.precision, device.type)) if name else None
        self._peak = peak * trainer.world_size if peak else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % max(trainer.log_every_n_steps, 1):
            return
        # One host sync per log interval.
        now = time.perf_counter()
        tokens = float(pl_module.tokens_seen.item())
        samples = float(pl_module.samples_seen.item())
        flops = float(pl_module.flops_seen_tensor().item())
        if self._last is not None:
            then, tokens0, samples0, flops0 = self._last
            elapsed = max(now - then, 1e-9)
            metrics = {
                "throughput/tokens_per_sec": (tokens - tokens0) / elapsed,
                "throughput/samples_per_sec": (samples - samples0) / elapsed,
                "throughput/flops_per_sec": (flops - flops0) / elapsed,
            }
            if self._peak:
                metrics["throughput/mfu_pct"] = 100.0 * metrics["throughput/flops_per_sec"] / self._peak
            pl_module.log_dict(metrics, prog_bar=False)
            pl_module.log("tok/s", metrics["throughput/tokens_per_sec"], prog_bar=True, logger=False)
        self._last = (now, tokens, samples, flops)
