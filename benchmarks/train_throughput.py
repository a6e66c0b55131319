"""Training throughput of fusionlab next to the machine's matmul throughput and a plain loop.

For each model size it trains a few steps through the Lightning Trainer (fusionlab's real training
step) and through a plain hand-written loop over the same backbone and batch, and reports tokens/s,
model FLOP/s by the 6ND rule, the share of the measured matmul throughput, and fusionlab over
plain. Everything is measured side by side in one run, so the ratios hold on a noisy machine.

    python benchmarks/train_throughput.py [--steps 12] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.nn import functional as F

from common import RepeatedBatches, matmul_flops_per_sec, packed_batch
from fusionlab.batch import IGNORE_INDEX
from fusionlab.models import EarlyFusion
from fusionlab.training.module import FusionModule

SIZES = {
    # name: (d_model, n_layers, n_heads, context, batch_size)
    "quickstart 0.9M": (128, 4, 4, 512, 8),
    "early 28M": (512, 8, 8, 512, 8),
}
IMAGE_SIZE, PATCH_SIZE = 32, 4


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.end = time.perf_counter()


def build(d_model: int, n_layers: int, n_heads: int) -> EarlyFusion:
    torch.manual_seed(0)
    return EarlyFusion(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, d_model=d_model, n_layers=n_layers,
                       n_heads=n_heads, ffn_multiple_of=64)


def fusionlab_seconds_per_step(backbone, batch, steps: int, warmup: int, precision: str) -> float:
    module = FusionModule(backbone, lr=1e-4, warmup_steps=1, shuffled_image_eval=False)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(RepeatedBatches(batch), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / (steps - warmup)


def plain_seconds_per_step(backbone, batch, steps: int, warmup: int, precision: str) -> float:
    """A hand-written loop: forward, cross-entropy, backward, clip, AdamW step."""
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4, betas=(0.9, 0.95))
    n_targets = (batch.targets != IGNORE_INDEX).sum()
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = backbone(batch).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per measurement (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (default 3)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = {p: matmul_flops_per_sec(torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precision}
    for p, peak in peaks.items():
        print(f"measured matmul throughput ({p}, 2048x2048): {peak / 1e9:.1f} GFLOP/s")
    print()
    print(f"{'model':<16} {'prec':<5} {'params':>8} {'tokens/s':>10} {'GFLOP/s':>8} {'of matmul':>9} {'plain tok/s':>11} {'fusionlab/plain':>15}")
    for name, (d_model, n_layers, n_heads, context, batch_size) in SIZES.items():
        batch = packed_batch(batch_size, context, (IMAGE_SIZE // PATCH_SIZE) ** 2, IMAGE_SIZE)
        tokens = int((batch.document >= 0).sum())
        for precision in args.precision:
            N = build(d_model, n_layers, n_heads).parameter_counts().N
            plain = plain_seconds_per_step(build(d_model, n_layers, n_heads), batch, args.steps, args.warmup, precision)
            ours = fusionlab_seconds_per_step(build(d_model, n_layers, n_heads), batch, args.steps, args.warmup, precision)
            flops = 6 * N * tokens / ours
            print(f"{name:<16} {precision:<5} {N / 1e6:>7.1f}M {tokens / ours:>10.0f} {flops / 1e9:>8.1f} "
                  f"{flops / peaks[precision]:>9.2f} {tokens / plain:>11.0f} {plain / ours:>15.2f}")


if __name__ == "__main__":
    main()
