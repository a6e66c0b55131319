"""fusionlab's training step next to a plain PyTorch reference and the machine's matmul throughput.

The reference is a minimal dense decoder written here (same shape: RMSNorm, QK-norm, rotary, SwiGLU,
untied head; the same packed boolean mask through SDPA) trained by a hand-written loop (forward,
cross-entropy, backward, clipping, AdamW). fusionlab trains EarlyFusion through the Lightning
Trainer and FusionModule. Both see the same packed text batch, precision and step count, measured
in alternating rounds in one run. Reported:

- tokens/s of each, and fusionlab over the reference (target >= 1.0: Lightning's overhead must not
  show);
- model FLOP/s by 6 N D with N the parameters that multiply activations (the input embedding table
  is a lookup, so it is left out), as a share of the square-matmul throughput measured in the same
  run (target >= 0.5 in fp32).

    python benchmarks/train_throughput.py [--steps 12] [--precision fp32 bf16] [--sizes 0.9M 28M]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from common import RepeatedBatches, matmul_flops_per_sec
from fusionlab.batch import IGNORE_INDEX, Batch
from fusionlab.models import EarlyFusion
from fusionlab.models.layers import packed_attention_mask
from fusionlab.training.module import FusionModule

SIZES = {
    # name: (d_model, n_layers, n_heads, context, batch_size)
    "0.9M": (128, 4, 4, 512, 8),
    "28M": (512, 8, 8, 512, 8),
}
VOCAB = 264


# ------------------------------------------------------------------------------------------------
# the plain reference


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qn, self.kn = nn.RMSNorm(self.hd, eps=1e-5), nn.RMSNorm(self.hd, eps=1e-5)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.w1, self.w3, self.w2 = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = rotate(self.qn(q), cos, sin), rotate(self.kn(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
        x = x + self.o(y)
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RefDecoder(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, d_ff: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads, d_ff) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(d, eps=1e-5), nn.Linear(d, VOCAB, bias=False)
        self.inv_freq = 10000.0 ** (-torch.arange(0, d // heads, 2).float() / (d // heads))

    def forward(self, tokens, positions, mask):
        angles = positions.float()[:, None, :, None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.head(self.norm(x))


def reference_seconds(size, batch: Batch, steps: int, warmup: int, precision: str) -> list[float]:
    d, layers, heads, _, _ = size
    torch.manual_seed(0)
    model = RefDecoder(d, layers, heads, d_ff=64 * math.ceil(8 * d / 3 / 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    n_targets = (batch.targets != IGNORE_INDEX).sum()
    starts = []
    for _ in range(steps):
        starts.append(time.perf_counter())
        mask = packed_attention_mask(batch.document, batch.image_index)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch.tokens, batch.positions, mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(time.perf_counter())
    return step_seconds(starts, warmup)


def step_seconds(starts: list[float], warmup: int) -> list[float]:
    """Return the durations of the steps after the warmup, from the times at which each step began."""
    return [end - start for start, end in zip(starts[warmup:-1], starts[warmup + 1 :])]


# ------------------------------------------------------------------------------------------------
# fusionlab through Lightning


class StepTimer(L.Callback):
    """Record when each step begins, so a step's time includes Lightning's work between steps."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, *args) -> None:
        self.starts.append(time.perf_counter())


def build_fusionlab(size) -> EarlyFusion:
    d, layers, heads, _, _ = size
    torch.manual_seed(0)
    return EarlyFusion(vocab_size=VOCAB, image_size=8, patch_size=4, d_model=d, n_layers=layers, n_heads=heads,
                       ffn_multiple_of=64, attention="sdpa")


def fusionlab_seconds(size, batch: Batch, steps: int, warmup: int, precision: str) -> list[float]:
    module = FusionModule(build_fusionlab(size), lr=1e-4, warmup_steps=1, shuffled_image_eval=False)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(RepeatedBatches(batch), batch_size=None))
    return step_seconds(timer.starts, warmup)


def text_batch(batch_size: int, context: int, doc_len: int = 128) -> Batch:
    """Rows of text documents of doc_len tokens packed end to end (no images)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (batch_size, context), generator=g)
    index = torch.arange(context)
    document = (index // doc_len).expand(batch_size, context).contiguous()
    positions = (index % doc_len).expand(batch_size, context).contiguous()
    targets = torch.where(positions < doc_len - 1, tokens.roll(-1, 1), IGNORE_INDEX)
    none = torch.full((batch_size, context), -1)
    return Batch(tokens, torch.zeros(0, 3, 8, 8, dtype=torch.uint8), none, none.clone(), document, positions,
                 targets, torch.full_like(tokens, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per measurement (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds, whose steps are pooled for the median (default 3)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps "
          f"({args.warmup} untimed), median step of {args.rounds} alternating rounds")
    peaks = {p: matmul_flops_per_sec(torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precision}
    for p, peak in peaks.items():
        print(f"matmul throughput {p} (2048^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"\n{'size':<6} {'prec':<5} {'N':>7} {'fusionlab tok/s':>16} {'plain tok/s':>12} {'ratio':>6} "
          f"{'GFLOP/s':>8} {'of matmul':>9}")
    for name in args.sizes:
        size = SIZES[name]
        batch = text_batch(size[4], size[3])
        tokens = batch.tokens.numel()
        model = build_fusionlab(size)
        N = model.parameter_counts().N - model.decoder.embed.weight.numel() - sum(p.numel() for p in model.patch_embed.parameters())
        for precision in args.precision:
            ours, plain = [], []
            for _ in range(args.rounds):  # alternate, so slow phases of a noisy machine hit both
                ours += fusionlab_seconds(size, batch, args.steps, args.warmup, precision)
                plain += reference_seconds(size, batch, args.steps, args.warmup, precision)
            # The median step of all rounds: one slow step, from a burst of load, does not move it.
            ours, plain = statistics.median(ours), statistics.median(plain)
            flops = 6 * N * tokens / ours
            print(f"{name:<6} {precision:<5} {N / 1e6:>6.1f}M {tokens / ours:>16.0f} {tokens / plain:>12.0f} "
                  f"{plain / ours:>6.2f} {flops / 1e9:>8.1f} {flops / peaks[precision]:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
