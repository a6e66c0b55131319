"""Tests of the scaling-law fitter and the compute-optimal approaches on synthetic data."""

import math

import numpy as np
import pytest

from fusionlab.scaling import approaches
from fusionlab.scaling import fit as fitting
from fusionlab.scaling.fit import ScalingLawParams, fit_scaling_law

# Hoffmann et al. (2022) as published, sampled on a 5 x 5 grid without noise
CHINCHILLA = ScalingLawParams(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
SINGLE_START = np.array([[0.0, 5.0, 5.0, 0.5, 0.5]])  # log_E, log_A, log_B, alpha, beta


def chinchilla_grid():
    N, D = np.meshgrid([1e7, 3e7, 1e8, 3e8, 1e9], [2e8, 6e8, 2e9, 6e9, 2e10])
    N, D = N.ravel(), D.ravel()
    return N, D, CHINCHILLA.predict(N, D)


def noisy_sweep(params, seed=0, noise=0.003, n_sizes=6):
    """IsoFLOP sweep: 5 budgets x n_sizes sizes around the optimum, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    N, D = [], []
    for C in np.geomspace(1e17, 1e20, 5):
        N_opt, _ = params.compute_optimal(C)
        sizes = N_opt * np.geomspace(0.2, 5, n_sizes)
        N += list(sizes)
        D += list(C / (6 * sizes))
    N, D = np.array(N), np.array(D)
    return N, D, params.predict(N, D) * np.exp(rng.normal(0, noise, len(N)))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("starts", ["grid", "single"])
def test_fit_recovers_chinchilla_parameters(starts, reduction):
    N, D, L = chinchilla_grid()
    fit = fit_scaling_law(N, D, L, starts=None if starts == "grid" else SINGLE_START, reduction=reduction)
    p = fit.params
    assert abs(p.alpha - 0.34) < 0.005
    assert abs(p.beta - 0.28) < 0.005
    assert abs(p.E - 1.69) < 0.01
    assert abs(p.A / 406.4 - 1) < 0.05
    assert abs(p.B / 410.7 - 1) < 0.05
    assert abs(p.predict(1e10, 2e11) / 2.1331 - 1) < 0.005
    assert fit.n_starts == (8820 if starts == "grid" else 1)


def test_scipy_default_tolerances_stop_early():
    # the case above is only a test of tolerances if SciPy's defaults fail it while reporting success
    from scipy.optimize import minimize

    N, D, L = chinchilla_grid()
    objective = fitting._Objective(N, D, L, fitting.HUBER_DELTA, np.ones(len(N)))

    def value_and_grad(theta):
        f, g = objective(objective.to_internal(theta[None, :]), np.zeros(1, dtype=np.int64))
        return f[0], fitting._gradient_in_log_params(g[0], objective)

    result = minimize(value_and_grad, SINGLE_START[0], jac=True, method="L-BFGS-B")
    assert result.success
    assert abs(result.x[3] - 0.34) > 0.005 or abs(math.exp(result.x[0]) - 1.69) > 0.01


def test_default_grid_holds_listed_values():
    grid = fitting.make_grid()
    assert grid.shape == (6 * 6 * 7 * 7 * 5, 5)
    assert sorted(set(grid[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert sorted(set(grid[:, 1])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    assert sorted(set(grid[:, 0])) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_make_grid_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown grid keys"):
        fitting.make_grid(gamma=[1.0])


def test_gradient_matches_finite_differences():
    N, D, L = noisy_sweep(CHINCHILLA)
    objective = fitting._Objective(N, D, L, fitting.HUBER_DELTA, np.ones(len(N)))
    rows = np.zeros(1, dtype=np.int64)
    u = np.array([[0.4, 3.0, 2.5, 0.3, 0.35]])
    _, g = objective(u, rows)
    for k in range(5):
        step = np.zeros((1, 5))
        step[0, k] = 1e-6
        numeric = (objective(u + step, rows)[0][0] - objective(u - step, rows)[0][0]) / 2e-6
        assert numeric == pytest.approx(g[0, k], rel=1e-5, abs=1e-9)


def test_huber_objective_matches_direct_formula():
    from scipy.special import huber, logsumexp

    N, D, L = noisy_sweep(CHINCHILLA)
    terms = np.stack(
        [
            np.log(CHINCHILLA.A) - 0.34 * np.log(N),
            np.log(CHINCHILLA.B) - 0.28 * np.log(D),
            np.full(len(N), np.log(1.69)),
        ]
    )
    expected = huber(1e-3, logsumexp(terms, axis=0) - np.log(L))
    assert fitting.huber_objective(CHINCHILLA, N, D, L) == pytest.approx(expected.sum(), rel=1e-12)
    assert fitting.huber_objective(CHINCHILLA, N, D, L, reduction="mean") == pytest.approx(
        expected.mean(), rel=1e-12
    )


def test_fit_reaches_lower_objective_than_truth_on_noisy_data():
    N, D, L = noisy_sweep(CHINCHILLA)
    fit = fit_scaling_law(N, D, L)
    assert fit.objective <= fitting.huber_objective(CHINCHILLA, N, D, L)
    assert fit.grad_max < 1e-6
    assert abs(fit.params.alpha - 0.34) < 0.05
    assert abs(fit.params.beta - 0.28) < 0.05


@pytest.mark.parametrize(
    "column, value, message",
    [
        (0, -1.0, r"N\[3\] = -1.0 is invalid"),
        (1, np.nan, r"D\[3\] = nan is invalid"),
        (2, 0.0, r"L\[3\] = 0.0 is invalid"),
    ],
)
def test_validate_runs_names_bad_value(column, value, message):
    data = [np.full(6, 1e8), np.full(6, 1e9), np.full(6, 3.0)]
    data[column][3] = value
    with pytest.raises(ValueError, match=message):
        fitting.validate_runs(*data)


def test_validate_runs_rejects_too_few_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fitting.validate_runs([1e8] * 4, [1e9] * 4, [3.0] * 4)


def test_compute_optimal_is_the_minimum_at_fixed_compute():
    C = 1e21
    N_star, D_star = CHINCHILLA.compute_optimal(C)
    assert 6 * N_star * D_star == pytest.approx(C, rel=1e-12)
    best = CHINCHILLA.predict(N_star, D_star)
    for factor in (0.98, 1.02):
        assert CHINCHILLA.predict(N_star * factor, D_star / factor) > best


@pytest.mark.parametrize(
    "alpha, beta, a, b",
    [
        (0.301, 0.335, 0.526, 0.473),  # early fusion, Shukor et al. (2025) Table 2
        (0.2903, 0.3383, None, 0.4619),  # late fusion: its published a comes from a regression
        (0.710, 0.372, None, 0.656),  # early fusion with MoE
    ],
)
def test_closed_form_exponents_match_published(alpha, beta, a, b):
    params = ScalingLawParams(E=2.0, A=100.0, B=100.0, alpha=alpha, beta=beta)
    if a is not None:
        assert abs(params.a - a) < 1e-3
    assert abs(params.b - b) < 1e-3
    assert params.a + params.b == pytest.approx(1.0)


def test_compute_optimal_rejects_nonpositive_exponent():
    with pytest.raises(ValueError, match="alpha > 0 and beta > 0"):
        ScalingLawParams(2.0, 100.0, 100.0, 0.0, 0.3).compute_optimal(1e20)


def test_regression_matches_closed_form_for_six_N_D():
    C = np.geomspace(1e18, 1e24, 20)
    result = approaches.compute_optimal_regression(CHINCHILLA, C)
    N_star, D_star = CHINCHILLA.compute_optimal(C)
    np.testing.assert_allclose(result["N_star"], N_star, rtol=1e-5)
    np.testing.assert_allclose(result["D_star"], D_star, rtol=1e-5)
    assert result["N_opt"].exponent == pytest.approx(CHINCHILLA.a, abs=1e-6)
    assert result["D_opt"].exponent == pytest.approx(CHINCHILLA.b, abs=1e-6)


def test_regression_follows_extra_compute():
    # a fixed 3e8-parameter encoder seen on every token adds 6 * 3e8 FLOPs per token
    model = approaches.LinearFlopsPerToken(6.0, 1.8e9)
    C = np.geomspace(1e19, 1e23, 12)
    result = approaches.compute_optimal_regression(CHINCHILLA, C, model)
    for budget, N_star in zip(C, result["N_star"], strict=True):
        N = N_star * np.exp(np.linspace(-0.1, 0.1, 41))  # N_star at index 20
        loss = CHINCHILLA.predict(N, budget / model(N))
        assert np.argmin(loss) == 20
    assert result["N_opt"].exponent != pytest.approx(CHINCHILLA.a, abs=1e-3)


def test_fit_flops_per_token_recovers_line():
    N = np.array([1e8, 3e8, 1e9])
    D = np.array([1e9, 2e9, 5e9])
    model = approaches.fit_flops_per_token(N, D, D * (6 * N + 1e9))
    assert model.c1 == pytest.approx(6.0)
    assert model.c0 == pytest.approx(1e9)


def test_tokens_per_parameter_is_ratio_of_optima():
    N_star, D_star = CHINCHILLA.compute_optimal(1e22)
    assert approaches.tokens_per_parameter(CHINCHILLA, 1e22) == pytest.approx(D_star / N_star)


def test_lower_convex_hull_drops_points_above():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 2.0])
    y = np.array([4.0, 2.0, 1.6, 1.0, 2.0, 3.0])
    assert approaches.lower_convex_hull(x, y).tolist() == [0, 1, 3, 4]


def test_lower_convex_hull_keeps_collinear_points():
    x = np.arange(5.0)
    assert approaches.lower_convex_hull(x, 3.0 - 0.5 * x).tolist() == [0, 1, 2, 3, 4]


def test_frontier_fits_power_law_through_hull():
    C = np.geomspace(1e18, 1e22, 9)
    best = 50.0 * C**-0.05
    C_all = np.concatenate([C, C[:-1] * 1.5])
    L_all = np.concatenate([best, best[:-1] * 1.2])  # runs above the frontier
    law, hull = approaches.loss_compute_frontier(C_all, L_all)
    assert law.exponent == pytest.approx(-0.05, abs=1e-9)
    assert law.k == pytest.approx(50.0, rel=1e-6)
    assert sorted(hull.tolist()) == list(range(9))


def test_frontier_rejects_single_point():
    with pytest.raises(ValueError, match="lowest loss"):
        approaches.loss_compute_frontier([1e18, 1e19], [2.0, 3.0])


def test_isoflop_minima_find_parabola_vertices():
    C = np.repeat([1e19, 1e20, 1e21], 5)
    N_opt = {1e19: 1e8, 1e20: 3e8, 1e21: 9e8}
    N = np.concatenate([N_opt[c] * np.geomspace(0.25, 4, 5) for c in (1e19, 1e20, 1e21)])
    L = np.array([2.0 + 0.1 * math.log(n / N_opt[c]) ** 2 for c, n in zip(C, N, strict=True)])
    result = approaches.isoflop_minima(C * (1 + 0.01 * np.tile(np.arange(5), 3)), N, L)
    assert [m.x_opt for m in result.minima] == pytest.approx([1e8, 3e8, 9e8], rel=1e-6)
    assert all(m.inside for m in result.minima)
    assert result.power_law.exponent == pytest.approx(math.log(3) / math.log(10), rel=1e-6)
    assert result.skipped == []


def test_isoflop_minima_skip_bad_budgets():
    C = np.array([1e19] * 2 + [1e20] * 3)
    N = np.array([1e8, 2e8, 1e8, 2e8, 4e8])
    L = np.array([3.0, 2.9, 2.0, 2.5, 2.0])  # the second budget's parabola opens downwards
    result = approaches.isoflop_minima(C, N, L)
    assert result.minima == []
    assert result.power_law is None
    assert len(result.skipped) == 2
    assert "2 distinct sizes" in result.skipped[0]
    assert "opens downwards" in result.skipped[1]


def test_group_close_values_splits_by_relative_gap():
    labels = approaches.group_close_values([1.0, 1.04, 2.0, 2.05, 1.02, 8.0], rtol=0.05)
    assert labels.tolist() == [0, 0, 1, 1, 0, 2]


def test_bootstrap_is_seeded():
    N, D, L = noisy_sweep(CHINCHILLA)
    best = fit_scaling_law(N, D, L).params
    first = fitting.bootstrap_fits(N, D, L, best, rounds=20, seed=3)
    again = fitting.bootstrap_fits(N, D, L, best, rounds=20, seed=3)
    other = fitting.bootstrap_fits(N, D, L, best, rounds=20, seed=4)
    assert first.shape == (20, 5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_bootstrap_rounds_reach_their_optimum():
    # each batched round must end where an independent polish from its result ends
    N, D, L = noisy_sweep(CHINCHILLA)
    best = fit_scaling_law(N, D, L).params
    samples = fitting.bootstrap_fits(N, D, L, best, rounds=5, seed=0)
    picks = np.random.default_rng(0).integers(0, len(N), size=(5, len(N)))
    spread = samples.std(axis=0)
    for row, pick in zip(samples, picks, strict=True):
        objective = fitting._Objective(
            N, D, L, fitting.HUBER_DELTA, np.bincount(pick, minlength=len(N)).astype(float)
        )
        u = objective.to_internal(ScalingLawParams(*row).log_params)
        polished, _ = fitting._polish(objective, u)
        assert np.abs(objective.from_internal(polished) - ScalingLawParams(*row).log_params).max() < 1e-4
    assert spread[3] > 0  # resamples differ, so alpha varies across rounds


def test_bootstrap_interval_covers_truth():
    N, D, L = noisy_sweep(CHINCHILLA, noise=0.002, n_sizes=8)
    best = fit_scaling_law(N, D, L).params
    samples = fitting.bootstrap_fits(N, D, L, best, rounds=100, seed=0)
    low, high = np.percentile(samples, [0.5, 99.5], axis=0)
    for k, true in enumerate(CHINCHILLA):
        if k in (0, 3, 4):  # E, alpha, beta: A and B trade off strongly with the exponents
            assert low[k] <= true <= high[k]


def test_held_out_check_predicts_largest_size():
    N, D, L = noisy_sweep(CHINCHILLA, noise=0.0)
    result = fitting.held_out_check(N, D, L)
    assert result["n_test"] == 1
    assert result["n_train"] == len(N) - 1
    assert result["mape_percent"] < 0.01
    assert result["r2"] is None  # one held-out run: R^2 is undefined


def test_held_out_check_needs_five_smaller_runs():
    N = np.array([1e8, 2e8, 3e8, 4e8, 1e9, 1e9])
    with pytest.raises(ValueError, match="leaves 4 runs"):
        fitting.held_out_check(N, N * 20, np.full(6, 3.0))


def test_goodness_of_fit_of_exact_law():
    N, D, L = chinchilla_grid()
    quality = fitting.goodness_of_fit(CHINCHILLA, N, D, L)
    assert quality["r2"] == pytest.approx(1.0)
    assert quality["mae"] < 1e-12
    shifted = fitting.goodness_of_fit(CHINCHILLA, N, D, L * 1.01)
    assert shifted["mape_percent"] == pytest.approx(100 * 0.01 / 1.01, rel=1e-9)


def test_diagnose_flags_missing_floor_and_wide_exponent():
    from fusionlab.scaling.report import diagnose

    L = np.array([2.0, 1.5, 1.1])
    fit = {"params": {"E": 1e-40, "alpha": 2.5, "beta": 0.57},
           "intervals": {"alpha": [0.7, 45.0], "beta": [0.50, 0.63]}}
    messages = diagnose(fit, L)
    assert len(messages) == 2
    assert messages[0].startswith("E is fitted to 1e-40")
    assert "alpha = 2.5 is poorly constrained" in messages[1]


def test_diagnose_quiet_on_determined_fit():
    from fusionlab.scaling.report import diagnose

    fit = {"params": CHINCHILLA._asdict(), "intervals": {"alpha": [0.30, 0.38], "beta": [0.26, 0.30]}}
    assert diagnose(fit, np.array([2.0, 2.5])) == []


def test_predict_at_leaves_out_overflowed_resamples():
    from fusionlab.scaling.report import predict_at

    rows = [list(CHINCHILLA), list(CHINCHILLA._replace(alpha=0.35)), [1.69, math.inf, 410.7, 40.0, 0.28]]
    fit = {"params": CHINCHILLA._asdict(), "bootstrap": {"samples": rows}}
    result = predict_at(fit, 1e21)
    assert result["dropped_resamples"] == 1
    for key in ("N_star", "D_star", "D_per_N", "loss"):
        value, low, high = result[key]
        assert math.isfinite(low)
        assert math.isfinite(high)


def test_diagnose_flags_single_size_and_flat_exponent():
    from fusionlab.scaling.report import diagnose

    fit = {"params": {"E": 1.0, "alpha": 2.0, "beta": 0.0}}
    messages = diagnose(fit, np.array([2.0, 1.9]), N=np.array([1e6, 1e6]), D=np.array([1e8, 2e8]))
    assert any(m.startswith("every run has the same model size") for m in messages)
    assert any(m.startswith("beta = 0:") for m in messages)
