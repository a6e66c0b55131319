"""`fusionlab compare` trains recipes in their own processes and prints one row per run."""

from __future__ import annotations

import json

from conftest import tiny_recipe, write_recipe
from fusionlab.cli import main

LATE_BACKBONE = {
    "class_path": "fusionlab.models.LateFusion",
    "init_args": {
        "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_multiple_of": 32,
        "encoder_width": 16, "encoder_layers": 1, "encoder_heads": 2,
    },
}


def test_compare_early_and_late(sample_dir, tmp_path, capsys):
    early = write_recipe(tmp_path / "early.yaml", tiny_recipe(sample_dir, tmp_path, trainer={"max_steps": 4}))
    late_recipe = tiny_recipe(sample_dir, tmp_path, trainer={"max_steps": 4})
    late_recipe["model"]["backbone"] = LATE_BACKBONE
    late = write_recipe(tmp_path / "late.yaml", late_recipe)

    table = tmp_path / "table.json"
    code = main(["compare", str(early), str(late), "--out", str(tmp_path / "runs"), "--json", str(table)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "EarlyFusion" in printed
    assert "LateFusion" in printed

    results = json.loads(table.read_text())
    assert results["early"]["parameters"]["N_v"] == 0
    assert results["late"]["parameters"]["N_v"] > 0
    for summary in results.values():
        assert summary["wall_clock_seconds"] > 0
        assert summary["peak_memory_bytes"] > 2**20
        assert {"caption", "interleaved", "text", "mean"} <= set(summary["val_loss"])


def test_compare_reports_missing_recipe(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err
