"""`fusionlab downstream`: the paper's downstream protocol at small scale, for several checkpoints.

For each pretrained checkpoint the command reads the pretraining summary (summary.json of its run,
when present), scores greedy captions (CIDEr-D, digit accuracy) and zero-shot answers on held-out
scenes, fine-tunes with the supervised fine-tuning recipe (`fusionlab fit`, loss on answers only,
weights from the checkpoint), and reads the fine-tuned scores from that run's summary. It prints
one table row per checkpoint and writes downstream.json under --out, beside the fine-tuning runs
and their TensorBoard logs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# Backbone arguments that FusionCLI links from the data section: they are set through data.*.
LINKED_ARGUMENTS = {"vocab_size": None, "image_size": "image_size", "patch_size": "patch_size"}
CALLBACK = "DownstreamEvaluation"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "downstream",
        help="caption scores, question-answering fine-tuning and scores of checkpoints, as one table",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=CKPT",
                        help="a checkpoint of `fusionlab fit` with the table row name (repeatable)")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/sft_qa.yaml"),
                        help="the fine-tuning recipe, with a DownstreamEvaluation callback (recipes/sft_qa.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fine-tuning runs and downstream.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a recipe value for every fine-tuning run, such as trainer.max_steps=100 (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.recipe.is_file():
        raise SystemExit(f"fusionlab downstream: recipe {args.recipe} not found; pass --recipe")
    overrides = parse_overrides(args.overrides)
    scoring = scoring_options(yaml.safe_load(args.recipe.read_text()) or {}, overrides, args.recipe)
    checkpoints = []
    for spec in args.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"fusionlab downstream: --checkpoint {spec!r} must look like NAME=CKPT with an existing CKPT")
        if name in {known for known, _ in checkpoints}:
            raise SystemExit(f"fusionlab downstream: --checkpoint name {name!r} is given twice; names must differ")
        checkpoints.append((name, Path(path)))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [evaluate_checkpoint(name, path, args.recipe, args.out, overrides, scoring) for name, path in checkpoints]
    (args.out / "downstream.json").write_text(json.dumps({"scoring": scoring, "models": rows}, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {args.out / 'downstream.json'}")
    return 0


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fusionlab downstream: --set {item!r} must look like KEY=VALUE")
        overrides[key] = value
    return overrides


def scoring_options(recipe: dict, overrides: dict[str, str], path: Path) -> dict[str, Any]:
    """Return the DownstreamEvaluation arguments of the recipe, plus its tokenizer, for scoring before fine-tuning."""
    callbacks = (recipe.get("trainer") or {}).get("callbacks") or []
    found = [c for c in callbacks if isinstance(c, dict) and str(c.get("class_path", "")).endswith(CALLBACK)]
    if not found:
        raise SystemExit(f"fusionlab downstream: recipe {path} has no {CALLBACK} callback in trainer.callbacks, "
                         "so the fine-tuned models would not be scored")
    options = {"limit": 64, "max_new_tokens": 64, "batch_size": 16, **(found[0].get("init_args") or {})}
    if "shards" not in options:
        raise SystemExit(f"fusionlab downstream: the {CALLBACK} callback of {path} needs init_args.shards")
    data_tokenizer = overrides.get("data.tokenizer") or (recipe.get("data") or {}).get("tokenizer") or "byte"
    options["tokenizer"] = options.get("tokenizer") or data_tokenizer
    return options


def evaluate_checkpoint(
    name: str, checkpoint: Path, recipe: Path, out: Path, overrides: dict[str, str], scoring: dict[str, Any]
) -> dict[str, Any]:
    """Score, fine-tune and score again one checkpoint; return its table row."""
    start = time.perf_counter()
    row: dict[str, Any] = {"name": name, "checkpoint": str(checkpoint), **pretraining_summary(checkpoint)}
    row.update(score_pretrained(checkpoint, scoring))
    summary = fine_tune(name, checkpoint, recipe, out, overrides)
    row["sft_val_loss"] = (summary.get("val_loss") or {}).get("qa")
    row.update({f"sft_{key}": value for key, value in (summary.get("downstream") or {}).items()})
    row["seconds"] = time.perf_counter() - start
    return row


def score_pretrained(checkpoint: Path, scoring: dict[str, Any]) -> dict[str, Any]:
    """Caption scores and zero-shot question answering of the pretrained backbone."""
    from fusionlab.data.tokenizer import load_tokenizer
    from fusionlab.evaluation.evaluate import evaluate
    from fusionlab.evaluation.samples import read_caption_shards
    from fusionlab.training.routing import load_backbone

    backbone = load_backbone(checkpoint)
    samples = read_caption_shards(scoring["shards"], int(backbone.init_arguments()["image_size"]), scoring["limit"])
    scores = evaluate(backbone, samples, load_tokenizer(scoring["tokenizer"]),
                      max_new_tokens=scoring["max_new_tokens"], batch_size=scoring["batch_size"])
    return {"parameters_active": backbone.parameter_counts().active, **scores}


def backbone_config(checkpoint: Path) -> dict[str, Any]:
    """Return recipe sections that rebuild the checkpoint's backbone under FusionCLI's links."""
    from fusionlab.training.routing import read_backbone_checkpoint

    spec, _ = read_backbone_checkpoint(checkpoint)
    init_args = dict(spec.get("init_args") or {})
    data = {target: init_args[key] for key, target in LINKED_ARGUMENTS.items() if target and key in init_args}
    for key in LINKED_ARGUMENTS:
        init_args.pop(key, None)
    return {"model": {"backbone": {"class_path": spec["class_path"], "init_args": init_args}}, "data": data}


def fine_tune(name: str, checkpoint: Path, recipe: Path, out: Path, overrides: dict[str, str]) -> dict[str, Any]:
    """Run the fine-tuning recipe from the checkpoint's weights in a child process; return the run's summary."""
    base = out / f"{name}.backbone.yaml"
    base.write_text(yaml.safe_dump(backbone_config(checkpoint), sort_keys=False))
    command = [
        sys.executable, "-m", "fusionlab.cli", "fit", "--config", str(base), "--config", str(recipe),
        "--model.init_from", str(checkpoint),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name,
    ]
    for key, value in overrides.items():
        command += [f"--{key}", value]
    log_path = out / f"{name}.log"
    print(f"fusionlab downstream: fine-tuning {name} from {checkpoint}, log {log_path}", flush=True)
    with log_path.open("w") as log_file:
        code = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise SystemExit(f"fusionlab downstream: fine-tuning {name} failed with exit code {code}; see {log_path}")
    versions = sorted((out / name).glob("version_*/summary.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise SystemExit(f"fusionlab downstream: fine-tuning {name} wrote no summary.json under {out / name}")
    return json.loads(versions[-1].read_text())


def pretraining_summary(checkpoint: Path) -> dict[str, Any]:
    """Return val loss and FLOPs from the summary.json of the checkpoint's run, or {} without one."""
    path = checkpoint.parent.parent / "summary.json"  # RUN/checkpoints/last.ckpt -> RUN/summary.json
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    val_loss = summary.get("val_loss") or {}
    return {"val_loss": val_loss.get("mean"), "flops": summary.get("flops")}


COLUMNS = (
    ("model", "name", "{}"), ("active", "parameters_active", "{:.2e}"), ("FLOPs", "flops", "{:.2e}"),
    ("val loss", "val_loss", "{:.3f}"), ("CIDEr-D", "cider", "{:.3f}"), ("digits", "digit_accuracy", "{:.3f}"),
    ("QA 0-shot", "qa_accuracy", "{:.3f}"), ("SFT loss", "sft_val_loss", "{:.3f}"),
    ("QA count", "sft_qa_accuracy/count", "{:.3f}"), ("QA cell", "sft_qa_accuracy/cell", "{:.3f}"),
    ("QA present", "sft_qa_accuracy/presence", "{:.3f}"), ("QA avg", "sft_qa_accuracy", "{:.3f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One row per model: pretraining, caption scores, zero-shot and fine-tuned question answering."""
    cells = [[title for title, _, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells)
