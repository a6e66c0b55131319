"""Inference cost of early fusion, late fusion and MoE at matched training FLOPs, side by side.

The models are those of benchmarks/architectures.py (early and late fusion matched in training
FLOPs per token, MoE with the early-fusion decoder and equal active parameters). Each model runs in
its own process and captions a batch of images with KV-cached greedy decoding:

- prefill: the prompt `<bos> <boi> image <eoi>` of every image in one forward pass, reported per image;
- decode: one cached step for every row, reported per generated token of one row;
- peak memory: CUDA peak allocated bytes, or on CPU the resident-set growth over the run;
- parameters: active and total, and the training FLOPs per caption token (6 N, plus 6 N_v per image token).

    python benchmarks/inference_cost.py [--batch 8] [--new-tokens 32] [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

from architectures import IMAGE_SIZE, MODELS, PATCH_SIZE

from fusionlab.data.tokenizer import ByteTokenizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def measure(name: str, batch: int, new_tokens: int, repeats: int, device: str, precision: str, queue: mp.Queue) -> None:
    import fusionlab.models as models
    from fusionlab.models.generation import CachedStepper, build_prompts

    torch.manual_seed(0)
    class_name, kwargs = MODELS[name]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    backbone = getattr(models, class_name)(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, attention="sdpa", **kwargs)
    backbone = backbone.to(device=device, dtype=dtype).eval()
    tokenizer = ByteTokenizer()
    images = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    prompt = build_prompts([[image] for image in images], tokenizer, backbone.tokens_per_image).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    prefill_times, step_times = [], []
    for _ in range(repeats + 1):  # the first round warms up kernels and allocators
        stepper = CachedStepper(backbone, prompt, new_tokens)
        seconds, logits = _timed(stepper.prefill, device)
        prefill_times.append(seconds)
        token = logits.argmax(-1)
        steps = []
        for _ in range(new_tokens):
            seconds, logits = _timed(lambda: stepper.step(token), device)
            steps.append(seconds)
            token = logits.argmax(-1)
        step_times.append(statistics.median(steps))

    if device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # ru_maxrss is KiB on Linux
    counts = backbone.parameter_counts()
    # training FLOPs of one caption-like token mix: 6 N per token plus 6 N_v per image token
    queue.put({
        "name": name,
        "active": counts.active,
        "total": counts.total,
        "train_flops_per_image": backbone.flops_per_step(backbone.tokens_per_image, backbone.tokens_per_image),
        "prefill_per_image": min(prefill_times[1:]) / batch,
        "decode_per_token": min(step_times[1:]),
        "peak_mib": peak_mib,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images captioned together (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoding steps timed (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up; the fastest is kept")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = []
    for name in args.models:
        queue = context.Queue()
        process = context.Process(
            target=measure,
            args=(name, args.batch, args.new_tokens, args.repeats, args.device, args.precision, queue),
        )
        process.start()
        results.append(queue.get(timeout=1800))
        process.join()

    base = next((r for r in results if r["name"] == "early"), results[0])
    print(f"{args.device} {args.precision}, {args.batch} images of {IMAGE_SIZE}px, {args.new_tokens} cached steps, "
          f"fastest of {args.repeats} rounds; ratios are over {base['name']}")
    header = (f"{'model':<14} {'active':>8} {'total':>8} {'train FLOPs/img':>15} {'prefill ms/img':>15} "
              f"{'x':>5} {'decode ms/tok':>14} {'x':>5} {'peak MiB':>9}")
    print(header)
    for r in results:
        print(f"{r['name']:<14} {r['active'] / 1e6:>7.2f}M {r['total'] / 1e6:>7.2f}M "
              f"{r['train_flops_per_image']:>15.3g} {1e3 * r['prefill_per_image']:>15.3f} "
              f"{r['prefill_per_image'] / base['prefill_per_image']:>5.2f} {1e3 * r['decode_per_token']:>14.3f} "
              f"{r['decode_per_token'] / base['decode_per_token']:>5.2f} {r['peak_mib']:>9.1f}")


if __name__ == "__main__":
    main()
