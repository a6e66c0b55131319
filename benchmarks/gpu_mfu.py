"""Tokens/s and MFU of the paper's smallest recipes on one accelerator, in bf16.

Builds the backbones of recipes/paper/early_275m.yaml, late_289m.yaml and moe_275m.yaml (vocabulary
50,432, 224x224 images in 14x14 patches, context 1024), trains `--steps` steps on a synthetic packed
batch of caption documents with FusionModule's loss and AdamW, and reports tokens/s and MFU against
the device's peak from fusionlab.training.throughput.PEAK_FLOPS (absent for an unknown device).
FlexAttention and torch.compile are on by default on CUDA.

    python benchmarks/gpu_mfu.py                       # on a GPU machine
    python benchmarks/gpu_mfu.py --tiny --device cpu   # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml
from torch.nn import functional as F

from common import packed_batch
from fusionlab.batch import IGNORE_INDEX
from fusionlab.models import EarlyFusion, LateFusion
from fusionlab.training.throughput import compute_dtype, peak_flops

RECIPES = {"early 275M": "recipes/paper/early_275m.yaml", "late 289M": "recipes/paper/late_289m.yaml",
           "moe 275M": "recipes/paper/moe_275m.yaml"}
CLASSES = {"fusionlab.models.EarlyFusion": EarlyFusion, "fusionlab.models.LateFusion": LateFusion}
VOCAB = 50432


def build(recipe: str, tiny: bool, attention: str):
    config = yaml.safe_load(open(recipe))
    backbone = config["model"]["backbone"]
    args = dict(backbone["init_args"], attention=attention)
    image_size, patch_size = config["data"]["image_size"], config["data"]["patch_size"]
    if tiny:
        # Same structure, a few layers and small widths: checks the script, not the hardware.
        args.update(n_layers=2, d_model=64, n_heads=4, head_dim=16)
        if "encoder_width" in args:
            args.update(encoder_layers=2, encoder_width=32, encoder_heads=2)
        image_size, patch_size = 32, 8
    model = CLASSES[backbone["class_path"]](vocab_size=VOCAB, image_size=image_size, patch_size=patch_size, **args)
    return model, image_size, config["data"]["context"] if not tiny else 128, config["data"]["batch_size"] if not tiny else 2


def measure(name, recipe, args) -> None:
    device = torch.device(args.device)
    model, image_size, context, batch_size = build(recipe, args.tiny, args.attention)
    model.to(device)
    if args.compile:
        model.compile()
    batch = packed_batch(args.batch_size or batch_size, context, model.tokens_per_image, image_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    n_targets = (batch.targets != IGNORE_INDEX).sum()
    tokens = int((batch.document >= 0).sum())
    image_tokens = int(batch.image_mask.sum())

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch.targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") / n_targets + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    flops = model.flops_per_step(tokens, image_tokens) / seconds
    peak = peak_flops(torch.cuda.get_device_name(device), compute_dtype("bf16-mixed", "cuda")) if device.type == "cuda" else None
    mfu = f"{100 * flops / peak:.1f} %" if peak else "n/a"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    counts = model.parameter_counts()
    print(f"{name:<11} active {counts.active / 1e6:7.1f}M total {counts.total / 1e6:7.1f}M  "
          f"{tokens / seconds:10.0f} tok/s  {flops / 1e12:7.2f} TFLOP/s  MFU {mfu:>7}  peak {memory}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, compilation included (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the recipe's)")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depth, to test the script on CPU")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    if args.device == "cpu":
        args.compile = False
    for name in args.models:
        measure(name, RECIPES[name], args)


if __name__ == "__main__":
    main()
