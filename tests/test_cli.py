"""The command line: every recipe parses against the real CLI, and bad input gets a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from conftest import tiny_recipe, write_recipe
from fusionlab.cli import main
from fusionlab.training.cli import run_lightning_cli

# Study specs under recipes/sweeps are read by `fusionlab sweep plan`, not by `fusionlab fit`;
# tests/test_sweep_plan.py plans each of them.
RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").rglob("*.yaml") if "sweeps" not in p.parts)
# Overlays complete a pretraining recipe (the downstream protocol's backbones, fine-tuning), so they
# are parsed on top of the quickstart.
QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
OVERLAYS = {"sft_qa.yaml", "downstream"}


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "tiny_early.yaml", "tiny_late.yaml"} <= names
    assert sum("early" in n for n in names) >= 7 and sum("late" in n for n in names) >= 7


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_parses(recipe, bpe_file, capsys):
    args = ["fit", "--config", str(recipe), "--print_config"]
    if OVERLAYS & {recipe.name, recipe.parent.name}:
        args = ["fit", "--config", str(QUICKSTART), *args[1:]]
    if "tokenizers/" in recipe.read_text():
        args += ["--data.tokenizer", str(bpe_file)]
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "backbone:" in printed
    assert "class_path: fusionlab.models." in printed
    # linked from the data section, so the recipe never states them twice
    assert "vocab_size:" not in printed
    assert "tokenizer:" in printed


@pytest.mark.parametrize("name", ["quickstart.yaml", "tiny_early.yaml", "tiny_late.yaml", "moe_tiny_learned.yaml"])
def test_linked_values_reach_backbone(name, bpe_file):
    recipe = Path(__file__).parents[1] / "recipes" / name
    cli = run_lightning_cli(["--config", str(recipe), "--data.tokenizer", str(bpe_file)], run=False)
    backbone = cli.model.backbone
    assert backbone.vocab_size == cli.datamodule.vocab_size == Tokenizer.from_file(str(bpe_file)).get_vocab_size()
    assert backbone.tokens_per_image == cli.datamodule.tokens_per_image


def test_wrong_key_names_the_key(tmp_path, sample_dir, capsys):
    recipe = tiny_recipe(sample_dir, tmp_path)
    recipe["model"]["backbone"]["init_args"]["d_modle"] = 64
    config = write_recipe(tmp_path / "bad_key.yaml", recipe)
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code != 0
    assert "d_modle" in capsys.readouterr().err


def test_wrong_value_names_the_option(tmp_path, sample_dir, capsys):
    config = write_recipe(tmp_path / "ok.yaml", tiny_recipe(sample_dir, tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(config), "--model.lr", "fast", "--print_config"])
    assert exit_info.value.code != 0
    assert "model.lr" in capsys.readouterr().err


def test_override_from_command_line(tmp_path, sample_dir, capsys):
    config = write_recipe(tmp_path / "ok.yaml", tiny_recipe(sample_dir, tmp_path))
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(config), "--model.backbone.init_args.d_model", "48", "--print_config"])
    assert "d_model: 48" in capsys.readouterr().out


def test_pattern_matching_nothing_names_the_pattern(tmp_path, sample_dir):
    recipe = tiny_recipe(sample_dir, tmp_path)
    missing = str(tmp_path / "nowhere" / "train-*.tar")
    recipe["data"]["train"][0]["urls"] = missing
    config = write_recipe(tmp_path / "missing.yaml", recipe)
    with pytest.raises(Exception, match="nowhere"):
        run_lightning_cli(["fit", "--config", str(config)])


def test_overview_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "data", "scaling"):
        assert command in out


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fusionlab.cli", "data", "sample", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout
