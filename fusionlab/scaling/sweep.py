"""Plan scaling-law sweeps: a study spec in, one resolved recipe per run and a manifest out.

A study spec (YAML, see recipes/sweeps/) names architectures, each with a base recipe and a peak
learning rate per width, and token budgets (or training steps, or compute budgets for an IsoFLOP
study). `plan_study` crosses them into runs and sets, per run, what a scaling study must control:

- trainer.max_steps from the budget: steps = tokens / (batch_size * context * devices * num_nodes);
- the warmup-stable-decay schedule: warmup steps by run length from a table (by default the one of
  Shukor et al. 2025: 1k steps for runs under 5k steps, 2.5k up to 15k, 5k beyond) and a cooldown
  over the last `cooldown_fraction` of the steps;
- model.lr from the width's entry in the spec;
- a fixed log folder per run (TensorBoardLogger save_dir, name and version), so that resuming and
  collecting results find it again, and periodic checkpoints for resuming.

With `branch_cooldowns`, the budgets of one width share a trunk run at constant learning rate.
Each budget of T steps becomes a branch that starts from the trunk's checkpoint at step
ceil(T * (1 - cooldown_fraction)) and runs only the cooldown. Under warmup-stable-decay a branch
follows the same learning-rate curve as a separate run of T steps, except that every branch has the
trunk's warmup, which the longest budget sets. The trunk is the longest budget's run, stopped at its
last branch step, which is before its own cooldown begins.

Layout of a planned sweep folder:

    DIR/manifest.json                 the runs, in launch order, and the FLOPs estimate
    DIR/spec.yaml                     the study spec as read
    DIR/recipes/RUN.yaml              one resolved recipe per run
    DIR/runs/ARCH/RUN/                log folder of a run: summary.json, checkpoints/, markers/
    DIR/trunks/ARCH/RUN/              log folders of trunks (not scaling-law data points)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "fusionlab-sweep"
MANIFEST_VERSION = 1
DEFAULT_WIDTH_KEYS = {"model.backbone.init_args.d_model": 1.0}
MARKERS_CALLBACK = "fusionlab.training.markers.RunMarkers"
BRANCH_CHECKPOINT_CALLBACK = "fusionlab.training.markers.CheckpointAtSteps"

# Recipe keys the planner sets for every run. A spec that sets them itself is rejected, because
# the plan (warmup rule, budgets, fixed log folders) would then no longer describe the runs.
PLANNED_KEYS = (
    "trainer.max_steps",
    "trainer.logger",
    "model.lr",
    "model.warmup_steps",
    "model.cooldown_fraction",
)

BudgetKind = Literal["tokens", "steps", "flops"]
RunKind = Literal["run", "trunk", "branch"]


class SpecError(ValueError):
    """A study spec is invalid: the message names the key, the value and the fix."""


# ----------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class WarmupRule:
    """Warmup length for runs shorter than `below_steps` (None: every longer run)."""

    warmup_steps: int
    below_steps: int | None = None


# Shukor et al. 2025 (arXiv 2504.07951), training setup: 1k warmup steps for short runs, 2.5k for
# runs of 5k-15k steps, at most 5k.
PAPER_WARMUP = (
    WarmupRule(warmup_steps=1000, below_steps=5000),
    WarmupRule(warmup_steps=2500, below_steps=15000),
    WarmupRule(warmup_steps=5000),
)


def warmup_steps_for(steps: int, rules: Sequence[WarmupRule]) -> int:
    """Return the warmup length of a run of `steps` steps: the first rule whose bound it is under."""
    for rule in rules:
        if rule.below_steps is None or steps < rule.below_steps:
            return rule.warmup_steps
    raise SpecError(
        f"no warmup rule covers runs of {steps} steps; end schedule.warmup with a row without below_steps"
    )


@dataclass(frozen=True)
class Width:
    """One model width of an architecture: its peak learning rates and recipe changes."""

    width: int
    lrs: tuple[float, ...]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    recipe: Path | None = None  # replaces the architecture's base recipe for this width


@dataclass(frozen=True)
class Architecture:
    name: str
    recipe: Path
    widths: tuple[Width, ...]
    width_keys: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WIDTH_KEYS))
    overrides: Mapping[str, Any] = field(default_factory=dict)
    warmup: tuple[WarmupRule, ...] | None = None  # None: the study's rule


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    architectures: tuple[Architecture, ...]
    budget_kind: BudgetKind
    budgets: tuple[float, ...]
    warmup: tuple[WarmupRule, ...] = PAPER_WARMUP
    cooldown_fraction: float = 0.2
    branch_cooldowns: bool = False
    checkpoint_every_steps: int | None = None  # None: about ten checkpoints per run
    heartbeat_every_s: float = 30.0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    slurm: Mapping[str, Any] = field(default_factory=dict)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec. Relative recipe paths are relative to the spec file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SpecError(f"cannot read the study spec {path}: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a study spec must be a YAML mapping, got {type(raw).__name__}")
    return parse_spec(raw, path)


_SPEC_KEYS = {"study", "description", "architectures", "budgets", "schedule", "set", "checkpoint_every_steps",
              "heartbeat_every_s", "slurm"}
_ARCH_KEYS = {"recipe", "widths", "width_keys", "set", "warmup"}
_WIDTH_KEYS = {"lr", "set", "recipe"}
_SCHEDULE_KEYS = {"warmup", "cooldown_fraction", "branch_cooldowns"}


def parse_spec(raw: Mapping[str, Any], path: Path) -> StudySpec:
    """Validate a spec already read from YAML (see load_spec)."""
    _check_keys(raw, _SPEC_KEYS, f"{path}")

    name = raw.get("study") or path.stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"{path}: study name {name!r} is invalid; use letters, digits, '-' and '_'")
    architectures = raw.get("architectures")
    if not isinstance(architectures, dict) or not architectures:
        raise SpecError(
            f"{path}: 'architectures' must map names to {{recipe, widths}}, got {architectures!r}"
        )

    schedule = raw.get("schedule") or {}
    _check_keys(schedule, _SCHEDULE_KEYS, f"{path}: schedule")
    warmup = PAPER_WARMUP
    if "warmup" in schedule:
        warmup = _parse_warmup(schedule["warmup"], f"{path}: schedule.warmup")
    cooldown_fraction = float(schedule.get("cooldown_fraction", 0.2))
    if not 0 < cooldown_fraction < 1:
        raise SpecError(
            f"{path}: schedule.cooldown_fraction = {cooldown_fraction} is invalid; "
            "use a fraction in (0, 1) such as 0.2"
        )

    kind, budgets = _parse_budgets(raw.get("budgets"), path)
    checkpoint_every = raw.get("checkpoint_every_steps")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise SpecError(f"{path}: checkpoint_every_steps = {checkpoint_every!r} must be a positive integer")
    overrides = _parse_overrides(raw.get("set"), f"{path}: set")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SpecError(f"{path}: 'slurm' must be a mapping of launcher options, got {slurm!r}")
    from fusionlab.scaling.launch import SlurmOptions  # launch imports this module

    SlurmOptions.from_mapping(slurm)  # rejects unknown or invalid options now, not at submission

    return StudySpec(
        name=name,
        path=path,
        architectures=tuple(_parse_architecture(n, a, path) for n, a in architectures.items()),
        budget_kind=kind,
        budgets=budgets,
        warmup=warmup,
        cooldown_fraction=cooldown_fraction,
        branch_cooldowns=bool(schedule.get("branch_cooldowns", False)),
        checkpoint_every_steps=checkpoint_every,
        heartbeat_every_s=float(raw.get("heartbeat_every_s", 30.0)),
        overrides=overrides,
        slurm=dict(slurm),
    )


def _check_keys(raw: Any, allowed: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _parse_architecture(name: str, raw: Any, path: Path) -> Architecture:
    where = f"{path}: architectures.{name}"
    if not str(name).replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"{where}: the name is invalid; use letters, digits, '-' and '_'")
    _check_keys(raw, _ARCH_KEYS, where)
    if "recipe" not in raw:
        raise SpecError(f"{where}: missing 'recipe', the base recipe (YAML) of this architecture")
    widths = raw.get("widths")
    if not isinstance(widths, dict) or not widths:
        raise SpecError(f"{where}: 'widths' must map each width to {{lr: ...}}, got {widths!r}")
    width_keys = raw.get("width_keys", DEFAULT_WIDTH_KEYS)
    if not isinstance(width_keys, dict) or not width_keys:
        raise SpecError(
            f"{where}: width_keys must map recipe keys to multipliers of the width, got {width_keys!r}"
        )
    return Architecture(
        name=str(name),
        recipe=_relative_to(path, raw["recipe"]),
        widths=tuple(_parse_width(w, v, path, where) for w, v in widths.items()),
        width_keys={str(k): float(v) for k, v in width_keys.items()},
        overrides=_parse_overrides(raw.get("set"), f"{where}.set"),
        warmup=_parse_warmup(raw["warmup"], f"{where}.warmup") if "warmup" in raw else None,
    )


def _parse_width(width: Any, raw: Any, path: Path, where: str) -> Width:
    where = f"{where}.widths.{width}"
    if not isinstance(width, int) or width < 1:
        raise SpecError(f"{where}: a width must be a positive integer, got {width!r}")
    _check_keys(raw, _WIDTH_KEYS, where)
    if "lr" not in raw:
        raise SpecError(
            f"{where}: missing 'lr', the peak learning rate of this width (a list runs a learning-rate sweep)"
        )
    lrs = raw["lr"] if isinstance(raw["lr"], list) else [raw["lr"]]
    try:
        lrs = tuple(float(lr) for lr in lrs)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: lr = {raw['lr']!r} must be a number or a list of numbers") from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise SpecError(f"{where}: lr = {raw['lr']!r} must be positive")
    recipe = _relative_to(path, raw["recipe"]) if "recipe" in raw else None
    return Width(width, lrs, _parse_overrides(raw.get("set"), f"{where}.set"), recipe)


def _parse_warmup(raw: Any, where: str) -> tuple[WarmupRule, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{where} must be a list of {{below_steps, warmup_steps}} rows, got {raw!r}")
    rules = []
    for row in raw:
        _check_keys(row, {"below_steps", "warmup_steps"}, where)
        steps, below = row.get("warmup_steps"), row.get("below_steps")
        if not isinstance(steps, int) or steps < 0:
            raise SpecError(f"{where}: warmup_steps = {steps!r} must be an integer >= 0")
        if below is not None and (not isinstance(below, int) or below < 1):
            raise SpecError(f"{where}: below_steps = {below!r} must be a positive integer")
        rules.append(WarmupRule(steps, below))
    if rules[-1].below_steps is not None:
        raise SpecError(
            f"{where}: the last row must have no below_steps, so that every run length is covered"
        )
    return tuple(rules)


def _parse_budgets(raw: Any, path: Path) -> tuple[BudgetKind, tuple[float, ...]]:
    where = f"{path}: budgets"
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("tokens", "steps", "flops"):
        raise SpecError(
            f"{where} must have exactly one of tokens, steps or flops (a list, or {{min, max, count}} for "
            f"log-spaced values), got {raw!r}"
        )
    kind, values = next(iter(raw.items()))
    if isinstance(values, dict):
        _check_keys(values, {"min", "max", "count"}, f"{where}.{kind}")
        low, high, count = float(values["min"]), float(values["max"]), int(values["count"])
        if not 0 < low <= high or count < 1:
            raise SpecError(f"{where}.{kind}: need 0 < min <= max and count >= 1, got {values}")
        values = [low * (high / low) ** (i / max(count - 1, 1)) for i in range(count)]
    if not isinstance(values, list) or not values:
        raise SpecError(f"{where}.{kind} must be a non-empty list, got {values!r}")
    try:
        budgets = tuple(sorted({float(v) for v in values}))
    except (TypeError, ValueError):
        raise SpecError(f"{where}.{kind}: every budget must be a number, got {values!r}") from None
    if budgets[0] <= 0:
        raise SpecError(f"{where}.{kind}: budgets must be positive, got {budgets[0]}")
    return kind, budgets


def _parse_overrides(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must map dotted recipe keys to values, got {raw!r}")
    for key in raw:
        planned = [k for k in PLANNED_KEYS if key == k or key.startswith(k + ".") or k.startswith(key + ".")]
        if planned:
            raise SpecError(
                f"{where}: {key} is set by the planner ({planned[0]}); change the budgets, widths or "
                "schedule in the spec instead"
            )
    return dict(raw)


def _relative_to(spec_path: Path, value: Any) -> Path:
    if not isinstance(value, str):
        raise SpecError(f"{spec_path}: a recipe must be a path string, got {value!r}")
    return (spec_path.parent / value).resolve()


# ------------------------------------------------------------------------------- recipe keys


def set_key(recipe: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating missing levels; an integer part indexes a list."""
    parts = dotted.split(".")
    node: Any = recipe
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        child = node.get(part)
        if not isinstance(child, (dict, list)):
            child = node[part] = {}
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def get_key(recipe: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return default
    return node


def _list_index(node: list, part: str, parts: Sequence[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SpecError(f"recipe key {'.'.join(parts)}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


@functools.cache
def _read_recipe(path: Path) -> dict:
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SpecError(f"cannot read the recipe {path}: {error}") from None
    if not isinstance(recipe, dict):
        raise SpecError(f"recipe {path} must be a YAML mapping")
    return recipe


def tokens_per_step(recipe: Mapping, source: str) -> int:
    """Positions per optimiser step: batch_size * context * devices * num_nodes."""
    batch_size, context = get_key(recipe, "data.batch_size"), get_key(recipe, "data.context")
    devices, nodes = get_key(recipe, "trainer.devices", 1), get_key(recipe, "trainer.num_nodes", 1)
    if isinstance(devices, list):
        devices = len(devices)
    for name, value in (("data.batch_size", batch_size), ("data.context", context),
                        ("trainer.devices", devices), ("trainer.num_nodes", nodes)):
        if not isinstance(value, int) or value < 1:
            raise SpecError(
                f"{source}: {name} = {value!r}; a sweep needs it as a positive integer to turn token "
                "budgets into steps, so set it in the recipe or the spec's 'set'"
            )
    return batch_size * context * devices * nodes


# ------------------------------------------------------------------------- parameter counts


def count_parameters(recipe: Mapping) -> tuple[int, int]:
    """Return (N, N_v) of the recipe's backbone, built on the meta device (no memory, no init).

    The values the command line links from the data section (vocab_size from data.tokenizer,
    image_size, patch_size) are filled in the same way.
    """
    backbone = get_key(recipe, "model.backbone")
    if not isinstance(backbone, Mapping) or "class_path" not in backbone:
        raise SpecError(f"the recipe has no model.backbone.class_path: {backbone!r}")
    args = dict(backbone.get("init_args") or {})
    args.setdefault("vocab_size", _vocab_size(get_key(recipe, "data.tokenizer", "byte")))
    for key in ("image_size", "patch_size"):
        if get_key(recipe, f"data.{key}") is not None:
            args.setdefault(key, get_key(recipe, f"data.{key}"))
    return _count(backbone["class_path"], json.dumps(args, sort_keys=True))


@functools.cache
def _vocab_size(tokenizer: str) -> int:
    from fusionlab.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer).vocab_size
    except (OSError, ValueError) as error:
        raise SpecError(
            f"cannot load data.tokenizer = {tokenizer!r} to count parameters ({error}); point it at the "
            "tokenizer file, for example with --set data.tokenizer=PATH"
        ) from None


@functools.cache
def _count(class_path: str, args_json: str) -> tuple[int, int]:
    import torch

    cls = _backbone_class(class_path)
    with torch.device("meta"):
        counts = cls(**json.loads(args_json)).parameter_counts()
    return int(counts.N), int(counts.N_v)


def _backbone_class(class_path: str) -> type:
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise SpecError(f"cannot import the backbone {class_path!r}: {error}") from None
    from fusionlab.plugins import discover

    for architecture in discover().values():
        if architecture.cls is not None and architecture.cls.__name__ == class_path:
            return architecture.cls
    raise SpecError(f"backbone class {class_path!r} not found; use its full module path")


# ---------------------------------------------------------------------------------- planning


@dataclass
class PlannedRun:
    """One entry of the manifest: a training run, a trunk or a cooldown branch."""

    id: str
    kind: RunKind
    architecture: str
    width: int
    lr: float
    steps: int
    warmup_steps: int
    cooldown_start: float  # step where the cooldown starts (steps itself for a trunk)
    tokens: int  # planned positions, padding included (the summary's D counts non-padding ones)
    N: int
    N_v: int
    flops: float  # estimate 6 (N + N_v) * tokens of the steps this entry trains itself
    recipe: str  # relative to the sweep folder
    log_dir: str  # relative to the sweep folder
    budget: float  # the spec's budget (tokens, steps or FLOPs) this run stands for
    trunk: str | None = None  # branch: the trunk it starts from
    start_step: int = 0  # branch: the trunk step it starts from
    branch_steps: list[int] = field(default_factory=list)  # trunk: steps where branches start


@dataclass
class Plan:
    spec: StudySpec
    workdir: Path
    runs: list[PlannedRun]
    recipes: dict[str, dict]  # run id -> resolved recipe

    def by_id(self) -> dict[str, PlannedRun]:
        return {run.id: run for run in self.runs}

    def flops_summary(self) -> dict[str, float]:
        """Estimated training FLOPs of the plan against training every budget as a separate run."""
        planned = sum(run.flops for run in self.runs)
        # a separate run of a branch's budget trains all its steps, which run.tokens counts
        separate = sum(6.0 * (run.N + run.N_v) * run.tokens for run in self.runs if run.kind != "trunk")
        saving = separate / planned if planned else 1.0
        return {"planned": planned, "separate_runs": separate, "saving": saving}


def branch_checkpoint(trunk_log_dir: str, step: int) -> str:
    """Path (relative to the sweep folder) of the trunk checkpoint a branch starts from."""
    return f"{trunk_log_dir}/checkpoints/branch-step={step}.ckpt"


def plan_study(
    spec: StudySpec,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    workdir: str | Path | None = None,
) -> Plan:
    """Expand a study spec into runs and resolved recipes, writing nothing (see write_plan).

    `overrides` (dotted keys) apply to every run after the spec's own. `workdir` is the folder that
    relative paths in the recipes (shards, tokenizer files) are relative to: the current one by
    default.
    """
    out_dir = Path(out_dir).resolve()
    overrides = _parse_overrides(dict(overrides or {}), "--set")
    runs: list[PlannedRun] = []
    recipes: dict[str, dict] = {}
    for arch in spec.architectures:
        for width in arch.widths:
            base = _width_recipe(spec, arch, width, overrides)
            N, N_v = count_parameters(base)
            step_tokens = tokens_per_step(base, f"{arch.name} width {width.width}")
            for lr in width.lrs:
                group = _plan_group(spec, arch, width, lr, base, N, N_v, step_tokens, out_dir)
                for run, recipe in group:
                    if run.id in recipes:
                        raise SpecError(
                            f"two runs share the id {run.id!r}; give the widths or budgets distinct values"
                        )
                    runs.append(run)
                    recipes[run.id] = recipe
    # trunks first, so that a sequential launcher never reaches a branch before its trunk
    runs.sort(key=lambda run: run.kind != "trunk")
    return Plan(spec, Path(workdir or os.getcwd()).resolve(), runs, recipes)


def _width_recipe(spec: StudySpec, arch: Architecture, width: Width, overrides: Mapping[str, Any]) -> dict:
    recipe = copy.deepcopy(_read_recipe(width.recipe or arch.recipe))
    for source in (spec.overrides, arch.overrides, width.overrides, overrides):
        for key, value in source.items():
            set_key(recipe, key, copy.deepcopy(value))
    for key, multiplier in arch.width_keys.items():
        value = width.width * multiplier
        if abs(value - round(value)) > 1e-9:
            raise SpecError(
                f"architecture {arch.name}: width {width.width} x {multiplier} for {key} is not an integer; "
                "pick widths that the multipliers divide"
            )
        set_key(recipe, key, int(round(value)))
    return recipe


def _plan_group(spec, arch, width, lr, base, N, N_v, step_tokens, out_dir):
    """Plan the runs of one (architecture, width, learning rate): separate runs or trunk + branches."""
    prefix = f"{arch.name}_w{width.width}" + (f"_lr{lr:g}" if len(width.lrs) > 1 else "")
    budgets = [(budget, _budget_steps(spec, budget, N + N_v, step_tokens)) for budget in spec.budgets]
    warmup_rule = arch.warmup or spec.warmup
    f = spec.cooldown_fraction
    planned: list[tuple[PlannedRun, dict]] = []
    if not spec.branch_cooldowns:
        for budget, steps in budgets:
            run = _run(spec, arch, width, lr, N, N_v, step_tokens, budget, steps,
                       f"{prefix}_{_budget_label(spec.budget_kind, budget)}", "run",
                       warmup_steps_for(steps, warmup_rule))
            _check_warmup(run)
            planned.append((run, _run_recipe(spec, base, run, out_dir)))
        return planned

    # branches share the trunk's warmup, which the longest budget sets
    warmup = warmup_steps_for(max(steps for _, steps in budgets), warmup_rule)
    trunk_id = f"{prefix}_trunk"
    branches = []
    for budget, steps in budgets:
        run = _run(spec, arch, width, lr, N, N_v, step_tokens, budget, steps,
                   f"{prefix}_{_budget_label(spec.budget_kind, budget)}", "branch", warmup)
        run.start_step = math.ceil(steps * (1.0 - f))  # the same float wsd_factor compares with
        if run.start_step >= steps:
            raise SpecError(
                f"run {run.id}: {steps} steps leave no cooldown step at cooldown_fraction {f}; "
                "raise the budget"
            )
        run.trunk = trunk_id
        run.flops *= (steps - run.start_step) / steps
        _check_warmup(run)
        branches.append(run)
    # The trunk is the longest budget's run, stopped where its cooldown would start: with the same
    # schedule hyperparameters as every branch, its learning rate is constant after the warmup.
    longest = max(steps for _, steps in budgets)
    trunk_steps = max(run.start_step for run in branches)
    trunk = _run(
        spec, arch, width, lr, N, N_v, step_tokens, max(spec.budgets), trunk_steps, trunk_id, "trunk", warmup
    )
    trunk.cooldown_start = longest * (1.0 - f)
    trunk.branch_steps = sorted({run.start_step for run in branches})
    planned.append((trunk, _run_recipe(spec, base, trunk, out_dir, max_steps=longest)))
    planned += [(run, _run_recipe(spec, base, run, out_dir)) for run in branches]
    return planned


def _run(spec, arch, width, lr, N, N_v, step_tokens, budget, steps, run_id, kind, warmup) -> PlannedRun:
    folder = "trunks" if kind == "trunk" else "runs"
    return PlannedRun(
        id=run_id,
        kind=kind,
        architecture=arch.name,
        width=width.width,
        lr=lr,
        steps=steps,
        warmup_steps=warmup,
        cooldown_start=steps * (1.0 - spec.cooldown_fraction),
        tokens=steps * step_tokens,
        N=N,
        N_v=N_v,
        flops=6.0 * (N + N_v) * steps * step_tokens,
        recipe=f"recipes/{run_id}.yaml",
        log_dir=f"{folder}/{arch.name}/{run_id}",
        budget=budget,
    )


def _check_warmup(run: PlannedRun) -> None:
    first_decay = run.start_step if run.kind == "branch" else run.cooldown_start
    if run.warmup_steps > first_decay:
        shared = " (branches share the warmup of the longest budget)" if run.kind == "branch" else ""
        raise SpecError(
            f"run {run.id}: {run.warmup_steps} warmup steps{shared} do not end before the cooldown "
            f"starts at step {first_decay:g} of {run.steps}; raise the smallest budget, shorten the "
            "warmup rows in schedule.warmup, or turn off branch_cooldowns"
        )


def _budget_steps(spec: StudySpec, budget: float, N_total: int, step_tokens: int) -> int:
    if spec.budget_kind == "steps":
        steps = budget
    elif spec.budget_kind == "tokens":
        steps = budget / step_tokens
    else:  # IsoFLOP: C = 6 N D with N all parameters, vision encoder included
        steps = budget / (6.0 * N_total * step_tokens)
    steps = int(round(steps))
    if steps < 1:
        raise SpecError(
            f"budget {budget:g} ({spec.budget_kind}) is less than one step of {step_tokens} positions; "
            "raise it or lower data.batch_size * data.context"
        )
    return steps


def _budget_label(kind: BudgetKind, value: float) -> str:
    if kind == "steps":
        return f"s{int(value)}"
    if kind == "flops":
        return f"c{value:.2e}".replace("+", "")
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"t{value / scale:.4g}{unit}"
    return f"t{value:.4g}"


def _run_recipe(
    spec: StudySpec, base: dict, run: PlannedRun, out_dir: Path, max_steps: int | None = None
) -> dict:
    """Build a run's recipe. A trunk gets the longest budget as max_steps and stops at its last branch."""
    recipe = copy.deepcopy(base)
    log_dir = out_dir / run.log_dir
    set_key(recipe, "trainer.max_steps", max_steps or run.steps)
    set_key(recipe, "trainer.logger", {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": str(log_dir.parent.parent), "name": log_dir.parent.name, "version": log_dir.name,
        },
    })
    set_key(recipe, "model.lr", run.lr)
    set_key(recipe, "model.warmup_steps", run.warmup_steps)
    # NOTE: trunk and branches share every model hyperparameter, because LightningCLI (lightning 2.6)
    # replaces the model section of a run started with --ckpt_path FILE by the one stored in FILE.
    set_key(recipe, "model.cooldown_fraction", spec.cooldown_fraction)

    every = spec.checkpoint_every_steps or max(1, run.steps // 10)
    set_key(recipe, "checkpoint.every_n_train_steps", every)
    set_key(recipe, "checkpoint.save_last", True)

    callbacks = list(get_key(recipe, "trainer.callbacks") or [])
    callbacks.append({
        "class_path": MARKERS_CALLBACK,
        "init_args": {"directory": str(log_dir / "markers"), "heartbeat_every_s": spec.heartbeat_every_s},
    })
    if run.kind == "trunk":
        # a trunk is no data point: no validation, but a checkpoint at each branch's start
        set_key(recipe, "trainer.limit_val_batches", 0)
        set_key(recipe, "trainer.num_sanity_val_steps", 0)
        callbacks.append({
            "class_path": BRANCH_CHECKPOINT_CALLBACK,
            "init_args": {
                "steps": run.branch_steps, "dirpath": str(log_dir / "checkpoints"), "stop_after_last": True,
            },
        })
    else:
        # validate once, at the last step: that loss is the run's data point
        set_key(recipe, "trainer.val_check_interval", run.steps)
        set_key(recipe, "trainer.check_val_every_n_epoch", None)
    set_key(recipe, "trainer.callbacks", callbacks)
    return recipe


# ------------------------------------------------------------------------------ the manifest


def write_plan(plan: Plan, out_dir: str | Path, force: bool = False) -> Path:
    """Write DIR/recipes/*.yaml, DIR/spec.yaml and DIR/manifest.json, and return the manifest path.

    A folder that already contains a different plan is rejected unless `force`. With `force`, the
    log folders of runs whose entry or recipe changed are renamed to LOG_DIR.replaced-TIME, so that
    their old results are kept but never taken for the new runs' results.
    """
    out_dir = Path(out_dir).resolve()
    manifest_path = out_dir / MANIFEST_FILE
    document = manifest_document(plan)
    if manifest_path.exists():
        previous = {run["id"]: run for run in json.loads(manifest_path.read_text()).get("runs", [])}
        changed = [run for run in document["runs"] if run["id"] in previous and previous[run["id"]] != run]
        added = [run for run in document["runs"] if run["id"] not in previous]
        if (changed or added or len(previous) != len(document["runs"])) and not force:
            raise SpecError(
                f"{out_dir} already contains a different sweep plan; plan into a new folder, or pass --force "
                "to replace it (the log folders of changed runs are renamed, not deleted)"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for run in changed:
            log_dir = out_dir / run["log_dir"]
            if log_dir.exists():
                log_dir.rename(log_dir.with_name(f"{log_dir.name}.replaced-{stamp}"))

    (out_dir / "recipes").mkdir(parents=True, exist_ok=True)
    for run in plan.runs:
        (out_dir / run.recipe).write_text(_recipe_text(plan, run))
    (out_dir / "spec.yaml").write_text(plan.spec.path.read_text())
    _write_json(manifest_path, document)
    return manifest_path


def _recipe_text(plan: Plan, run: PlannedRun) -> str:
    header = f"# {run.kind} {run.id} of study {plan.spec.name}, written by `fusionlab sweep plan`\n"
    return header + yaml.safe_dump(plan.recipes[run.id], sort_keys=False)


def manifest_document(plan: Plan) -> dict:
    runs = []
    for run in plan.runs:
        entry = asdict(run)
        # the recipe's digest, so that a changed recipe counts as a changed run
        entry["recipe_sha256"] = hashlib.sha256(_recipe_text(plan, run).encode()).hexdigest()
        if run.trunk is not None:
            trunk = plan.by_id()[run.trunk]
            entry["start_checkpoint"] = branch_checkpoint(trunk.log_dir, run.start_step)
        runs.append(entry)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "study": plan.spec.name,
        "spec": str(plan.spec.path.resolve()),
        "workdir": str(plan.workdir),
        "budget_kind": plan.spec.budget_kind,
        "cooldown_fraction": plan.spec.cooldown_fraction,
        "branch_cooldowns": plan.spec.branch_cooldowns,
        "heartbeat_every_s": plan.spec.heartbeat_every_s,
        "slurm": dict(plan.spec.slurm),
        "flops": plan.flops_summary(),
        "runs": runs,
    }


def load_manifest(sweep_dir: str | Path) -> dict:
    """Read DIR/manifest.json, checking that it is a fusionlab sweep manifest."""
    path = Path(sweep_dir) / MANIFEST_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(
            f"{path} not found; write it with `fusionlab sweep plan SPEC --out {sweep_dir}`"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise SpecError(f"cannot read {path}: {error}") from None
    if document.get("format") != MANIFEST_FORMAT or document.get("version") != MANIFEST_VERSION:
        raise SpecError(f"{path} is not a version-{MANIFEST_VERSION} fusionlab sweep manifest")
    return document


def _write_json(path: Path, document: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def format_plan(plan: Plan) -> str:
    """Format the planned runs and the FLOPs estimate as a table for the command line."""
    lines = [f"study {plan.spec.name}: {len(plan.runs)} runs"]
    header = ("run", "kind", "N", "lr", "steps", "warmup", "cooldown from", "tokens", "FLOPs")
    rows = [header]
    for run in plan.runs:
        start = f"{run.start_step} (branch)" if run.kind == "branch" else (
            "-" if run.kind == "trunk" else f"{run.cooldown_start:g}")
        rows.append((run.id, run.kind, f"{run.N + run.N_v:.3g}", f"{run.lr:g}", str(run.steps),
                     str(run.warmup_steps), start, f"{run.tokens:.3g}", f"{run.flops:.3g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    flops = plan.flops_summary()
    lines.append(f"estimated training FLOPs (6 N D, N with the vision encoder): {flops['planned']:.3g}")
    if plan.spec.branch_cooldowns:
        lines.append(
            "branching cooldowns off constant-rate trunks: separate runs would take "
            f"{flops['separate_runs']:.3g}, a saving of {flops['saving']:.2f}x"
        )
    return "\n".join(lines)


def iter_runs(manifest: Mapping[str, Any], ids: Iterable[str] | None = None) -> list[dict]:
    """Return the manifest's runs in launch order, optionally only the given ids (checked)."""
    runs = list(manifest["runs"])
    if ids is None:
        return runs
    requested = set(ids)
    unknown = sorted(requested - {run["id"] for run in runs})
    if unknown:
        raise SpecError(f"unknown run ids {unknown}; `fusionlab sweep status DIR` lists them")
    return [run for run in runs if run["id"] in requested]
