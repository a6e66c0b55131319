"""Tests of `fusionlab scaling fit` and `fusionlab scaling predict` on run summaries written in tmp_path."""

import argparse
import json
import logging

import numpy as np
import pytest

from fusionlab.scaling import cli
from fusionlab.scaling.fit import ScalingLawParams

TRUE = ScalingLawParams(E=1.904, A=300.0, B=800.0, alpha=0.301, beta=0.335)
OFFSETS = {"caption": 0.10, "interleaved": 0.05, "text": 0.0}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_sweep(root, N_v=0, noise=0.002, budgets=4, sizes=5, seed=0, drop=None):
    """Write one summary.json per run of an IsoFLOP sweep; `drop` removes a val_loss key from run 0."""
    rng = np.random.default_rng(seed)
    i = 0
    for C in np.geomspace(1e17, 1e19, budgets):
        N_opt, _ = TRUE.compute_optimal(C)
        for N_total in N_opt * np.geomspace(0.25, 4, sizes):
            D = int(C / (6 * N_total))
            N = int(N_total) - N_v
            loss = float(TRUE.predict(N_total, D))
            val_loss = {t: loss * (1 + s) * float(np.exp(rng.normal(0, noise))) for t, s in OFFSETS.items()}
            val_loss["mean"] = float(np.mean(list(val_loss.values())))
            if drop and i == 0:
                del val_loss[drop]
            summary = {
                "architecture": "late_fusion" if N_v else "early_fusion",
                "run_name": f"run{i:02d}",
                "parameters": {"N": N, "N_v": N_v, "total": N + N_v, "active": N + N_v},
                "tokens": {"D": D, "D_v": D // 4 if N_v else 0},
                "flops": 6.0 * (N * D + N_v * (D // 4 if N_v else 0)),
                "val_loss": val_loss,
            }
            folder = root / f"run{i:02d}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(summary))
            i += 1
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One default fit (mean loss, 50 bootstrap rounds) shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("scaling")
    runs = write_sweep(root / "runs")
    out = root / "fit"
    assert cli.run(["fit", str(runs), "--out", str(out), "--bootstrap", "50"]) == 0
    return out, json.loads((out / "fit.json").read_text())


def test_fit_writes_outputs(fitted):
    out, _ = fitted
    for name in (
        "fit.json",
        "fit.md",
        "loss_vs_flops_mean.png",
        "isoflop_mean.png",
        "optimal_sizes_mean.png",
    ):
        assert (out / name).is_file(), name
    for name in ("loss_vs_flops_mean.png", "isoflop_mean.png", "optimal_sizes_mean.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_fit_json_holds_parameters_and_intervals(fitted):
    _, report = fitted
    fit = report["fits"]["mean"]
    assert fit["n_runs"] == 20
    assert report["method"]["n_starts"] == 8820
    assert report["method"]["delta"] == 1e-3
    assert "parameters.N + parameters.N_v" in report["conventions"]["N"]
    for name in ("E", "A", "B", "alpha", "beta"):
        low, high = fit["intervals"][name]
        assert low <= fit["params"][name] <= high, name
    assert abs(fit["params"]["alpha"] - TRUE.alpha) < 0.03
    assert abs(fit["params"]["beta"] - TRUE.beta) < 0.03
    assert len(fit["bootstrap"]["samples"]) == 50
    assert fit["bootstrap"]["columns"] == ["E", "A", "B", "alpha", "beta"]


def test_fit_json_holds_exponents(fitted):
    _, report = fitted
    fit = report["fits"]["mean"]
    exponents = fit["exponents"]
    alpha, beta = fit["params"]["alpha"], fit["params"]["beta"]
    assert exponents["a"] == pytest.approx(beta / (alpha + beta))
    assert exponents["b"] == pytest.approx(alpha / (alpha + beta))
    assert exponents["a_regression"] == pytest.approx(exponents["a"], abs=1e-4)  # flops = 6 N D here
    assert abs(exponents["a_approach2"] - TRUE.a) < 0.03
    assert abs(exponents["b_approach2"] - TRUE.b) < 0.03
    assert -0.2 < exponents["c"] < 0
    assert len(fit["approach2"]["N"]["minima"]) == 4
    assert fit["compute_model"]["c1"] == pytest.approx(6.0, rel=1e-6)


def test_fit_json_holds_checks(fitted):
    _, report = fitted
    fit = report["fits"]["mean"]
    assert fit["fit_quality"]["held_in"]["r2"] > 0.99
    held_out = fit["fit_quality"]["held_out"]
    assert held_out["n_test"] == 1
    assert held_out["mape_percent"] < 1.0
    rows = fit["tokens_per_parameter"]
    assert [row["C"] for row in rows] == sorted(row["C"] for row in rows)
    for row in rows:
        assert row["D_per_N"] == pytest.approx(row["D_star"] / row["N_star"])
        assert 6 * row["N_star"] * row["D_star"] == pytest.approx(row["C"], rel=1e-9)


def test_fit_markdown_tables(fitted):
    out, report = fitted
    text = (out / "fit.md").read_text()
    assert "## val_loss mean (20 runs)" in text
    assert "| alpha |" in text
    assert "| a (N* ~ C^a), closed form |" in text
    assert "![isoflop_mean](isoflop_mean.png)" in text
    assert f"{report['fits']['mean']['params']['alpha']:.5g}" in text


def test_fit_counts_vision_encoder_in_N(tmp_path):
    runs = write_sweep(tmp_path / "runs", N_v=2_000_000, budgets=2, sizes=3)
    out = tmp_path / "fit"
    assert (
        cli.run(["fit", str(runs), "--out", str(out), "--bootstrap", "0", "--no-plots", "--no-held-out"]) == 0
    )
    report = json.loads((out / "fit.json").read_text())
    summary = json.loads((runs / "run00" / "summary.json").read_text())
    first = next(r for r in report["runs"] if r["source"].endswith("run00/summary.json"))
    assert first["N"] == summary["parameters"]["N"] + 2_000_000
    assert first["C"] == summary["flops"]
    assert report["architectures"] == ["late_fusion"]
    assert "intervals" not in report["fits"]["mean"]
    assert report["fits"]["mean"]["fit_quality"]["held_out"] == {"skipped": "disabled"}
    assert not list(out.glob("*.png"))


def test_fit_all_types_skips_partial_type(tmp_path, caplog):
    runs = write_sweep(tmp_path / "runs", budgets=2, sizes=3, drop="caption")
    out = tmp_path / "fit"
    with caplog.at_level(logging.WARNING, logger="fusionlab.scaling.report"):
        code = cli.run(
            [
                "fit",
                str(runs),
                "--out",
                str(out),
                "--all-types",
                "--bootstrap",
                "0",
                "--no-plots",
                "--no-held-out",
            ]
        )
    assert code == 0
    report = json.loads((out / "fit.json").read_text())
    assert sorted(report["fits"]) == ["interleaved", "mean", "text"]
    assert "caption" in caplog.text
    assert report["fits"]["text"]["params"]["E"] < report["fits"]["interleaved"]["params"]["E"]


def test_fit_type_missing_names_file(tmp_path, capsys):
    runs = write_sweep(tmp_path / "runs", budgets=2, sizes=3, drop="caption")
    code = cli.run(["fit", str(runs), "--out", str(tmp_path / "fit"), "--type", "caption"])
    assert code == 1
    error = capsys.readouterr().err
    assert "run00/summary.json" in error
    assert "val_loss.caption" in error


@pytest.mark.parametrize(
    "summary, key",
    [
        ({"parameters": {"N_v": 0}, "tokens": {"D": 10}, "val_loss": {"mean": 3.0}}, "parameters.N"),
        ({"parameters": {"N": 10, "N_v": 0}, "val_loss": {"mean": 3.0}}, "tokens.D"),
        ({"parameters": {"N": 10, "N_v": 0}, "tokens": {"D": 10}}, "val_loss"),
    ],
)
def test_fit_missing_key_names_file_and_key(tmp_path, capsys, summary, key):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert cli.run(["fit", str(path), "--out", str(tmp_path / "fit")]) == 1
    error = capsys.readouterr().err
    assert str(path) in error
    assert f"missing key '{key}'" in error


def test_fit_rejects_empty_folder(tmp_path, capsys):
    assert cli.run(["fit", str(tmp_path), "--out", str(tmp_path / "fit")]) == 1
    assert "no summary.json found" in capsys.readouterr().err


def test_fit_reads_csv_with_types(tmp_path):
    N, D = [a.ravel() for a in np.meshgrid([1e7, 3e7, 1e8, 3e8, 1e9], [2e8, 6e8, 2e9, 6e9, 2e10])]
    lines = ["N,D,loss,type"]
    for n, d in zip(N, D, strict=True):
        lines.append(f"{n},{d},{TRUE.predict(n, d)},text")
        lines.append(f"{n},{d},{TRUE.predict(n, d) + 0.2},caption")
    path = tmp_path / "runs.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "fit"
    assert (
        cli.run(["fit", str(path), "--out", str(out), "--type", "text", "--bootstrap", "0", "--no-plots"])
        == 0
    )
    fit = json.loads((out / "fit.json").read_text())["fits"]["text"]
    assert fit["n_runs"] == 25
    assert fit["params"]["alpha"] == pytest.approx(TRUE.alpha, abs=1e-4)
    assert fit["params"]["E"] == pytest.approx(TRUE.E, abs=1e-3)


def test_fit_csv_without_loss_column(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    path.write_text("N,D,val\n1,2,3\n")
    assert cli.run(["fit", str(path), "--out", str(tmp_path / "fit")]) == 1
    assert "missing CSV columns ['loss']" in capsys.readouterr().err


def test_predict_prints_optimum_with_interval(fitted, capsys):
    out, report = fitted
    assert cli.run(["predict", "--fit", str(out / "fit.json"), "--flops", "1e21"]) == 0
    text = capsys.readouterr().out
    params = ScalingLawParams(**report["fits"]["mean"]["params"])
    N_star, D_star = params.compute_optimal(1e21)
    loss_line = next(line for line in text.splitlines() if line.startswith("loss"))
    assert f"{params.predict(N_star, D_star):.4f} [" in loss_line
    N_line = next(line for line in text.splitlines() if line.startswith("N*"))
    assert f"{N_star:.4g}" in N_line
    low, high = (float(v) for v in N_line.split("[")[1].rstrip("]").split(","))
    assert low <= N_star * 1.001  # the printed bounds carry 4 significant digits
    assert high >= N_star * 0.999


def test_predict_compares_two_fits(fitted, tmp_path, capsys):
    out, report = fitted
    other = json.loads(json.dumps(report))
    other["fits"]["mean"]["params"]["alpha"] = 0.5  # a fit that favours larger models
    del other["fits"]["mean"]["bootstrap"]
    (tmp_path / "fit.json").write_text(json.dumps(other))
    code = cli.run(
        [
            "predict",
            "--fit",
            str(out / "fit.json"),
            "--fit",
            str(tmp_path / "fit.json"),
            "--flops",
            "1e20",
            "1e22",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    header = [line for line in text.splitlines() if str(tmp_path / "fit.json") in line]
    assert len(header) == 2  # one header row per budget
    assert str(out / "fit.json") in header[0]
    N_line = next(line for line in text.splitlines() if line.startswith("N*"))
    first, second = N_line.split()[1], N_line.split()[-1]
    assert float(second) != pytest.approx(float(first), rel=0.01)
    assert N_line.count("[") == 1  # the second fit has no bootstrap, so no interval


def test_predict_rejects_unknown_type(fitted, capsys):
    out, _ = fitted
    assert cli.run(["predict", "--fit", str(out / "fit.json"), "--flops", "1e21", "--type", "caption"]) == 1
    assert "no fit for type 'caption'" in capsys.readouterr().err


def test_predict_rejects_non_fit_file(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text("{}")
    assert cli.run(["predict", "--fit", str(path), "--flops", "1e21"]) == 1
    assert "not a fit.json" in capsys.readouterr().err


def test_add_parser_wires_into_top_level(fitted, capsys):
    out, _ = fitted
    parser = argparse.ArgumentParser(prog="fusionlab")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["scaling", "predict", "--fit", str(out / "fit.json"), "--flops", "3e20"])
    assert args.func(args) == 0
    assert "C = 3e+20 FLOPs" in capsys.readouterr().out


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.run(["fit", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--type", "--all-types", "--bootstrap", "--seed", "--no-held-out"):
        assert flag in text


def test_import_loads_no_heavy_modules():
    import subprocess
    import sys

    code = (
        "import sys, fusionlab.scaling.cli, fusionlab.scaling\n"
        "heavy = {'scipy', 'matplotlib', 'torch', 'lightning'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
