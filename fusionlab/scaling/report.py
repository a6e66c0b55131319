"""Read run results, run every analysis of the scaling toolkit and write fit.json, fit.md and plots.

Inputs are fusionlab run summaries (summary.json, or folders searched recursively for them) or a
CSV with columns N, D, loss and optionally `type` and `C`. For a summary, N is parameters.N +
parameters.N_v: total active parameters with the vision encoder included, the convention Shukor
et al. (2025) use for late fusion. D is tokens.D and the loss is val_loss[type].
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionlab.scaling import approaches
from fusionlab.scaling.fit import (
    HUBER_DELTA,
    PARAM_NAMES,
    ScalingLawParams,
    bootstrap_fits,
    fit_scaling_law,
    goodness_of_fit,
    held_out_check,
    make_grid,
)

log = logging.getLogger(__name__)

FORMAT = "fusionlab-scaling-fit"
FORMAT_VERSION = 1
DEFAULT_TYPE = "mean"
CSV_LOSS_TYPE = "loss"  # the type name of a CSV without a `type` column
CONVENTIONS = {
    "N": "parameters.N + parameters.N_v of each summary: total active parameters, vision encoder "
    "included (the late-fusion convention of Shukor et al. 2025); the N column of a CSV",
    "D": "tokens.D of each summary; the D column of a CSV",
    "C": "flops of each summary or the C column of a CSV, else 6 N D; used for IsoFLOP groups, "
    "the loss-compute frontier and plots",
    "compute_optimal": "closed-form N*, D* minimise L(N, D) subject to C = 6 N D",
}


class InputError(ValueError):
    """An input file is missing, unreadable or lacks a required key."""


@dataclass(frozen=True)
class Run:
    """One training run: its sizes, compute and final validation losses per data type."""

    N: float
    D: float
    C: float
    losses: dict[str, float]
    source: str  # file, with a row number for CSV input
    flops_reported: bool  # False when C was derived as 6 N D
    architecture: str | None = None
    from_csv: bool = False


# ----------------------------------------------------------------------------- reading inputs


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Read runs from summary.json files, folders searched recursively for summary.json, or CSV files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.rglob("summary.json"))
            if not found:
                raise InputError(f"no summary.json found under folder {path}; pass run folders or a CSV file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"input {path} not found; pass summary.json files, run folders or a CSV file")

    runs: list[Run] = []
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        runs.extend(_read_csv(path) if path.suffix.lower() == ".csv" else [_read_summary(path)])
    if not runs:
        raise InputError(f"the inputs {list(map(str, paths))} hold no runs")
    return runs


def _lookup(data: dict, keys: str, path: Path):
    value = data
    for key in keys.split("."):
        if not isinstance(value, dict) or key not in value:
            raise InputError(
                f"{path}: missing key {keys!r}; fusionlab training runs write it to summary.json"
            )
        value = value[key]
    return value


def _positive(value, name: str, source: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{source}: {name} = {value!r} is not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise InputError(f"{source}: {name} = {value!r} is invalid; it must be finite and positive")
    return x


def _read_summary(path: Path) -> Run:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot read a summary from it ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a summary must be a JSON object, got {type(data).__name__}")
    source = str(path)
    N = _positive(_lookup(data, "parameters.N", path), "parameters.N", source)
    N_v = _lookup(data, "parameters.N_v", path)
    N_v = 0.0 if N_v == 0 else _positive(N_v, "parameters.N_v", source)
    D = _positive(_lookup(data, "tokens.D", path), "tokens.D", source)
    val_loss = _lookup(data, "val_loss", path)
    if not isinstance(val_loss, dict) or not val_loss:
        raise InputError(f"{path}: val_loss must map data types to losses, got {val_loss!r}")
    losses = {key: _positive(v, f"val_loss.{key}", source) for key, v in val_loss.items() if v is not None}
    flops = data.get("flops")
    C = _positive(flops, "flops", source) if flops is not None else 6.0 * (N + N_v) * D
    return Run(N + N_v, D, C, losses, source, flops is not None, data.get("architecture"))


def _read_csv(path: Path) -> list[Run]:
    try:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read it as CSV ({error})") from None
    columns = set(rows[0]) if rows else set()
    missing = [c for c in ("N", "D", "loss") if c not in columns]
    if missing:
        raise InputError(f"{path}: missing CSV columns {missing}; the header must name N, D and loss")

    # rows that share (N, D, C) are one run with one loss per type
    runs: dict[tuple, dict] = {}
    for line, row in enumerate(rows, start=2):
        source = f"{path}:{line}"
        N = _positive(row["N"], "N", source)
        D = _positive(row["D"], "D", source)
        has_C = bool(row.get("C"))
        C = _positive(row["C"], "C", source) if has_C else 6.0 * N * D
        loss_type = (row.get("type") or CSV_LOSS_TYPE).strip()
        run = runs.setdefault((N, D, C), {"losses": {}, "source": source, "flops_reported": has_C})
        if loss_type in run["losses"]:
            raise InputError(
                f"{source}: a second {loss_type!r} loss for N={N:g}, D={D:g}; keep one row per run and type"
            )
        run["losses"][loss_type] = _positive(row["loss"], "loss", source)
    return [
        Run(N, D, C, r["losses"], r["source"], r["flops_reported"], from_csv=True)
        for (N, D, C), r in runs.items()
    ]


def select_types(runs: Sequence[Run], loss_type: str | None, all_types: bool) -> list[str]:
    """Return the data types to fit: every type all runs report, the requested one, or the default.

    The default is "mean" where present, else the only type the runs report.
    """
    shared = set.intersection(*(set(r.losses) for r in runs))
    if all_types:
        partial = set.union(*(set(r.losses) for r in runs)) - shared
        if partial:
            log.warning("skipping types %s: some runs do not report them", sorted(partial))
        if not shared:
            raise InputError("no data type is reported by every run; pick one with --type")
        return sorted(shared)
    if loss_type is None:
        loss_type = DEFAULT_TYPE if DEFAULT_TYPE in shared or len(shared) != 1 else next(iter(shared))
    for run in runs:
        if loss_type not in run.losses:
            problem = (
                f"no loss of type {loss_type!r}" if run.from_csv else f"missing key 'val_loss.{loss_type}'"
            )
            raise InputError(
                f"{run.source}: {problem}; it reports {sorted(run.losses)}, so pick one of those with --type"
            )
    return [loss_type]


def run_arrays(runs: Sequence[Run], loss_type: str) -> tuple[np.ndarray, ...]:
    """Return N, D, C and L arrays for one data type."""
    N = np.array([r.N for r in runs])
    D = np.array([r.D for r in runs])
    C = np.array([r.C for r in runs])
    L = np.array([r.losses[loss_type] for r in runs])
    return N, D, C, L


# ----------------------------------------------------------------------------- analyses


@dataclass(frozen=True)
class FitOptions:
    """Settings shared by every fit of one report."""

    bootstrap_rounds: int = 100
    seed: int = 0
    confidence: float = 0.95
    delta: float = HUBER_DELTA
    reduction: str = "sum"
    held_out: bool = True
    budget_rtol: float = 0.05
    starts: np.ndarray | None = None  # rows (log_E, log_A, log_B, alpha, beta); the default grid if None


def analyse(N, D, C, L, options: FitOptions = FitOptions(), flops_reported: bool = True) -> dict:
    """Fit the law and run every check on one set of runs. Return a JSON-ready dict."""
    fit = fit_scaling_law(N, D, L, starts=options.starts, delta=options.delta, reduction=options.reduction)
    params = fit.params
    log.info("fitted %d runs: %s (objective %.6g)", len(N), _format_params(params), fit.objective)
    result = {
        "n_runs": int(len(N)),
        "params": params._asdict(),
        "log_params": {"log_E": math.log(params.E), "log_A": math.log(params.A), "log_B": math.log(params.B)},
        "objective": fit.objective,
        "grad_max": fit.grad_max,
        "fit_quality": {"held_in": goodness_of_fit(params, N, D, L), "held_out": _held_out(N, D, L, options)},
    }
    result.update(_bootstrap(N, D, L, params, options))
    result["exponents"] = _exponents(params, result.get("bootstrap"), options.confidence)
    result["approach2"] = _approach2(N, D, C, L, options.budget_rtol)
    result["frontier"] = _frontier(C, L)
    result["compute_model"], regression = _regression(params, N, D, C, flops_reported)
    if regression is not None:
        result["exponents"]["a_regression"] = regression["N_opt"].exponent
        result["exponents"]["b_regression"] = regression["D_opt"].exponent
    if result["approach2"]["N"]["power_law"] is not None:
        result["exponents"]["a_approach2"] = result["approach2"]["N"]["power_law"]["exponent"]
    if result["approach2"]["D"]["power_law"] is not None:
        result["exponents"]["b_approach2"] = result["approach2"]["D"]["power_law"]["exponent"]
    if result["frontier"].get("c") is not None:
        result["exponents"]["c"] = result["frontier"]["c"]
    result["tokens_per_parameter"] = _optimal_table(params, C)
    result["diagnostics"] = diagnose(result, np.asarray(L, dtype=np.float64), np.asarray(N, dtype=np.float64),
                                     np.asarray(D, dtype=np.float64))
    for message in result["diagnostics"]:
        log.info("%s", message)
    return result


def _held_out(N, D, L, options: FitOptions) -> dict:
    if not options.held_out:
        return {"skipped": "disabled"}
    try:
        return held_out_check(
            N, D, L, starts=options.starts, delta=options.delta, reduction=options.reduction
        )
    except ValueError as error:
        return {"skipped": str(error)}


def _bootstrap(N, D, L, params: ScalingLawParams, options: FitOptions) -> dict:
    if options.bootstrap_rounds <= 0:
        return {}
    samples = bootstrap_fits(
        N,
        D,
        L,
        params,
        rounds=options.bootstrap_rounds,
        seed=options.seed,
        delta=options.delta,
        reduction=options.reduction,
    )
    tail = 50 * (1 - options.confidence)
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    # Resamples of runs that do not constrain a parameter send A or B towards overflow; their
    # spread is then infinite, reported as None.
    with np.errstate(over="ignore", invalid="ignore"):
        spread = samples.std(axis=0, ddof=1) if len(samples) > 1 else np.zeros(len(PARAM_NAMES))
    spread = [float(x) if np.isfinite(x) else None for x in spread]
    return {
        "intervals": {
            name: [float(lo), float(hi)] for name, lo, hi in zip(PARAM_NAMES, low, high, strict=True)
        },
        "standard_errors": dict(zip(PARAM_NAMES, spread, strict=True)),
        "bootstrap": {
            "rounds": options.bootstrap_rounds,
            "seed": options.seed,
            "confidence": options.confidence,
            "columns": list(PARAM_NAMES),
            "samples": samples.tolist(),
        },
    }


# An exponent whose interval is wider than this multiple of its value is reported as unconstrained.
WIDE_INTERVAL = 1.0


def diagnose(fit: dict, L: np.ndarray, N: np.ndarray | None = None, D: np.ndarray | None = None) -> list[str]:
    """List what the runs leave undetermined: a single size or budget, exponents of about zero or
    below, an irreducible loss of about zero, or wide exponent intervals."""
    messages = []
    params = fit["params"]
    for name, values, exponent in (("model size", N, "alpha"), ("token budget", D, "beta")):
        if values is not None and len(np.unique(np.round(np.log(values), 6))) < 2:
            messages.append(f"every run has the same {name}, so {exponent} and its coefficient are not "
                            f"identified; add runs of other {name}s")
    for name, remedy in (("alpha", "model size"), ("beta", "token count")):
        if params[name] <= 0.01:
            messages.append(f"{name} = {params[name]:.3g}: the loss does not fall with {remedy} in these runs, "
                            "so the compute-optimal exponents and predictions are meaningless")
    if params["E"] < 1e-3 * float(L.min()):
        messages.append(
            f"E is fitted to {params['E']:.3g}, about zero: the losses show no floor yet, so E is not "
            "identified and the exponents absorb it; add runs with more tokens per parameter"
        )
    for name, remedy in (("alpha", "model sizes"), ("beta", "token budgets")):
        interval = fit.get("intervals", {}).get(name)
        if interval and interval[1] - interval[0] > WIDE_INTERVAL * abs(params[name]):
            messages.append(
                f"{name} = {params[name]:.3g} is poorly constrained: its bootstrap interval is "
                f"[{interval[0]:.3g}, {interval[1]:.3g}]; add {remedy}"
            )
    return messages


def _exponents(params: ScalingLawParams, bootstrap: dict | None, confidence: float) -> dict:
    exponents = {"a": params.a, "b": params.b}
    if bootstrap:
        samples = np.asarray(bootstrap["samples"])
        alpha, beta = samples[:, 3], samples[:, 4]
        tail = 50 * (1 - confidence)
        for name, values in (("a", beta / (alpha + beta)), ("b", alpha / (alpha + beta))):
            exponents[f"{name}_interval"] = [float(v) for v in np.percentile(values, [tail, 100 - tail])]
    return exponents


def _isoflop_json(result: approaches.IsoFlopResult) -> dict:
    law = result.power_law
    return {
        "minima": [{k: v for k, v in m._asdict().items() if k != "coef"} for m in result.minima],
        "power_law": None if law is None else {"k": law.k, "exponent": law.exponent},
    }


def _approach2(N, D, C, L, rtol: float) -> dict:
    by_N = approaches.isoflop_minima(C, N, L, rtol=rtol)
    by_D = approaches.isoflop_minima(C, D, L, rtol=rtol)
    return {"budget_rtol": rtol, "N": _isoflop_json(by_N), "D": _isoflop_json(by_D), "skipped": by_N.skipped}


def _frontier(C, L) -> dict:
    try:
        law, hull = approaches.loss_compute_frontier(C, L)
    except ValueError as error:
        return {"skipped": str(error)}
    return {"k": law.k, "c": law.exponent, "hull_runs": [int(i) for i in hull]}


def _regression(params: ScalingLawParams, N, D, C, flops_reported: bool):
    if flops_reported:
        model = approaches.fit_flops_per_token(N, D, C)
        description = "C / D = c1 N + c0, least squares over the runs' reported flops"
    else:
        model = approaches.SIX_N
        description = "C = 6 N D (some runs report no flops)"
    compute_model = {"flops_per_token": description, "c1": model.c1, "c0": model.c0}
    if params.alpha <= 0 or params.beta <= 0:
        return compute_model, None
    grid = np.geomspace(C.min(), C.max() * 100, 25)
    return compute_model, approaches.compute_optimal_regression(params, grid, model)


def _optimal_table(params: ScalingLawParams, C) -> list[dict]:
    """Compute-optimal N*, D*, D*/N* and loss at the runs' smallest and largest C and beyond."""
    if params.alpha <= 0 or params.beta <= 0:
        return []
    rows = []
    for budget in sorted({float(C.min()), float(C.max()), float(C.max()) * 10, float(C.max()) * 100}):
        N_star, D_star = params.compute_optimal(budget)
        rows.append(
            {
                "C": budget,
                "N_star": float(N_star),
                "D_star": float(D_star),
                "D_per_N": float(D_star / N_star),
                "loss": float(params.predict(N_star, D_star)),
            }
        )
    return rows


# ----------------------------------------------------------------------------- writing


def build_report(
    runs: Sequence[Run], loss_types: Sequence[str], options: FitOptions, inputs: Sequence[str]
) -> dict:
    """Analyse each data type and return the fit.json document."""
    architectures = sorted({r.architecture for r in runs if r.architecture})
    if len(architectures) > 1:
        log.warning("fitting runs of several architectures together: %s", ", ".join(architectures))
    starts = options.starts if options.starts is not None else make_grid()
    flops_reported = all(r.flops_reported for r in runs)
    fits = {}
    for loss_type in loss_types:
        log.info("fitting val_loss %r on %d runs from %d starts", loss_type, len(runs), len(starts))
        N, D, C, L = run_arrays(runs, loss_type)
        fits[loss_type] = {"type": loss_type, **analyse(N, D, C, L, options, flops_reported)}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "conventions": CONVENTIONS,
        "method": {
            "objective": "sum over runs of "
            "Huber_delta(LSE(log_A - alpha log N, log_B - beta log D, log_E) - log L)",
            "delta": options.delta,
            "reduction": options.reduction,
            "optimizer": "batched L-BFGS from every start, the best continued to convergence, "
            "then SciPy L-BFGS-B on the rescaled objective",
            "n_starts": int(len(starts)),
            "bootstrap_rounds": options.bootstrap_rounds,
            "seed": options.seed,
        },
        "inputs": list(inputs),
        "architectures": architectures,
        "runs": [{"N": r.N, "D": r.D, "C": r.C, "losses": r.losses, "source": r.source} for r in runs],
        "fits": fits,
    }


def _clean(value):
    """Replace NaN and infinities by None and numpy scalars by Python numbers, for strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_report(report: dict, runs: Sequence[Run], out: Path, plots: bool = True) -> list[Path]:
    """Write fit.json, fit.md and (with `plots`) PNG plots for each fitted type into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    if plots:
        from fusionlab.scaling import plots as plotting

        for loss_type, fit in report["fits"].items():
            N, D, C, L = run_arrays(runs, loss_type)
            images += plotting.plot_all(out, loss_type, ScalingLawParams(**fit["params"]), N, D, C, L, fit)
    (out / "fit.json").write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")
    (out / "fit.md").write_text(markdown(report, [p.name for p in images]))
    return [out / "fit.json", out / "fit.md", *images]


def load_fit(path: str | Path) -> dict:
    """Read a fit.json written by `write_report`."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot read a fit from it ({error})") from None
    if (
        not isinstance(report, dict)
        or report.get("format") != FORMAT
        or not isinstance(report.get("fits"), dict)
    ):
        raise InputError(f"{path}: not a fit.json written by `fusionlab scaling fit`")
    return report


# ----------------------------------------------------------------------------- Markdown


def _format_params(p: ScalingLawParams) -> str:
    return f"E={p.E:.4g} A={p.A:.4g} B={p.B:.4g} alpha={p.alpha:.4g} beta={p.beta:.4g}"


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _interval(pair) -> str:
    return "" if not pair else f"[{_num(pair[0])}, {_num(pair[1])}]"


def markdown(report: dict, images: Sequence[str] = ()) -> str:
    """Render the fit.json document as Markdown tables, one section per data type, then `images`."""
    method = report["method"]
    lines = [
        "# Scaling-law fit",
        "",
        f"{report['law']}, fitted in log space with Huber delta {method['delta']:g} "
        f"({method['reduction']} over runs), L-BFGS from {method['n_starts']} starts.",
        f"N: {report['conventions']['N']}.",
        "",
    ]
    for loss_type, fit in report["fits"].items():
        lines += _markdown_fit(loss_type, fit)
    lines += [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(*headers) -> list[str]:
    return ["", _row(*headers), _row(*["---"] * len(headers))]


def _markdown_fit(loss_type: str, fit: dict) -> list[str]:
    intervals = fit.get("intervals", {})
    confidence = fit.get("bootstrap", {}).get("confidence")
    header = f"{int(round(confidence * 100))} % interval (bootstrap)" if confidence else "interval"
    lines = [f"## val_loss {loss_type} ({fit['n_runs']} runs)", *_table("parameter", "value", header)]
    for name in PARAM_NAMES:
        lines.append(_row(name, _num(fit["params"][name], 5), _interval(intervals.get(name))))
    lines.append(_row("objective", _num(fit["objective"], 8), ""))
    if fit.get("diagnostics"):
        lines += ["", *[f"Warning: {message}." for message in fit["diagnostics"]]]

    exponents = fit["exponents"]
    lines += _table("exponent", "value", "interval")
    lines.append(
        _row("a (N* ~ C^a), closed form", _num(exponents["a"]), _interval(exponents.get("a_interval")))
    )
    lines.append(
        _row("b (D* ~ C^b), closed form", _num(exponents["b"]), _interval(exponents.get("b_interval")))
    )
    for key, label in (
        ("a_regression", "a, regression"),
        ("b_regression", "b, regression"),
        ("a_approach2", "a, IsoFLOP minima"),
        ("b_approach2", "b, IsoFLOP minima"),
        ("c", "c (L ~ C^c), convex hull"),
    ):
        if key in exponents:
            lines.append(_row(label, _num(exponents[key]), ""))

    held_in, held_out = fit["fit_quality"]["held_in"], fit["fit_quality"]["held_out"]
    lines += _table("check", "R^2", "MAE", "MAPE %")
    lines.append(_row("held-in", _num(held_in["r2"]), _num(held_in["mae"]), _num(held_in["mape_percent"], 3)))
    if "skipped" in held_out:
        lines.append(_row("held-out", f"skipped: {held_out['skipped']}", "", ""))
    else:
        label = f"held-out N >= {held_out['held_out_N']:.3g} ({held_out['n_test']} runs)"
        lines.append(
            _row(label, _num(held_out["r2"]), _num(held_out["mae"]), _num(held_out["mape_percent"], 3))
        )

    minima_N, minima_D = fit["approach2"]["N"]["minima"], fit["approach2"]["D"]["minima"]
    if minima_N:
        lines += _table("IsoFLOP budget C", "runs", "N*", "D*", "loss at minimum")
        D_by_C = {m["C"]: m["x_opt"] for m in minima_D}
        for m in minima_N:
            D_star = _num(D_by_C.get(m["C"]), 3)
            lines.append(_row(f"{m['C']:.3g}", m["n_runs"], f"{m['x_opt']:.3g}", D_star, f"{m['L_opt']:.4f}"))

    if fit["tokens_per_parameter"]:
        lines += _table("C", "N*", "D*", "D*/N*", "loss")
        for row in fit["tokens_per_parameter"]:
            numbers = (f"{row[key]:.3g}" for key in ("C", "N_star", "D_star", "D_per_N"))
            lines.append(_row(*numbers, f"{row['loss']:.4f}"))
    return lines + [""]


# ----------------------------------------------------------------------------- prediction


def pick_fit(report: dict, loss_type: str | None, source: str = "fit.json") -> tuple[str, dict]:
    """Return (type, fit) from a fit.json document: `loss_type`, else "mean", else its only fit."""
    fits = report["fits"]
    if loss_type is None:
        loss_type = DEFAULT_TYPE if DEFAULT_TYPE in fits or len(fits) != 1 else next(iter(fits))
    if loss_type not in fits:
        raise InputError(
            f"{source}: no fit for type {loss_type!r}; it contains {sorted(fits)}: pick one with --type"
        )
    return loss_type, fits[loss_type]


def predict_at(fit: dict, C: float, confidence: float = 0.95) -> dict:
    """Return compute-optimal N*, D*, D*/N* and loss at compute C, each as (value, low, high).

    The interval spans the central `confidence` of the bootstrap fits' own optima at C; it is
    (value, None, None) when the fit contains no bootstrap samples. "dropped_resamples" counts the
    resamples left out of the interval because their optimum is not finite.
    """
    params = ScalingLawParams(**fit["params"])
    N_star, D_star = params.compute_optimal(C)
    values = {"N_star": float(N_star), "D_star": float(D_star), "D_per_N": float(D_star / N_star)}
    values["loss"] = float(params.predict(N_star, D_star))

    samples = np.asarray(fit.get("bootstrap", {}).get("samples", []), dtype=np.float64).reshape(-1, 5)
    E, A, B, alpha, beta = samples.T
    usable = np.isfinite(samples).all(axis=1) & (alpha > 0) & (beta > 0)
    if not usable.any():
        return {k: (v, None, None) for k, v in values.items()}
    E, A, B, alpha, beta = (v[usable] for v in (E, A, B, alpha, beta))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        N_s = G * (C / 6) ** (beta / (alpha + beta))
        D_s = (C / 6) ** (alpha / (alpha + beta)) / G
        spread = {"N_star": N_s, "D_star": D_s, "D_per_N": D_s / N_s, "loss": E + A / N_s**alpha + B / D_s**beta}
    # Resamples whose optimum overflows (an unconstrained A or B) are left out and counted, because
    # they would turn every percentile into nan.
    finite = np.all([np.isfinite(v) for v in spread.values()], axis=0)
    dropped = int(len(samples) - finite.sum())
    if not finite.any():
        return {k: (v, None, None) for k, v in values.items()} | {"dropped_resamples": dropped}
    tail = 50 * (1 - confidence)
    out: dict = {"dropped_resamples": dropped}
    for key, value in values.items():
        low, high = np.percentile(spread[key][finite], [tail, 100 - tail])
        out[key] = (value, float(low), float(high))
    return out
