"""Shared fixtures: a small sample set built once per test session, and recipe helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusionlab.data.build import write_sample_set


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The simple sample variant, small: enough for short training runs."""
    out = tmp_path_factory.mktemp("sample")
    write_sample_set(
        out, seed=0, variant="simple", image_size=32,
        n_train_scenes=1200, n_val_scenes=96, n_train_docs=120, n_val_docs=24,
        n_train_texts=60, n_val_texts=12, n_train_questions=400, n_val_questions=48,
    )
    return out


@pytest.fixture(scope="session")
def bpe_file(tmp_path_factory) -> Path:
    """A small byte-level BPE file with fusionlab's special tokens, standing in for a 50k-token one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fusionlab.data.tokenizer import SPECIAL_TOKENS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.add_tokens([chr(c) for c in range(33, 127)])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    path = tmp_path_factory.mktemp("tokenizer") / "bpe.json"
    tokenizer.save(str(path))
    return path


def tiny_recipe(sample_dir: Path, run_dir: Path, **overrides) -> dict:
    """A tiny early-fusion recipe on the session's sample set, as a dict."""
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": 8,
            "val_check_interval": 4,
            "log_every_n_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "tiny"},
            },
        },
        "model": {
            "backbone": {
                "class_path": "fusionlab.models.EarlyFusion",
                "init_args": {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_multiple_of": 32},
            },
            "lr": 3e-3,
            "warmup_steps": 2,
        },
        "data": {
            "train": [
                {"urls": str(sample_dir / "caption/train-*.tar"), "type": "caption", "weight": 0.45},
                {"urls": str(sample_dir / "interleaved/train-*.tar"), "type": "interleaved", "weight": 0.45},
                {"urls": str(sample_dir / "text/train-*.tar"), "type": "text", "weight": 0.1},
            ],
            "val": [
                {"urls": str(sample_dir / "caption/val-*.tar"), "type": "caption"},
                {"urls": str(sample_dir / "interleaved/val-*.tar"), "type": "interleaved"},
                {"urls": str(sample_dir / "text/val-*.tar"), "type": "text"},
            ],
            "image_size": 16,
            "patch_size": 4,
            "context": 128,
            "batch_size": 4,
            "num_workers": 0,
        },
    }
    _merge(recipe, overrides)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _merge(base: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
