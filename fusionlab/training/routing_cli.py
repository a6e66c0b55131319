"""`fusionlab routing CHECKPOINT SHARDS...`: MoE routing statistics of a checkpoint on shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusionlab.batch import DATA_TYPES


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "routing",
        help="per-layer expert routing of an MoE checkpoint on shards: routing.png and routing.json",
        description=(
            "Count the image and text tokens each expert of each MoE layer receives over the given "
            "shards, compute the specialisation score per layer (mean over experts of 1 - H(p), p the "
            "share of image tokens), and write a heatmap (routing.png) and the numbers (routing.json)."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by `fusionlab fit` (an MoE backbone)")
    parser.add_argument(
        "--source", action="append", required=True, metavar="TYPE=PATTERN",
        help=f"shards to read, as TYPE=PATTERN with TYPE one of {', '.join(DATA_TYPES)} (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for routing.png and routing.json")
    parser.add_argument("--context", type=int, default=512, help="positions per packed row (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--tokenizer", default="byte", help="tokenizer the model was trained with (default byte)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    parser.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fusionlab.training.routing import routing_report

    sources = []
    for spec in args.source:
        data_type, sep, pattern = spec.partition("=")
        if not sep or data_type not in DATA_TYPES:
            raise SystemExit(f"fusionlab routing: --source {spec!r} must look like TYPE=PATTERN with TYPE in {DATA_TYPES}")
        sources.append({"urls": pattern, "type": data_type})
    report = routing_report(
        args.checkpoint, sources, args.out, context=args.context, batch_size=args.batch_size,
        tokenizer=args.tokenizer, max_batches=args.max_batches, device=args.device,
    )
    scores = {layer["layer"]: layer.get("specialization") for layer in report["layers"]}
    print(json.dumps({"specialization": scores}, indent=2))
    print(f"wrote {args.out / 'routing.png'} and {args.out / 'routing.json'}")
    return 0
