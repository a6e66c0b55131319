"""The loader benchmark runs end to end and reports every rate and ratio (the numbers are not judged here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_loader_benchmark_reports_ratios(sample_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("loader_throughput", None)
    import loader_throughput

    # The quickstart data settings with a smaller model, so that the training steps are quick.
    recipe = yaml.safe_load(loader_throughput.RECIPE.read_text())
    recipe["model"]["backbone"]["init_args"] = {"d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_multiple_of": 32}
    recipe["trainer"]["precision"] = "32-true"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "loader.json"
    results = loader_throughput.main(["--data", str(sample_dir), "--recipe", str(recipe_path), "--batches", "3",
                                      "--workers", "0", "2", "--train-steps", "1", "--decode-images", "20",
                                      "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["data"] == str(sample_dir)
    assert results["decode_images_per_s"] > 0
    assert results["train_tokens_per_s"] > 0
    assert sorted(results["loader"]) == ["0", "2"]
    for rates in results["loader"].values():
        for name in ("batches_per_s", "samples_per_s", "tokens_per_s", "images_per_s"):
            assert rates[name] > 0, name
        assert 0 < rates["image_token_share"] < 1
        assert rates["tokens_over_training"] == rates["tokens_per_s"] / results["train_tokens_per_s"]
