"""`fusionlab sweep`: plan a scaling-law study, run it locally or on SLURM, and watch it.

fusionlab sweep plan recipes/sweeps/cpu_early_vs_late.yaml --out sweeps/cpu
fusionlab sweep run sweeps/cpu                       # locally, one run after another, resumable
fusionlab sweep run sweeps/cpu --launcher slurm --partition gpu --time-min 240 --gpus-per-task 1
fusionlab sweep status sweeps/cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from fusionlab.scaling.sweep import SpecError


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use KEY=VALUE, such as data.num_workers=2")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({error})") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid: use a positive number")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="sweep_command", metavar="{plan,run,status}", required=True)

    plan = commands.add_parser(
        "plan",
        help="expand a study spec into one resolved recipe per run and a manifest",
        description="Expand a study spec (architectures x widths x budgets) into DIR/recipes/*.yaml and "
        "DIR/manifest.json, with warmup and cooldown by the spec's rules, and print the runs and their "
        "estimated FLOPs.",
    )
    plan.add_argument(
        "spec", type=Path, help="study spec (YAML), such as recipes/sweeps/cpu_early_vs_late.yaml"
    )
    plan.add_argument("--out", type=Path, required=True, help="sweep folder to write")
    plan.add_argument(
        "--set", dest="overrides", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="recipe value for every run, as a dotted key and a YAML value (repeatable), such as "
        "data.tokenizer=tok.json",
    )
    plan.add_argument(
        "--workdir", type=Path, default=None,
        help="folder that relative paths in the recipes are relative to; runs start there "
        "(default: the current one)",
    )
    plan.add_argument("--force", action="store_true", help="replace a different plan already in the folder")

    run = commands.add_parser(
        "run",
        help="train the unfinished runs, locally or on SLURM",
        description="Train every run that is not finished: locally one after another (an interrupted run "
        "resumes from its last checkpoint), or as SLURM job arrays through submitit.",
    )
    run.add_argument("sweep_dir", type=Path, metavar="DIR", help="folder written by `fusionlab sweep plan`")
    run.add_argument(
        "--launcher", choices=("local", "slurm"), default="local", help="where to run (default: local)"
    )
    run.add_argument("--only", nargs="+", metavar="RUN", help="run only these run ids")
    run.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed")
    run.add_argument(
        "--run-timeout", type=_positive_float, metavar="SECONDS",
        help="local: stop a run after this many seconds (it resumes on the next launch)",
    )
    slurm = run.add_argument_group("SLURM (override the spec's slurm section)")
    slurm.add_argument(
        "--dry-run", action="store_true",
        help="write the job scripts under DIR/slurm/dry-run/ and submit nothing",
    )
    slurm.add_argument("--partition", help="partition")
    slurm.add_argument(
        "--time-min", type=int, help="time limit of one attempt, in minutes (longer runs requeue and resume)"
    )
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
    slurm.add_argument("--gpus-per-task", type=int, help="GPUs per process")
    slurm.add_argument("--mem-gb", type=float, help="memory per node, in GB")
    slurm.add_argument("--nodes", type=int, help="nodes per run (trainer.num_nodes)")
    slurm.add_argument(
        "--tasks-per-node", type=int, help="processes per node (trainer.devices for multi-GPU runs)"
    )
    slurm.add_argument("--container", help="container image to run in")
    slurm.add_argument(
        "--container-runtime", choices=("apptainer", "enroot"), help="how to start the container"
    )
    slurm.add_argument(
        "--sbatch", type=_key_value, action="append", default=[], metavar="OPTION=VALUE",
        help="extra sbatch option without the leading dashes, such as account=proj or qos=high (repeatable)",
    )
    slurm.add_argument("--setup", action="append", default=None, metavar="LINE",
                       help="shell line run before each run, such as 'module load cuda' (repeatable)")
    slurm.add_argument("--array-parallelism", type=int, help="runs of one array that may run at once")
    slurm.add_argument(
        "--signal-delay-s", type=int, help="seconds before the time limit at which a run is requeued"
    )
    slurm.add_argument("--max-requeues", type=int, help="requeues allowed per run after time limits")
    slurm.add_argument("--wait", action="store_true", help="wait until the submitted runs end")
    slurm.add_argument("--wait-timeout", type=_positive_float, default=24 * 3600.0, metavar="SECONDS",
                       help="give up waiting after this many seconds (default: 86400)")

    status = commands.add_parser(
        "status",
        help="show the state of each run",
        description="Show each run's state (planned, queued, running, finished, failed, cancelled, requeued, "
        "interrupted, blocked) from the markers the runs write and, for SLURM runs, squeue.",
    )
    status.add_argument(
        "sweep_dir", type=Path, metavar="DIR", help="folder written by `fusionlab sweep plan`"
    )
    status.add_argument("--json", action="store_true", help="print JSON, one object per run")
    status.add_argument("--no-squeue", dest="squeue", action="store_false", help="do not ask SLURM's squeue")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `sweep` command to a top-level `add_subparsers()` object and return its parser."""
    parser = subparsers.add_parser("sweep", help="plan, run and watch scaling-law sweeps",
                                   description=__doc__.split("\n")[0])
    _configure(parser)
    parser.set_defaults(func=main)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlab sweep", description=__doc__.split("\n")[0])
    _configure(parser)
    return parser


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run `fusionlab sweep` from parsed arguments or an argument list; return the exit status."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    handlers = {"plan": _plan, "run": _run, "status": _status}
    try:
        return handlers[args.sweep_command](args)
    except (SpecError, TimeoutError, FileNotFoundError) as error:
        print(f"fusionlab sweep {args.sweep_command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fusionlab sweep {args.sweep_command}: interrupted", file=sys.stderr)
        return 130


def _plan(args: argparse.Namespace) -> int:
    from fusionlab.scaling import sweep

    spec = sweep.load_spec(args.spec)
    plan = sweep.plan_study(spec, args.out, dict(args.overrides), args.workdir)
    manifest = sweep.write_plan(plan, args.out, force=args.force)
    print(sweep.format_plan(plan))
    print(f"wrote {manifest} and {len(plan.runs)} recipes; next: fusionlab sweep run {args.out}")
    return 0


def _slurm_options(args: argparse.Namespace, manifest: dict):
    from fusionlab.scaling.launch import SlurmOptions

    values = dict(manifest.get("slurm") or {})
    flags = {
        "partition": args.partition, "time_min": args.time_min, "cpus_per_task": args.cpus_per_task,
        "gpus_per_task": args.gpus_per_task, "mem_gb": args.mem_gb, "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
        "container": args.container, "container_runtime": args.container_runtime, "setup": args.setup,
        "array_parallelism": args.array_parallelism, "signal_delay_s": args.signal_delay_s,
        "max_requeues": args.max_requeues,
    }
    values.update({key: value for key, value in flags.items() if value is not None})
    values["sbatch"] = {**values.get("sbatch", {}), **dict(args.sbatch)}
    return SlurmOptions.from_mapping(values)


def _run(args: argparse.Namespace) -> int:
    from fusionlab.scaling import launch
    from fusionlab.scaling.sweep import load_manifest

    manifest = load_manifest(args.sweep_dir)
    if args.launcher == "local":
        result = launch.run_local(
            args.sweep_dir, args.only, retry_failed=not args.skip_failed, run_timeout_s=args.run_timeout
        )
        print(f"local launcher: {len(result.finished)} finished, {len(result.failed)} failed, "
              f"{len(result.blocked)} blocked, {len(result.skipped)} skipped")
        return 1 if result.failed or result.blocked else 0

    options = _slurm_options(args, manifest)
    submissions = launch.submit_slurm(
        args.sweep_dir, options, args.only, retry_failed=not args.skip_failed, dry_run=args.dry_run
    )
    if args.wait and submissions and not args.dry_run:
        ids = [run_id for submission in submissions for run_id in submission["tasks"]]
        states = launch.wait_for_runs(args.sweep_dir, ids, args.wait_timeout)
        _print_states(states)
        return 0 if all(state.state == "finished" for state in states) else 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from fusionlab.scaling import launch
    from fusionlab.scaling.sweep import load_manifest

    submitted = bool(launch.load_submissions(args.sweep_dir.resolve()))
    squeue = launch.query_squeue() if args.squeue and submitted else None
    states = launch.run_states(args.sweep_dir, squeue)
    if args.json:
        print(json.dumps([asdict(state) for state in states], indent=1))
        return 0
    _print_states(states)
    counts = Counter(state.state for state in states)
    print("  ".join(f"{name}: {count}" for name, count in sorted(counts.items())))
    for line in _best_learning_rates(load_manifest(args.sweep_dir), states):
        print(line)
    data_points = [s for s in states if s.kind != "trunk"]
    if data_points and all(s.state == "finished" for s in data_points):
        for architecture in sorted({s.architecture for s in data_points}):
            folder = args.sweep_dir / "runs" / architecture
            print(f"fit: fusionlab scaling fit {folder} --out {args.sweep_dir / 'fits' / architecture}")
    return 0


def _best_learning_rates(manifest: dict, states) -> list[str]:
    """Name the best finished learning rate of each (architecture, width, budget) swept over rates."""
    losses = {s.id: s.val_loss for s in states if s.val_loss is not None}
    groups: dict[tuple, list[dict]] = {}
    for run in manifest["runs"]:
        if run["kind"] != "trunk":
            groups.setdefault((run["architecture"], run["width"], run["budget"]), []).append(run)
    lines = []
    for (architecture, width, budget), runs in sorted(groups.items()):
        done = [run for run in runs if run["id"] in losses]
        if len({run["lr"] for run in runs}) < 2 or not done:
            continue
        best = min(done, key=lambda run: losses[run["id"]])
        tried = ", ".join(f"{run['lr']:g}: {losses[run['id']]:.4f}" for run in done)
        lines.append(
            f"best lr {architecture} width {width} budget {budget:g}: {best['lr']:g} (mean val loss {tried})"
        )
    return lines


def _print_states(states) -> None:
    rows = [("run", "kind", "state", "step", "attempts", "val loss", "detail / log")]
    for s in states:
        progress = f"{s.step if s.step is not None else '-'}/{s.steps}"
        loss = f"{s.val_loss:.4f}" if s.val_loss is not None else "-"
        note = s.detail
        if s.state in ("failed", "cancelled", "interrupted") and s.log:
            note = f"{note}; log {s.log}" if note else f"log {s.log}"
        rows.append((s.id, s.kind, s.state, progress, str(s.attempts), loss, note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])
