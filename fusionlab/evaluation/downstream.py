"""`fusionlab downstream`: the downstream protocol at small scale for several pretrained checkpoints.

For each checkpoint, the command reads its pretraining summary (summary.json of its run, when
present) and scores greedy captions on held-out caption shards (CIDEr-D, digit accuracy). It then
fine-tunes on the scene question set of the training shards, with the loss on answers only, and
scores question answering on the held-out scenes. Prints one table row per checkpoint and writes downstream.json and
TensorBoard scalars ("downstream/...") under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULTS = {
    "steps": 100, "lr": 1e-3, "batch_size": 16, "train_limit": 512, "eval_limit": 64,
    "max_new_tokens": 64, "tokenizer": "byte", "device": "cpu", "seed": 0,
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "downstream",
        help="caption scores, question-answering fine-tuning and scores of checkpoints, as one table",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=CKPT",
                        help="a checkpoint of `fusionlab fit` with the table row name (repeatable)")
    parser.add_argument("--train-shards", required=True, help="caption shards with scenes for fine-tuning")
    parser.add_argument("--eval-shards", required=True, help="held-out caption shards with scenes for scoring")
    parser.add_argument("--out", type=Path, required=True, help="folder for downstream.json and TensorBoard logs")
    parser.add_argument("--config", type=Path, help="YAML file of the options below (an SFT recipe); flags override it")
    parser.add_argument("--steps", type=int, help=f"fine-tuning steps (default {DEFAULTS['steps']})")
    parser.add_argument("--lr", type=float, help=f"fine-tuning learning rate (default {DEFAULTS['lr']})")
    parser.add_argument("--batch-size", type=int, help=f"examples per step and prompts per decode (default {DEFAULTS['batch_size']})")
    parser.add_argument("--train-limit", type=int, help=f"training images read (default {DEFAULTS['train_limit']})")
    parser.add_argument("--eval-limit", type=int, help=f"held-out images scored (default {DEFAULTS['eval_limit']})")
    parser.add_argument("--max-new-tokens", type=int, help=f"caption length at most (default {DEFAULTS['max_new_tokens']})")
    parser.add_argument("--tokenizer", help="tokenizer the models were trained with (default byte)")
    parser.add_argument("--device", help="device to run on (default cpu)")
    parser.add_argument("--seed", type=int, help="seed of the question set and batches (default 0)")
    parser.set_defaults(func=run)


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the defaults, the --config YAML and the flags given, in that order."""
    options = dict(DEFAULTS)
    if args.config is not None:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        unknown = set(loaded) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"fusionlab downstream: unknown keys {sorted(unknown)} in {args.config}: valid keys are {sorted(DEFAULTS)}")
        options.update(loaded)
    options.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    return options


def run(args: argparse.Namespace) -> int:
    options = resolve_options(args)
    rows = []
    for spec in args.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"fusionlab downstream: --checkpoint {spec!r} must look like NAME=CKPT")
        rows.append(evaluate_checkpoint(name, Path(path), args.train_shards, args.eval_shards, args.out, options))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "downstream.json").write_text(json.dumps({"options": options, "models": rows}, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {args.out / 'downstream.json'}")
    return 0


def evaluate_checkpoint(
    name: str, checkpoint: Path, train_shards: str, eval_shards: str, out: Path, options: dict[str, Any]
) -> dict[str, Any]:
    """Run the protocol for one checkpoint and return its table row."""
    from torch.utils.tensorboard import SummaryWriter

    from fusionlab.data.tokenizer import load_tokenizer
    from fusionlab.evaluation.evaluate import evaluate
    from fusionlab.evaluation.finetune import finetune_qa
    from fusionlab.evaluation.samples import read_caption_shards
    from fusionlab.training.routing import load_backbone

    start = time.perf_counter()
    backbone = load_backbone(checkpoint).to(options["device"])
    tokenizer = load_tokenizer(options["tokenizer"])
    image_size = int(backbone.init_arguments()["image_size"])
    train = read_caption_shards(train_shards, image_size, options["train_limit"])
    held_out = read_caption_shards(eval_shards, image_size, options["eval_limit"])
    common = dict(max_new_tokens=options["max_new_tokens"], batch_size=options["batch_size"])

    row: dict[str, Any] = {"name": name, "checkpoint": str(checkpoint), **pretraining_summary(checkpoint)}
    row["parameters_active"] = backbone.parameter_counts().active
    row.update(evaluate(backbone, held_out, tokenizer, qa=False, **common))
    losses = finetune_qa(backbone, train, tokenizer, steps=options["steps"], batch_size=options["batch_size"],
                         lr=options["lr"], seed=options["seed"])
    row["sft_loss"] = [losses[0], losses[-1]]
    after = evaluate(backbone, held_out, tokenizer, **common)
    row.update({key: value for key, value in after.items() if key.startswith("qa_accuracy")})
    row["seconds"] = time.perf_counter() - start

    with SummaryWriter(str(out / name)) as writer:
        for key, value in row.items():
            if isinstance(value, float) and key != "seconds":
                writer.add_scalar(f"downstream/{key}", value, 0)
    return row


def pretraining_summary(checkpoint: Path) -> dict[str, Any]:
    """Return val loss and FLOPs from the summary.json of the checkpoint's run, or {} without one."""
    path = checkpoint.parent.parent / "summary.json"  # RUN/checkpoints/last.ckpt -> RUN/summary.json
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    val_loss = summary.get("val_loss") or {}
    return {"val_loss": val_loss.get("mean"), "flops": summary.get("flops")}


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("model", "name", "{}"), ("active", "parameters_active", "{:.2e}"), ("FLOPs", "flops", "{:.2e}"),
        ("val loss", "val_loss", "{:.3f}"), ("CIDEr-D", "cider", "{:.3f}"), ("digits", "digit_accuracy", "{:.3f}"),
        ("QA count", "qa_accuracy/count", "{:.3f}"), ("QA cell", "qa_accuracy/cell", "{:.3f}"),
        ("QA present", "qa_accuracy/presence", "{:.3f}"), ("QA avg", "qa_accuracy", "{:.3f}"),
    ]
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells)
