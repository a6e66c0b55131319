"""`fusionlab scaling`: fit scaling laws to finished runs and predict compute-optimal sizes.

fusionlab scaling fit runs/ --out fits/early        # fit.json, fit.md and PNG plots
fusionlab scaling predict --fit fits/early/fit.json --fit fits/late/fit.json --flops 1e21 1e22
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid: use 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid: use a positive number")
    return value


def _confidence(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid: use a fraction between 0 and 1, such as 0.95")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="scaling_command", metavar="{fit,predict}", required=True)

    fit = commands.add_parser(
        "fit",
        help="fit L = E + A/N^alpha + B/D^beta to finished runs",
        description="Fit L(N, D) = E + A / N^alpha + B / D^beta to runs (approach 3 of Hoffmann et al. "
        "2022) and write fit.json, fit.md and PNG plots, with bootstrap intervals, a held-out check, "
        "IsoFLOP minima (approach 2) and the loss-compute frontier.",
    )
    fit.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="summary.json files, run folders (searched recursively) or CSV files with columns "
        "N, D, loss and optionally type, C",
    )
    fit.add_argument("--out", type=Path, required=True, help="output folder for fit.json, fit.md and plots")
    types = fit.add_mutually_exclusive_group()
    types.add_argument(
        "--type",
        dest="loss_type",
        help="validation loss to fit (caption, interleaved, text, mean); default: mean, or a CSV's only type",
    )
    types.add_argument("--all-types", action="store_true", help="fit every data type that all runs report")
    fit.add_argument(
        "--bootstrap",
        type=_non_negative_int,
        default=100,
        metavar="ROUNDS",
        help="bootstrap rounds for the intervals, 0 to skip (default: 100)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    fit.add_argument(
        "--confidence",
        type=_confidence,
        default=0.95,
        help="coverage of the bootstrap intervals (default: 0.95)",
    )
    fit.add_argument(
        "--delta", type=_positive_float, default=1e-3, help="Huber delta, in log loss (default: 1e-3)"
    )
    fit.add_argument(
        "--reduction",
        choices=("sum", "mean"),
        default="sum",
        help="sum or average the Huber terms over runs (default: sum)",
    )
    fit.add_argument(
        "--budget-rtol",
        type=_positive_float,
        default=0.05,
        help="relative spread of compute within one IsoFLOP budget (default: 0.05)",
    )
    fit.add_argument(
        "--no-held-out",
        dest="held_out",
        action="store_false",
        help="skip refitting without the largest model size",
    )
    fit.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots")

    predict = commands.add_parser(
        "predict",
        help="print compute-optimal N*, D* and loss for a compute budget",
        description="Print compute-optimal N*, D*, tokens per parameter and loss at each budget, with "
        "bootstrap intervals. Several --fit files are shown side by side.",
    )
    predict.add_argument(
        "--fit",
        dest="fits",
        action="append",
        required=True,
        type=Path,
        metavar="FIT",
        help="fit.json written by `fusionlab scaling fit`; repeat to compare fits",
    )
    predict.add_argument(
        "--flops",
        type=_positive_float,
        nargs="+",
        required=True,
        metavar="C",
        help="training compute budgets in FLOPs",
    )
    predict.add_argument(
        "--type", dest="loss_type", help="fitted data type to use; default: mean, or the only one"
    )
    predict.add_argument(
        "--confidence", type=_confidence, default=0.95, help="coverage of the intervals (default: 0.95)"
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `scaling` command to a top-level `add_subparsers()` object and return its parser."""
    parser = subparsers.add_parser(
        "scaling",
        help="fit scaling laws and predict compute-optimal sizes",
        description=__doc__.split("\n")[0],
    )
    _configure(parser)
    parser.set_defaults(func=main)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlab scaling", description=__doc__.split("\n")[0])
    _configure(parser)
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run `fusionlab scaling` from parsed arguments or an argument list. Return the exit status."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    from fusionlab.scaling.report import InputError

    try:
        if args.scaling_command == "fit":
            return _fit(args)
        return _predict(args)
    except (InputError, ValueError) as error:
        print(f"fusionlab scaling {args.scaling_command}: error: {error}", file=sys.stderr)
        return 1


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point for `fusionlab scaling ARGS`."""
    return main(list(sys.argv[1:] if argv is None else argv))


def _fit(args: argparse.Namespace) -> int:
    from fusionlab.scaling import report

    runs = report.load_runs(args.inputs)
    loss_types = report.select_types(runs, args.loss_type, args.all_types)
    options = report.FitOptions(
        bootstrap_rounds=args.bootstrap,
        seed=args.seed,
        confidence=args.confidence,
        delta=args.delta,
        reduction=args.reduction,
        held_out=args.held_out,
        budget_rtol=args.budget_rtol,
    )
    document = report.build_report(runs, loss_types, options, [str(p) for p in args.inputs])
    written = report.write_report(document, runs, args.out, plots=args.plots)

    for loss_type, fit in document["fits"].items():
        p, exponents = fit["params"], fit["exponents"]
        print(
            f"{loss_type}: {fit['n_runs']} runs  E={p['E']:.4g} A={p['A']:.4g} B={p['B']:.4g} "
            f"alpha={p['alpha']:.4f} beta={p['beta']:.4f}  a={exponents['a']:.4f} b={exponents['b']:.4f}"
        )
        for message in fit.get("diagnostics", []):
            print(f"  warning: {message}")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _format(value: tuple) -> str:
    x, low, high = value
    text = f"{x:.4g}" if abs(x) >= 100 or x == 0 else f"{x:.4f}"
    if low is None:
        return text
    if abs(x) >= 100:
        return f"{text} [{low:.4g}, {high:.4g}]"
    return f"{text} [{low:.4f}, {high:.4f}]"


def _predict(args: argparse.Namespace) -> int:
    from fusionlab.scaling import report

    fits = []
    for path in args.fits:
        loss_type, fit = report.pick_fit(report.load_fit(path), args.loss_type, str(path))
        fits.append((f"{path} ({loss_type})", fit))

    labels = {"N_star": "N*", "D_star": "D*", "D_per_N": "D*/N*", "loss": "loss"}
    interval = f"{int(round(args.confidence * 100))} % bootstrap interval in brackets"
    print(f"compute-optimal sizes at C = 6 N D; {interval}")
    for C in args.flops:
        columns = [(name, report.predict_at(fit, C, args.confidence)) for name, fit in fits]
        cells = [["", *(name for name, _ in columns)]]
        cells += [[label, *(_format(values[key]) for _, values in columns)] for key, label in labels.items()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        print(f"\nC = {C:.3g} FLOPs")
        for row in cells:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        for name, values in columns:
            if values.get("dropped_resamples"):
                print(f"{name}: {values['dropped_resamples']} bootstrap resamples have no finite optimum "
                      "and are left out of the interval; the fit does not constrain them")
    return 0


if __name__ == "__main__":
    sys.exit(run())
