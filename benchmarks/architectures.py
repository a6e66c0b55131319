"""Step time and peak memory of each architecture at matched compute, side by side in one run.

Early fusion, late fusion (the tiny recipes' sizes, matched in training FLOPs per token) and, with
the early-fusion decoder's width, MoE with 8 experts top-1 and modality-aware MoE (equal active
parameters). Each model trains a few steps in its own process on the same packed batch; the script
prints seconds per step, the ratio to early fusion and the peak resident memory above the
process's state before the first step.

    python benchmarks/architectures.py [--steps 10] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
from torch.nn import functional as F

from common import packed_batch

IMAGE_SIZE, PATCH_SIZE, CONTEXT, BATCH = 32, 4, 512, 8
DECODER = {"d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_multiple_of": 64}
MODELS = {
    "early": ("EarlyFusion", DECODER),
    "late": ("LateFusion", {"d_model": 124, "n_layers": 4, "n_heads": 2, "ffn_multiple_of": 64,
                            "encoder_width": 64, "encoder_layers": 4, "encoder_heads": 4}),
    "moe 8x top-1": ("EarlyFusion", {**DECODER, "moe": {"n_experts": 8, "top_k": 1}}),
    "moe modality": ("EarlyFusion", {**DECODER, "moe": {"n_experts": 2, "routing": "modality"}}),
}


def measure(name: str, steps: int, precision: str, checkpointing: bool, queue: mp.Queue) -> None:
    import fusionlab.models as models
    from fusionlab.batch import IGNORE_INDEX

    torch.manual_seed(0)
    class_name, kwargs = MODELS[name]
    model = getattr(models, class_name)(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                        activation_checkpointing=checkpointing, **kwargs)
    batch = packed_batch(BATCH, CONTEXT, model.tokens_per_image, IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_targets = (batch.targets != IGNORE_INDEX).sum()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch.targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") / n_targets + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = model.parameter_counts()
    tokens = int((batch.document >= 0).sum())
    image_tokens = int(batch.image_mask.sum())
    queue.put({
        "name": name,
        "seconds": sorted(times[2:])[len(times[2:]) // 2],  # median after two warm-up steps
        "peak_mib": (peak - baseline) / 1024,
        "tokens": tokens,
        "active": counts.active,
        "total": counts.total,
        "flops": model.flops_per_step(tokens, image_tokens),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per model (default 10)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is kept (default 2)")
    parser.add_argument("--checkpointing", action="store_true", help="recompute each decoder layer in backward")
    args = parser.parse_args()

    # Models run in interleaved rounds (A B C D A B C D) and keep their fastest round, so a burst
    # of load from other processes does not land on one model only.
    context = mp.get_context("spawn")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in args.models:
            queue = context.Queue()
            process = context.Process(target=measure, args=(name, args.steps, args.precision, args.checkpointing, queue))
            process.start()
            result = queue.get(timeout=1800)
            process.join()
            if name not in best or result["seconds"] < best[name]["seconds"]:
                best[name] = result
    results = [best[name] for name in args.models]

    base = next((r for r in results if r["name"] == "early"), results[0])
    print(f"{args.precision}, batch {BATCH} x {CONTEXT}, {args.steps} steps each (median step after 2 warm-up), "
          f"best of {args.rounds} interleaved rounds")
    print(f"activation checkpointing: {'on' if args.checkpointing else 'off'}")
    print(f"{'model':<14} {'active':>8} {'total':>8} {'FLOPs/step':>11} {'s/step':>8} {'vs early':>9} "
          f"{'peak MiB':>9} {'KiB/token':>10}")
    for r in results:
        print(f"{r['name']:<14} {r['active'] / 1e6:>7.2f}M {r['total'] / 1e6:>7.2f}M {r['flops']:>11.3g} "
              f"{r['seconds']:>8.3f} {r['seconds'] / base['seconds']:>9.2f} {r['peak_mib']:>9.0f} "
              f"{r['peak_mib'] * 1024 / r['tokens']:>10.1f}")


if __name__ == "__main__":
    main()
