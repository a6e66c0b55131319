"""Compute-optimal scaling beside the parametric fit: IsoFLOP parabolas, the loss-compute frontier
and compute-optimal exponents by regression.

- Approach 2 of Hoffmann et al. (2022): runs sharing a compute budget C form an IsoFLOP curve. A
  parabola in log N (or log D) through each curve locates the best size at that budget, and a power
  law through those minima gives N*(C) and D*(C).
- L ~ C^c: a power law through the lower convex hull of (log C, log L), the best loss reached at
  each compute.
- Compute-optimal exponents by regression: minimise a fitted law along each compute budget under a
  compute model C = D * flops_per_token(N), then regress log N* and log D* on log C. For
  flops_per_token(N) = 6 N this reproduces the closed form a = beta / (alpha + beta).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fusionlab.scaling.fit import ScalingLawParams


class PowerLaw(NamedTuple):
    """y = k * x^exponent."""

    k: float
    exponent: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=np.float64) ** self.exponent


def fit_power_law(x, y) -> PowerLaw:
    """Fit y = k x^exponent by least squares on log y against log x."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(np.unique(x)) < 2:
        raise ValueError(f"a power law needs at least two distinct x values, got x={x.tolist()}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError(f"a power law fit needs positive x and y, got x={x.tolist()}, y={y.tolist()}")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(np.exp(intercept)), float(slope))


def group_close_values(values, rtol: float = 0.05) -> np.ndarray:
    """Label positive values so that close ones share a group, such as runs of one compute budget.

    In increasing order, a value starts a new group when it exceeds the smallest value of the current
    group by more than `rtol` relative. Return integer labels numbered in increasing order.
    """
    values = np.asarray(values, dtype=np.float64)
    labels = np.empty(len(values), dtype=np.int64)
    group, start = -1, -np.inf
    for i in np.argsort(values, kind="stable"):
        if values[i] > start * (1 + rtol):
            group, start = group + 1, values[i]
        labels[i] = group
    return labels


class IsoFlopMinimum(NamedTuple):
    """Minimum of one IsoFLOP parabola, fitted over the runs of one compute budget."""

    C: float  # geometric mean compute of the group
    x_opt: float  # N* or D*, whichever x the parabola was fitted over
    L_opt: float
    n_runs: int
    inside: bool  # False when x_opt lies outside the sampled x range (an extrapolation)
    coef: tuple[float, float, float]  # (p0, p1, p2) of L = p0 (log x)^2 + p1 log x + p2


@dataclass
class IsoFlopResult:
    minima: list[IsoFlopMinimum]
    power_law: PowerLaw | None  # x_opt = k C^exponent through the minima, None with fewer than 2
    skipped: list[str] = field(default_factory=list)  # why a budget gave no minimum


def isoflop_minima(C, x, L, *, rtol: float = 0.05, min_runs: int = 3) -> IsoFlopResult:
    """Fit a parabola of L in log x for each compute budget and a power law through the minima.

    Budgets with fewer than `min_runs` distinct x, or a parabola opening downwards, give no
    minimum and are listed in `skipped`.
    """
    C, x, L = (np.asarray(v, dtype=np.float64) for v in (C, x, L))
    labels = group_close_values(C, rtol)
    minima, skipped = [], []
    for group in range(labels.max() + 1 if len(labels) else 0):
        m = labels == group
        C_group = float(np.exp(np.log(C[m]).mean()))
        log_x = np.log(x[m])
        if len(np.unique(log_x)) < min_runs:
            skipped.append(f"C={C_group:.3g}: {len(np.unique(log_x))} distinct sizes, need {min_runs}")
            continue
        p0, p1, p2 = (float(v) for v in np.polyfit(log_x, L[m], 2))
        if p0 <= 0:
            skipped.append(f"C={C_group:.3g}: the parabola opens downwards (no minimum)")
            continue
        log_opt = -p1 / (2 * p0)
        inside = bool(log_x.min() <= log_opt <= log_x.max())
        L_opt = p2 - p1**2 / (4 * p0)
        minima.append(
            IsoFlopMinimum(C_group, float(np.exp(log_opt)), L_opt, int(m.sum()), inside, (p0, p1, p2))
        )
    power_law = None
    if len(minima) >= 2:
        power_law = fit_power_law([m.C for m in minima], [m.x_opt for m in minima])
    return IsoFlopResult(minima, power_law, skipped)


def lower_convex_hull(x, y) -> np.ndarray:
    """Return the indices of the lower convex hull of points (x, y), ordered by x (monotone chain).

    Points on a hull edge are kept.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    hull: list[int] = []
    for i in np.lexsort((y, x)):
        if hull and x[hull[-1]] == x[i]:
            continue  # same x: the earlier point has the lower y
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            left, right = (x[a] - x[o]) * (y[i] - y[o]), (y[a] - y[o]) * (x[i] - x[o])
            # keep collinear points (they lie on the frontier too), up to rounding of the products
            if left - right >= -1e-12 * (abs(left) + abs(right)):
                break
            hull.pop()
        hull.append(int(i))
    return np.array(hull, dtype=np.int64)


def loss_compute_frontier(C, L) -> tuple[PowerLaw, np.ndarray]:
    """Fit L = k C^c through the lower convex hull of (log C, log L).

    The hull is cut after its lowest loss, since points beyond it (more compute, higher loss) do
    not lie on the frontier of best loss per compute. Return the power law and the hull indices.
    """
    C = np.asarray(C, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    hull = lower_convex_hull(np.log(C), np.log(L))
    hull = hull[: int(np.argmin(L[hull])) + 1]
    if len(hull) < 2:
        raise ValueError(
            f"the loss-compute frontier has {len(hull)} point: the run with the least compute "
            f"(C={C.min():.3g}) already has the lowest loss, so no L ~ C^c trend can be fitted"
        )
    return fit_power_law(C[hull], L[hull]), hull


class LinearFlopsPerToken(NamedTuple):
    """Training FLOPs per token C / D = c1 N + c0."""

    c1: float
    c0: float

    def __call__(self, N):
        return self.c1 * np.asarray(N, dtype=np.float64) + self.c0


def fit_flops_per_token(N, D, C) -> LinearFlopsPerToken:
    """Fit C / D = c1 N + c0 by least squares over runs.

    When vision-encoder compute makes C differ from 6 N D (late fusion), the slope and intercept
    absorb it, so that regression exponents follow the runs' own compute. With a single model size
    the intercept is 0 and c1 is the mean of C / (D N).
    """
    N, D, C = (np.asarray(v, dtype=np.float64) for v in (N, D, C))
    if len(np.unique(N)) < 2:
        return LinearFlopsPerToken(float((C / (D * N)).mean()), 0.0)
    c1, c0 = np.polyfit(N, C / D, 1)
    return LinearFlopsPerToken(float(c1), float(c0))


SIX_N = LinearFlopsPerToken(6.0, 0.0)  # dense training FLOPs per token: forward and backward passes


def compute_optimal_regression(
    params: ScalingLawParams, C, flops_per_token: Callable = SIX_N, *, span: float = 1e4, n_grid: int = 4001
) -> dict:
    """Minimise `params`' loss at each budget C over N (with D = C / flops_per_token(N)) and regress.

    The search covers N from N0 / span to N0 * span around the closed-form N0 at C = 6 N D, on a
    log grid refined by a parabola through the best grid point and its neighbours. Return a dict with
    N*, D*, loss at each C and the power laws N*(C) = k C^a, D*(C) = k C^b.
    """
    C = np.atleast_1d(np.asarray(C, dtype=np.float64))
    N0, _ = params.compute_optimal(C)
    offsets = np.linspace(-np.log(span), np.log(span), n_grid)
    log_N = np.log(N0)[:, None] + offsets[None, :]
    N = np.exp(log_N)
    fpt = flops_per_token(N)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.where(fpt > 0, params.predict(N, C[:, None] / np.where(fpt > 0, fpt, 1.0)), np.inf)
    i = np.clip(np.argmin(loss, axis=1), 1, n_grid - 2)
    rows = np.arange(len(C))
    left, mid, right = loss[rows, i - 1], loss[rows, i], loss[rows, i + 1]
    denominator = left - 2 * mid + right
    shift = np.where(denominator > 0, 0.5 * (left - right) / np.where(denominator > 0, denominator, 1.0), 0.0)
    h = offsets[1] - offsets[0]
    N_star = np.exp(log_N[rows, i] + shift * h)
    D_star = C / flops_per_token(N_star)
    result = {"C": C, "N_star": N_star, "D_star": D_star, "loss": params.predict(N_star, D_star)}
    if len(C) >= 2:
        result["N_opt"] = fit_power_law(C, N_star)
        result["D_opt"] = fit_power_law(C, D_star)
    return result


def tokens_per_parameter(params: ScalingLawParams, C):
    """Return D* / N* at compute C = 6 N D."""
    N_star, D_star = params.compute_optimal(C)
    return D_star / N_star
