"""`fusionlab predict`: caption images from a folder or from caption shards with a checkpoint.

Writes one JSON object per image: {"key", "origin", "caption"}, plus "reference" and "scene" when
the shards carry them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict",
        help="caption images from a folder or from caption shards with a checkpoint (JSON lines)",
        description=(
            "Load the backbone of a `fusionlab fit` checkpoint and caption each image with KV-cached "
            "decoding: greedy by default, sampled with --temperature > 0. Writes one JSON object per line."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by `fusionlab fit`")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", type=Path, help="folder of jpg/png/webp images to caption")
    inputs.add_argument("--shards", help="caption shards: a path, folder, glob or brace pattern")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file to write (default: stdout)")
    parser.add_argument("--tokenizer", default="byte", help="tokenizer the model was trained with (default byte)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per caption at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default), else sampling")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded together (default 16)")
    parser.add_argument("--limit", type=int, default=None, help="caption at most this many images")
    parser.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the sequence at each step (slow reference)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    records = list(predict(
        args.checkpoint, images=args.images, shards=args.shards, tokenizer=args.tokenizer,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        seed=args.seed, batch_size=args.batch_size, limit=args.limit, device=args.device,
        use_cache=not args.no_cache,
    ))
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(lines)
        print(f"wrote {len(records)} captions to {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def predict(
    checkpoint: str | Path,
    *,
    images: str | Path | None = None,
    shards: str | None = None,
    tokenizer: str = "byte",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    device: str = "cpu",
    use_cache: bool = True,
) -> Iterator[dict[str, Any]]:
    """Caption the images of a folder or of caption shards; yield one record per image."""
    import torch

    from fusionlab.data.tokenizer import load_tokenizer
    from fusionlab.evaluation.samples import batched, read_caption_shards, read_image_folder
    from fusionlab.models.generation import caption_images
    from fusionlab.training.routing import load_backbone

    if (images is None) == (shards is None):
        raise ValueError("give exactly one of images (a folder) and shards (a pattern)")
    backbone = load_backbone(checkpoint).to(device)
    image_size = _image_size(backbone)
    if images is not None:
        samples = read_image_folder(images, image_size, limit)
    else:
        samples = read_caption_shards(shards, image_size, limit)
    tok = load_tokenizer(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)

    for chunk in batched(samples, batch_size):
        pixels = torch.stack([sample.image for sample in chunk])
        captions = caption_images(
            backbone, pixels, tok, max_new_tokens, temperature=temperature, top_k=top_k,
            generator=generator, use_cache=use_cache,
        )
        for sample, caption in zip(chunk, captions):
            record = {"key": sample.key, "origin": sample.origin, "caption": caption}
            if sample.reference is not None:
                record["reference"] = sample.reference
            if sample.scene is not None:
                record["scene"] = sample.scene
            yield record


def _image_size(backbone) -> int:
    arguments = backbone.init_arguments()
    if "image_size" not in arguments:
        raise ValueError(
            f"{type(backbone).__name__} records no image_size constructor argument, so images cannot be "
            "resized for it"
        )
    return int(arguments["image_size"])
