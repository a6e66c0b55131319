"""`fusionlab predict` end to end: a tiny fit, then captions of shards and of an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fusionlab.cli import main
from fusionlab.training.cli import run_lightning_cli
from conftest import tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def checkpoint(sample_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("predict_run")
    # The downstream callback rides along, so this one fit also tests the logged scores.
    downstream = {
        "class_path": "fusionlab.evaluation.evaluate.DownstreamEvaluation",
        "init_args": {"shards": str(sample_dir / "caption/val-*.tar"), "limit": 3, "max_new_tokens": 6},
    }
    trainer = {"max_steps": 2, "val_check_interval": 2, "callbacks": [downstream]}
    recipe = tiny_recipe(sample_dir, run_dir, trainer=trainer)
    run_lightning_cli(["fit", "--config", str(write_recipe(run_dir / "tiny.yaml", recipe))])
    return run_dir / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def test_fit_logs_downstream_scores(checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = checkpoint.parent.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["downstream"]) >= {"cider", "digit_accuracy", "qa_accuracy"}
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"downstream/cider", "downstream/qa_accuracy"} <= set(events.Tags()["scalars"])


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_shards_writes_jsonl(checkpoint, sample_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    argv = ["predict", str(checkpoint), "--shards", str(sample_dir / "caption/val-*.tar"),
            "--out", str(out), "--limit", "5", "--max-new-tokens", "12", "--batch-size", "2"]
    assert main(argv) == 0

    records = _read_jsonl(out)
    assert len(records) == 5
    assert len({record["key"] for record in records}) == 5
    for record in records:
        assert isinstance(record["caption"], str)
        assert len(record["caption"]) <= 12  # one byte token decodes to at most one character
        assert record["reference"]
        assert record["scene"]["digits"]


def test_predict_cache_matches_no_cache(checkpoint, sample_dir, tmp_path):
    outputs = []
    for flag in ([], ["--no-cache"]):
        out = tmp_path / f"captions{len(flag)}.jsonl"
        argv = ["predict", str(checkpoint), "--shards", str(sample_dir / "caption/val-*.tar"),
                "--out", str(out), "--limit", "3", "--max-new-tokens", "10", *flag]
        assert main(argv) == 0
        outputs.append([record["caption"] for record in _read_jsonl(out)])
    assert outputs[0] == outputs[1]


def test_predict_image_folder(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folder.jsonl"

    argv = ["predict", str(checkpoint), "--images", str(folder), "--out", str(out),
            "--temperature", "0.8", "--top-k", "5", "--max-new-tokens", "6"]
    assert main(argv) == 0

    records = _read_jsonl(out)
    assert [record["key"] for record in records] == ["a.jpg", "b.png"]
    assert "reference" not in records[0]


def test_predict_missing_folder_raises(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        main(["predict", str(checkpoint), "--images", str(tmp_path / "missing")])


REPO = Path(__file__).parent.parent


def sft_recipe(sample_dir: Path, path: Path, steps: int = 3) -> Path:
    """The repository's fine-tuning recipe, pointed at the session's sample set and shrunk."""
    recipe = yaml.safe_load((REPO / "recipes/sft_qa.yaml").read_text())
    recipe["trainer"].update(max_steps=steps, val_check_interval=steps, accelerator="cpu", enable_progress_bar=False)
    (callback,) = recipe["trainer"]["callbacks"]
    callback["init_args"].update(shards=str(sample_dir / "caption/val-*.tar"), limit=3, max_new_tokens=6, batch_size=4)
    recipe["data"].update(
        train=[{"urls": str(sample_dir / "qa/train-*.tar"), "type": "qa"}],
        val=[{"urls": str(sample_dir / "qa/val-*.tar"), "type": "qa"}],
        context=128, batch_size=4, num_workers=0,
    )
    recipe["model"]["warmup_steps"] = 1
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_downstream_table(checkpoint, sample_dir, tmp_path, capsys):
    recipe = sft_recipe(sample_dir, tmp_path / "sft.yaml")
    out = tmp_path / "down"
    argv = ["downstream", "--checkpoint", f"early={checkpoint}", "--checkpoint", f"again={checkpoint}",
            "--recipe", str(recipe), "--out", str(out), "--set", "trainer.precision=32-true"]
    assert main(argv) == 0

    report = json.loads((out / "downstream.json").read_text())
    assert report["scoring"]["limit"] == 3
    rows = report["models"]
    assert [row["name"] for row in rows] == ["early", "again"]
    for row in rows:
        # pretrained caption scores, zero-shot answers, then the fine-tuned run's summary
        assert {"cider", "digit_accuracy", "qa_accuracy", "val_loss", "sft_val_loss", "sft_qa_accuracy",
                "sft_qa_accuracy/cell"} <= set(row)
    table = capsys.readouterr().out
    assert "QA avg" in table
    assert "early" in table
    summary = json.loads(next((out / "early").glob("version_*/summary.json")).read_text())
    assert summary["tokens"]["D"] > 0
    assert set(summary["val_loss"]) == {"qa", "mean", "qa_shuffled_images"}
    assert list((out / "early").glob("version_*/events.out.tfevents.*"))


def test_downstream_rejects_recipe_without_scoring(checkpoint, tmp_path):
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(yaml.safe_dump({"trainer": {"max_steps": 2}}))
    with pytest.raises(SystemExit, match="no DownstreamEvaluation callback"):
        main(["downstream", "--checkpoint", f"a={checkpoint}", "--recipe", str(recipe), "--out", str(tmp_path)])


def test_init_from_loads_pretrained_weights(checkpoint):
    import torch

    from fusionlab.models import EarlyFusion
    from fusionlab.training.module import FusionModule
    from fusionlab.training.routing import read_backbone_checkpoint

    spec, state = read_backbone_checkpoint(checkpoint)
    module = FusionModule(EarlyFusion(**spec["init_args"]), init_from=str(checkpoint))
    assert not torch.equal(module.backbone.state_dict()["patch_embed.weight"], state["patch_embed.weight"])
    module.setup("fit")
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_init_from_rejects_other_shapes(checkpoint):
    from fusionlab.models import EarlyFusion
    from fusionlab.training.module import FusionModule
    from fusionlab.training.routing import read_backbone_checkpoint

    spec, _ = read_backbone_checkpoint(checkpoint)
    module = FusionModule(EarlyFusion(**{**spec["init_args"], "d_model": 16}), init_from=str(checkpoint))
    with pytest.raises(ValueError, match="does not match the checkpoint's shapes"):
        module.setup("fit")
