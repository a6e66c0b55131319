"""Scaling-law tools: fit L(N, D) = E + A / N^alpha + B / D^beta and derive compute-optimal sizes.

Importing this package loads numpy only; SciPy and matplotlib are imported by the functions that
need them.
"""

from fusionlab.scaling.approaches import (
    IsoFlopResult,
    PowerLaw,
    compute_optimal_regression,
    fit_power_law,
    isoflop_minima,
    loss_compute_frontier,
    lower_convex_hull,
    tokens_per_parameter,
)
from fusionlab.scaling.fit import (
    DEFAULT_GRID,
    HUBER_DELTA,
    ScalingLawFit,
    ScalingLawParams,
    bootstrap_fits,
    fit_scaling_law,
    goodness_of_fit,
    held_out_check,
    huber_objective,
    make_grid,
)

__all__ = [
    "DEFAULT_GRID",
    "HUBER_DELTA",
    "IsoFlopResult",
    "PowerLaw",
    "ScalingLawFit",
    "ScalingLawParams",
    "bootstrap_fits",
    "compute_optimal_regression",
    "fit_power_law",
    "fit_scaling_law",
    "goodness_of_fit",
    "held_out_check",
    "huber_objective",
    "isoflop_minima",
    "loss_compute_frontier",
    "lower_convex_hull",
    "make_grid",
    "tokens_per_parameter",
]
