"""`fusionlab compare`: train several recipes one after another and print their results side by side.

Each recipe runs in its own `fusionlab fit` process, so wall-clock and peak memory are measured per
run and one run cannot leak memory into the next. The recipes decide what is held equal: the
tiny early- and late-fusion recipes are matched in training FLOPs per token and train on the same
number of tokens, so they use equal compute; the table prints each run's FLOPs to check it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fusionlab.batch import DATA_TYPES

LOSS_COLUMNS = (*DATA_TYPES, "mean", "caption_shuffled_images")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="train recipes one after another and compare their losses, compute, time and memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipes", nargs="+", type=Path, help="recipe YAML files, one run each")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for the runs (default: runs/compare)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="OPTION=VALUE",
        help="a CLI override applied to every run, e.g. --override trainer.max_steps=300 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the comparison table to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summaries = []
    for recipe in args.recipes:
        if not recipe.is_file():
            print(f"fusionlab compare: recipe {recipe} not found", file=sys.stderr)
            return 2
        name = recipe.stem
        code = _fit(recipe, args.out, name, args.override)
        if code != 0:
            print(f"fusionlab compare: {recipe} failed with exit code {code}; see the output above", file=sys.stderr)
            return code
        summaries.append((name, _latest_summary(args.out / name)))
    print(format_table(summaries))
    if args.json:
        args.json.write_text(json.dumps({name: summary for name, summary in summaries}, indent=2) + "\n")
    return 0


def _fit(recipe: Path, out: Path, name: str, overrides: list[str]) -> int:
    command = [
        sys.executable, "-m", "fusionlab.cli", "fit", "--config", str(recipe),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.logger.init_args.name", name,
    ]
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"fusionlab compare: --override {override!r} must look like OPTION=VALUE")
        command += [f"--{key}", value]
    print(f"fusionlab compare: training {recipe}", flush=True)
    return subprocess.run(command, check=False).returncode


def _latest_summary(run_root: Path) -> dict[str, Any]:
    versions = sorted(run_root.glob("version_*/summary.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise SystemExit(f"fusionlab compare: no summary.json under {run_root}")
    return json.loads(versions[-1].read_text())


def format_table(summaries: list[tuple[str, dict[str, Any]]]) -> str:
    """Format one row per run: parameters, compute, losses per type, wall-clock, peak memory."""
    header = ["run", "arch", "N", "N_v", "tokens", "FLOPs"] + [f"loss {c}" for c in LOSS_COLUMNS] + ["time s", "peak MiB"]
    rows = [header]
    for name, s in summaries:
        losses = s.get("val_loss", {})
        rows.append([
            name,
            s.get("architecture", "?"),
            _millions(s["parameters"]["N"]),
            _millions(s["parameters"]["N_v"]),
            f"{s['tokens']['D'] / 1e6:.2f}M",
            f"{s['flops']:.3g}",
            *[f"{losses[c]:.4f}" if c in losses else "-" for c in LOSS_COLUMNS],
            f"{s.get('wall_clock_seconds') or 0:.0f}",
            f"{(s.get('peak_memory_bytes') or 0) / 2**20:.0f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = [_routing_lines(name, s) for name, s in summaries if "routing" in s]
    return "\n".join(lines + [line for block in extra for line in block])


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _routing_lines(name: str, summary: dict[str, Any]) -> list[str]:
    scores = summary["routing"].get("specialization", {})
    if not scores:
        return []
    cells = ", ".join(f"{layer}: {score:.2f}" if score is not None else f"{layer}: -" for layer, score in scores.items())
    return [f"{name} expert specialisation per layer: {cells}"]
