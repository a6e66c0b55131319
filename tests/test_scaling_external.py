"""Reproduce published scaling-law fits from their public data.

- Chinchilla final losses as digitised by Besiroglu et al. (2024, arXiv 2404.10102), with their plain
  approach-3 fit: E 1.81724, A 477.84, B 2143.86, alpha 0.347313, beta 0.367183, objective 0.0010182740.
- Gemstones cooldown runs (McLeish et al. 2025, arXiv 2502.06857) and the authors' approach-3 fit.
- Llama 3 IsoFLOP points (arXiv 2407.21783), whose approach-2 fit is D*(C) = 0.299 C^0.537.

The data sits outside the package, in the shared test-data folder beside the repository.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fusionlab.scaling import approaches
from fusionlab.scaling.fit import ScalingLawParams, fit_scaling_law, huber_objective, make_grid

DATA = Path(__file__).parents[1] / ".." / "shared" / "testdata" / "scaling"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"published scaling data not found at {DATA}")


def load_chinchilla():
    with open(DATA / "epoch_chinchilla" / "svg_extracted_data.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(L, kind="stable")[:-5]  # the published fits drop the 5 highest losses
    return N[keep], C[keep] / (6 * N[keep]), L[keep]


def load_gemstones(name):
    with open(DATA / "gemstones" / name) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    N = np.array([r["params_active_precise"] for r in rows], dtype=np.float64)
    D = np.array([r["tokens"] for r in rows], dtype=np.float64)
    L = np.array([r["final_loss"] for r in rows], dtype=np.float64)
    return N, D, L


def test_chinchilla_plain_approach_3():
    N, D, L = load_chinchilla()
    assert len(L) == 240
    # the grid of the replication: alpha, beta to 2, log_A, log_B to 25
    starts = make_grid(
        alpha=np.arange(0, 2.1, 0.5),
        beta=np.arange(0, 2.1, 0.5),
        log_A=np.arange(0, 26, 5),
        log_B=np.arange(0, 26, 5),
    )
    fit = fit_scaling_law(N, D, L, starts=starts)
    p = fit.params
    assert abs(p.E - 1.81724) < 1e-3
    assert abs(p.alpha - 0.347313) < 1e-3
    assert abs(p.beta - 0.367183) < 1e-3
    assert abs(p.A / 477.84 - 1) < 0.01
    assert abs(p.B / 2143.86 - 1) < 0.01
    published = ScalingLawParams(1.81724, 477.84, 2143.86, 0.347313, 0.367183)
    assert fit.objective <= huber_objective(published, N, D, L)
    assert fit.objective == pytest.approx(0.0010182740, abs=1e-10)


def test_chinchilla_from_hoffmann_start():
    # SciPy's default tolerances stop near this start and report success; the fit must go on
    N, D, L = load_chinchilla()
    hoffmann = ScalingLawParams(1.69, 406.4, 410.7, 0.34, 0.28)
    fit = fit_scaling_law(N, D, L, starts=hoffmann.log_params[None, :])
    assert abs(fit.params.E - 1.81724) < 1e-3
    assert abs(fit.params.alpha - 0.347313) < 1e-3
    assert abs(fit.params.beta - 0.367183) < 1e-3
    assert fit.objective == pytest.approx(0.0010182740, abs=1e-10)


def test_gemstones_cool_end_matches_authors():
    N, D, L = load_gemstones("wandb_df_for_fitting_cool_end.jsonl")
    with open(DATA / "gemstones" / "approach_3_parameters_grid_search_0_cool_end.json") as file:
        published = json.load(file)
    alpha, beta = published["exponents"]["0"]
    log_A, log_B = published["coefficients"]["0"]
    authors = ScalingLawParams.from_log(published["irreducible_error"]["0"], log_A, log_B, alpha, beta)
    authors_objective = huber_objective(authors, N, D, L)
    assert authors_objective == pytest.approx(published["loss"]["0"], rel=1e-7)

    fit = fit_scaling_law(N, D, L)
    assert fit.objective <= authors_objective
    assert abs(fit.params.alpha - alpha) < 0.005
    assert abs(fit.params.beta - beta) < 0.005


def test_llama3_isoflop_tokens():
    with open(DATA / "llama3_isoflops" / "isoflops_points.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    C = np.array([float(r["compute_budget"]) for r in rows])
    D = np.array([float(r["training_tokens"]) for r in rows])
    L = np.array([float(r["validation_loss"]) for r in rows])
    result = approaches.isoflop_minima(C, D, L)
    assert len(result.minima) == 10
    assert result.skipped == []
    assert abs(result.power_law.k / 0.299 - 1) < 0.03
    assert abs(result.power_law.exponent / 0.537 - 1) < 0.03
    assert math.isclose(result.minima[0].C, 6e18, rel_tol=1e-12)
