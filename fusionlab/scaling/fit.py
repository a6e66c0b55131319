"""Fit the loss law L(N, D) = E + A / N^alpha + B / D^beta to training runs.

This is approach 3 of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"),
as used by Shukor et al. (2025, "Scaling Laws for Native Multimodal Models", arXiv 2504.07951).
The law is fitted in log space:

    minimise  sum_i Huber_delta( LSE(log_A - alpha log N_i, log_B - beta log D_i, log_E) - log L_i )

with delta = 1e-3 and L-BFGS started from a grid of points, keeping the best objective.

How the multi-start search runs, all in float64:

1. screening: every start takes `screen_iters` steps of a batched L-BFGS that moves all starts
   at once, so a grid of thousands of starts costs a few dozen vectorised objective evaluations;
2. refinement: the `n_refine` best starts continue until their line search can no longer lower
   the objective (relative decrease below 1e-14, or no decrease at all);
3. polishing: the `n_polish` best go through SciPy's L-BFGS-B with the objective divided by its
   current value, restarted until a restart gains less than 1e-10 relative.

The rescaling in step 3 matters because SciPy's L-BFGS-B stops when the objective falls by less
than ftol * max(|f|, 1). A summed Huber objective is often about 1e-3 and an averaged one far
smaller, so the default ftol of 2.2e-9 can end the search after a few iterations, far from the
optimum, while still reporting success. Internally the optimisers use log N and log D centred on
their means, which decorrelates log_A from alpha and log_B from beta. Neither change moves the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")

# Grid of starts from Shukor et al. (2025). The paper quotes 1,764 starts, which is the size of the
# alpha x beta x log_A x log_B product (6 x 6 x 7 x 7); with the five listed values of log_E the
# full product holds 8,820 starts, and all of them are used.
DEFAULT_GRID = {
    "alpha": np.arange(0.0, 2.51, 0.5),
    "beta": np.arange(0.0, 2.51, 0.5),
    "log_A": np.arange(0.0, 30.1, 5.0),
    "log_B": np.arange(0.0, 30.1, 5.0),
    "log_E": np.arange(-1.0, 1.01, 0.5),
}

Reduction = Literal["sum", "mean"]


class ScalingLawParams(NamedTuple):
    """Coefficients of L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def a(self) -> float:
        """Exponent of N* ~ C^a under C = 6 N D."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D* ~ C^b under C = 6 N D."""
        return self.alpha / (self.alpha + self.beta)

    @classmethod
    def from_log(
        cls, log_E: float, log_A: float, log_B: float, alpha: float, beta: float
    ) -> ScalingLawParams:
        """Build the parameters from the fit's coordinates (log_E, log_A, log_B, alpha, beta)."""
        return cls(math.exp(log_E), math.exp(log_A), math.exp(log_B), float(alpha), float(beta))

    @property
    def log_params(self) -> np.ndarray:
        """(log_E, log_A, log_B, alpha, beta), the coordinates the fit works in."""
        return np.array([math.log(self.E), math.log(self.A), math.log(self.B), self.alpha, self.beta])

    def predict(self, N, D):
        """Return the predicted loss for N parameters trained on D tokens (scalars or arrays)."""
        N = np.asarray(N, dtype=np.float64)
        D = np.asarray(D, dtype=np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C):
        """Return (N*, D*) minimising the loss at compute C = 6 N D (scalars or arrays).

        Setting dL/dN = 0 along D = C / (6 N) gives N* = G (C/6)^a and D* = (C/6)^b / G with
        G = (alpha A / (beta B))^(1 / (alpha + beta)).
        """
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(
                f"compute-optimal sizes need alpha > 0 and beta > 0, got alpha={self.alpha}, "
                f"beta={self.beta}: the law has no interior optimum, so refit with more varied N and D"
            )
        C = np.asarray(C, dtype=np.float64)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return G * (C / 6.0) ** self.a, (C / 6.0) ** self.b / G


@dataclass(frozen=True)
class ScalingLawFit:
    """Result of `fit_scaling_law`: the best parameters and how they were reached."""

    params: ScalingLawParams
    objective: float  # Huber objective at `params`, with the requested reduction
    n_runs: int
    n_starts: int
    delta: float
    reduction: Reduction
    grad_max: float  # max |d objective / d(log_E, log_A, log_B, alpha, beta)| at `params`


def make_grid(**values) -> np.ndarray:
    """Return the product of start values as an array of rows (log_E, log_A, log_B, alpha, beta).

    Keywords are `alpha`, `beta`, `log_A`, `log_B`, `log_E`; any left out take `DEFAULT_GRID`'s values.
    """
    unknown = set(values) - set(DEFAULT_GRID)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; use {sorted(DEFAULT_GRID)}")
    axes = {**DEFAULT_GRID, **{k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in values.items()}}
    mesh = np.meshgrid(
        axes["log_E"], axes["log_A"], axes["log_B"], axes["alpha"], axes["beta"], indexing="ij"
    )
    return np.stack([m.ravel() for m in mesh], axis=1)


def validate_runs(N, D, L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return N, D, L as float64 arrays after checking they are finite, positive and of equal length."""
    arrays = []
    for name, values in (("N", N), ("D", D), ("L", L)):
        x = np.asarray(values, dtype=np.float64).ravel()
        bad = ~np.isfinite(x) | (x <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name}[{i}] = {float(x[i])!r} is invalid: {name} must be finite and positive for every run"
            )
        arrays.append(x)
    if not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
        raise ValueError(f"N, D and L must have one value per run, got lengths {[len(x) for x in arrays]}")
    if len(arrays[0]) < len(PARAM_NAMES):
        raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(arrays[0])}")
    return arrays[0], arrays[1], arrays[2]


class _Objective:
    """Batched Huber objective and gradient in centred coordinates.

    A row u = (log_E, a_c, b_c, alpha, beta) of the internal coordinates contains a_c = log_A - alpha x0
    and b_c = log_B - beta y0, where x0 and y0 are the means of log N and log D.
    """

    CHUNK = 1 << 15  # elements per (rows x runs) block: 256 kB of float64, small enough to stay in cache

    def __init__(self, N, D, L, delta: float, weights: np.ndarray):
        log_N, log_D = np.log(N), np.log(D)
        self.x0, self.y0 = float(log_N.mean()), float(log_D.mean())
        self.x, self.y, self.log_L = log_N - self.x0, log_D - self.y0, np.log(L)
        self.delta = delta
        self.weights = weights  # (n_runs,) shared by all rows, or (n_rows, n_runs)

    def to_internal(self, theta: np.ndarray) -> np.ndarray:
        u = np.array(theta, dtype=np.float64, copy=True)
        u[..., 1] -= u[..., 3] * self.x0
        u[..., 2] -= u[..., 4] * self.y0
        return u

    def from_internal(self, u: np.ndarray) -> np.ndarray:
        theta = np.array(u, dtype=np.float64, copy=True)
        theta[..., 1] += theta[..., 3] * self.x0
        theta[..., 2] += theta[..., 4] * self.y0
        return theta

    def __call__(self, u: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return objective (n,) and gradient (n, 5) at points u (n, 5); `rows` picks per-row weights."""
        step = max(1, self.CHUNK // max(1, len(self.x)))
        if len(u) <= step:
            return self._evaluate(u, rows)
        parts = [self._evaluate(u[i : i + step], rows[i : i + step]) for i in range(0, len(u), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _evaluate(self, u, rows):
        w = self.weights if self.weights.ndim == 1 else self.weights[rows]
        z_E = u[:, 0:1]
        z_N = u[:, 1:2] - u[:, 3:4] * self.x
        z_D = u[:, 2:3] - u[:, 4:5] * self.y
        z_max = np.maximum(np.maximum(z_N, z_D), z_E)
        e_E, e_N, e_D = np.exp(z_E - z_max), np.exp(z_N - z_max), np.exp(z_D - z_max)
        total = e_E + e_N + e_D
        r = z_max + np.log(total) - self.log_L  # residual in log loss

        # Huber written as 0.5 c^2 + delta (|r| - c) with c = min(|r|, delta), which cannot overflow
        abs_r = np.abs(r)
        c = np.minimum(abs_r, self.delta)
        f = (w * (0.5 * c * c + self.delta * (abs_r - c))).sum(axis=1)

        # d huber / d r is r clipped to [-delta, delta]; d LSE / d z are the softmax weights e / total
        q = w * np.clip(r, -self.delta, self.delta) / total
        q_N, q_D = q * e_N, q * e_D
        g = np.stack(
            [(q * e_E).sum(1), q_N.sum(1), q_D.sum(1), -(q_N * self.x).sum(1), -(q_D * self.y).sum(1)], axis=1
        )
        return f, g


def _two_loop(g, s_hist, y_hist, rho, gamma, n_pairs, newest):
    """Return the L-BFGS direction -H g for each row, with history slots in a ring buffer."""
    m = s_hist.shape[0]
    q = g.copy()
    coef = []
    for i in range(n_pairs):
        k = (newest - i) % m
        c = rho[k] * (s_hist[k] * q).sum(1)
        q -= c[:, None] * y_hist[k]
        coef.append((k, c))
    r = gamma[:, None] * q
    for k, c in reversed(coef):
        beta = rho[k] * (y_hist[k] * r).sum(1)
        r += s_hist[k] * (c - beta)[:, None]
    return -r


def _line_search(fun, u, f, g, d, rows, max_trials=40, c1=1e-4):
    """Backtracking Armijo search along d for each row. Return accepted (mask, u, f, g)."""
    slope = (g * d).sum(1)
    t = np.ones(len(rows))
    u_new, f_new, g_new = u.copy(), f.copy(), g.copy()
    pending = np.ones(len(rows), dtype=bool)
    for _ in range(max_trials):
        idx = np.flatnonzero(pending)
        u_try = u[idx] + t[idx, None] * d[idx]
        with np.errstate(over="ignore", invalid="ignore"):  # a long trial step may overflow: it is rejected
            f_try, g_try = fun(u_try, rows[idx])
        ok = np.isfinite(f_try) & (f_try <= f[idx] + c1 * t[idx] * slope[idx]) & (f_try < f[idx])
        done = idx[ok]
        u_new[done], f_new[done], g_new[done] = u_try[ok], f_try[ok], g_try[ok]
        pending[done] = False
        if not pending.any():
            break

        # shrink by the minimiser of the quadratic through f(0), f'(0) and f(t), kept in [0.1 t, 0.5 t]
        bad = idx[~ok]
        f_bad = np.where(np.isfinite(f_try[~ok]), f_try[~ok], np.inf)
        curvature = f_bad - f[bad] - slope[bad] * t[bad]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_quad = -slope[bad] * t[bad] ** 2 / (2 * curvature)
        t_quad = np.where(np.isfinite(t_quad), t_quad, 0.1 * t[bad])
        t[bad] = np.clip(t_quad, 0.1 * t[bad], 0.5 * t[bad])
    return ~pending, u_new, f_new, g_new


def _lbfgs_batched(fun, u0, *, max_iter: int, ftol: float, history: int = 10):
    """Minimise independent problems, one per row of u0, by L-BFGS with an Armijo line search.

    A row stops when its line search fails or its objective falls by less than ftol relative.
    Return (u, f, n_iter).
    """
    u = np.array(u0, dtype=np.float64, copy=True)
    n_rows, n_params = u.shape
    all_rows = np.arange(n_rows)
    f, g = fun(u, all_rows)
    s_hist = np.zeros((history, n_rows, n_params))
    y_hist = np.zeros((history, n_rows, n_params))
    rho = np.zeros((history, n_rows))
    gamma = np.zeros(n_rows)  # 0 marks a row without a curvature pair yet
    active = np.isfinite(f)
    n_pairs, newest = 0, -1

    for it in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            return u, f, it

        # direction: L-BFGS where a curvature pair exists, else steepest descent moving the largest
        # coordinate by 1 (a unit step in log space is the scale of the start grid)
        g_r = g[rows]
        d = _two_loop(g_r, s_hist[:, rows], y_hist[:, rows], rho[:, rows], gamma[rows], n_pairs, newest)
        fresh = (gamma[rows] == 0) | ((g_r * d).sum(1) >= 0)
        g_scale = np.maximum(np.abs(g_r).max(1), 1e-300)
        d[fresh] = -g_r[fresh] / g_scale[fresh, None]
        rho[:, rows[fresh]] = 0.0

        ok, u_new, f_new, g_new = _line_search(fun, u[rows], f[rows], g_r, d, rows)
        active[rows[~ok]] = False

        # store the curvature pair of each accepted step, skipping pairs with s.y <= 0
        newest = (newest + 1) % history
        n_pairs = min(n_pairs + 1, history)
        s, y = u_new - u[rows], g_new - g_r
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        valid = ok & (yy > 0) & np.isfinite(yy) & (sy > 1e-12 * np.sqrt((s * s).sum(1) * yy))
        s_hist[newest, rows] = np.where(valid[:, None], s, 0.0)
        y_hist[newest, rows] = np.where(valid[:, None], y, 0.0)
        rho[newest, rows] = np.where(valid, 1.0 / np.where(valid, sy, 1.0), 0.0)
        gamma[rows] = np.where(valid, sy / np.where(valid, yy, 1.0), gamma[rows])

        small = ok & (f[rows] - f_new <= ftol * np.abs(f[rows]))
        active[rows[small]] = False
        u[rows], f[rows], g[rows] = u_new, f_new, g_new
    return u, f, max_iter


def _polish(objective: _Objective, u0: np.ndarray, max_restarts: int = 5) -> tuple[np.ndarray, float]:
    """Refine one point with SciPy's L-BFGS-B on the objective divided by its current value."""
    from scipy.optimize import minimize

    row = np.zeros(1, dtype=np.int64)

    def evaluate(u):
        f, g = objective(u[None, :], row)
        return float(f[0]), g[0]

    u, f = np.array(u0, dtype=np.float64), evaluate(u0)[0]
    for _ in range(max_restarts):
        if f <= 0:
            break
        scale = f

        def scaled(v, scale=scale):
            fv, gv = evaluate(v)
            return fv / scale, gv / scale

        # ftol and gtol act on the rescaled objective, which starts at 1, so they are relative
        result = minimize(
            scaled,
            u,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-13, "maxls": 50},
        )
        f_new = evaluate(result.x)[0]
        if not f_new < f:
            break
        gain = (f - f_new) / f
        u, f = result.x, f_new
        if gain < 1e-10:
            break
    return u, f


def _run_weights(n_runs: int, reduction: Reduction) -> np.ndarray:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is invalid; use 'sum' or 'mean'")
    return np.full(n_runs, 1.0 / n_runs if reduction == "mean" else 1.0)


def fit_scaling_law(
    N,
    D,
    L,
    *,
    starts: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
    reduction: Reduction = "sum",
    screen_iters: int = 30,
    n_refine: int = 64,
    n_polish: int = 3,
) -> ScalingLawFit:
    """Fit L = E + A / N^alpha + B / D^beta by the multi-start search described in the module docstring.

    `starts` contains rows (log_E, log_A, log_B, alpha, beta), `make_grid()` by default. With
    reduction="mean" the objective is averaged over runs instead of summed, which rescales it
    but leaves the optimum where it is.
    """
    N, D, L = validate_runs(N, D, L)
    starts = make_grid() if starts is None else np.atleast_2d(np.asarray(starts, dtype=np.float64))
    if starts.shape[1] != 5 or not np.isfinite(starts).all():
        raise ValueError(
            f"starts must be finite rows (log_E, log_A, log_B, alpha, beta), got shape {starts.shape}"
        )
    objective = _Objective(N, D, L, delta, _run_weights(len(N), reduction))

    # screening: a few L-BFGS steps for every start
    u, f, _ = _lbfgs_batched(objective, objective.to_internal(starts), max_iter=screen_iters, ftol=1e-10)

    # refinement: the best starts run until the line search stalls
    if not np.isfinite(f).any():
        raise ValueError(
            "the objective is not finite at any start; check that N, D and L are in plain units, not logs"
        )
    f = np.where(np.isfinite(f), f, np.inf)
    best = np.argsort(f, kind="stable")[:n_refine]
    u, f, _ = _lbfgs_batched(objective, u[best], max_iter=3000, ftol=1e-14)

    # polishing: SciPy's L-BFGS-B on the rescaled objective; the lowest objective wins
    candidates = [_polish(objective, u[i]) for i in np.argsort(f, kind="stable")[:n_polish]]
    u_best, f_best = min(candidates, key=lambda c: c[1])

    _, g = objective(u_best[None, :], np.zeros(1, dtype=np.int64))
    theta = objective.from_internal(u_best)
    grad = _gradient_in_log_params(g[0], objective)
    return ScalingLawFit(
        params=ScalingLawParams.from_log(*theta),
        objective=float(f_best),
        n_runs=len(N),
        n_starts=len(starts),
        delta=delta,
        reduction=reduction,
        grad_max=float(np.abs(grad).max()),
    )


def _gradient_in_log_params(g: np.ndarray, objective: _Objective) -> np.ndarray:
    # chain rule for a_c = log_A - alpha x0: d/d alpha at fixed log_A picks up -x0 d/d a_c
    out = g.copy()
    out[3] -= objective.x0 * g[1]
    out[4] -= objective.y0 * g[2]
    return out


def huber_objective(
    params: ScalingLawParams, N, D, L, *, delta: float = HUBER_DELTA, reduction: Reduction = "sum"
) -> float:
    """Return the fit's Huber objective at `params`, to compare fits on the same runs."""
    N, D, L = validate_runs(N, D, L)
    objective = _Objective(N, D, L, delta, _run_weights(len(N), reduction))
    u = objective.to_internal(params.log_params[None, :])
    return float(objective(u, np.zeros(1, dtype=np.int64))[0][0])


def bootstrap_fits(
    N,
    D,
    L,
    best: ScalingLawParams,
    *,
    rounds: int = 100,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    reduction: Reduction = "sum",
) -> np.ndarray:
    """Refit on `rounds` resamples of the runs (drawn with replacement), each started from `best`.

    All resamples run as one batched L-BFGS: a resample is a row of per-run counts, so run i
    drawn k times weighs k in the objective. Return an array (rounds, 5) of (E, A, B, alpha, beta).
    """
    N, D, L = validate_runs(N, D, L)
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is invalid: the bootstrap needs at least one round")
    n = len(N)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(rounds, n))
    counts = np.zeros((rounds, n))
    np.add.at(counts, (np.arange(rounds)[:, None], picks), 1.0)
    weights = counts * _run_weights(n, reduction)

    objective = _Objective(N, D, L, delta, weights)
    u0 = np.repeat(objective.to_internal(best.log_params[None, :]), rounds, axis=0)
    u, _, _ = _lbfgs_batched(objective, u0, max_iter=3000, ftol=1e-13)
    theta = objective.from_internal(u)
    with np.errstate(over="ignore"):  # an unconstrained A or B may overflow to inf: a real outcome here
        return np.column_stack(
            [np.exp(theta[:, 0]), np.exp(theta[:, 1]), np.exp(theta[:, 2]), theta[:, 3], theta[:, 4]]
        )


def goodness_of_fit(params: ScalingLawParams, N, D, L) -> dict[str, float | None]:
    """Return R^2, mean absolute error and mean absolute percentage error of the predicted losses.

    R^2 is None for fewer than two runs or when all losses are equal, where it is undefined.
    """
    L = np.asarray(L, dtype=np.float64)
    error = params.predict(N, D) - L
    ss_tot = float(((L - L.mean()) ** 2).sum())
    r2 = 1.0 - float((error**2).sum()) / ss_tot if len(L) > 1 and ss_tot > 0 else None
    return {
        "r2": r2,
        "mae": float(np.abs(error).mean()),
        "mape_percent": float(100 * np.abs(error / L).mean()),
    }


def held_out_check(N, D, L, *, rtol: float = 0.01, **fit_kwargs) -> dict:
    """Fit on all but the largest model size and predict the runs of that size.

    Runs whose N is within `rtol` of the largest N form the held-out set. Return a dict with the
    split sizes, the held-in fit's parameters and the held-out R^2 / MAE / MAPE.
    """
    N, D, L = validate_runs(N, D, L)
    test = N >= N.max() * (1 - rtol)
    n_train = int((~test).sum())
    if n_train < len(PARAM_NAMES):
        raise ValueError(
            f"the held-out check leaves {n_train} runs below the largest size N={N.max():.4g}; "
            "it needs at least 5, so add runs of smaller models or skip the check"
        )
    fit = fit_scaling_law(N[~test], D[~test], L[~test], **fit_kwargs)
    return {
        "held_out_N": float(N[test].min()),
        "n_train": n_train,
        "n_test": int(test.sum()),
        "params": fit.params._asdict(),
        "objective": fit.objective,
        **goodness_of_fit(fit.params, N[test], D[test], L[test]),
    }
