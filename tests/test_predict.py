"""`fusionlab predict` end to end: a tiny fit, then captions of shards and of an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_downstream_table(checkpoint, sample_dir, tmp_path, capsys):
    argv = ["downstream", "--checkpoint", f"early={checkpoint}", "--checkpoint", f"again={checkpoint}",
            "--train-shards", str(sample_dir / "caption/train-*.tar"),
            "--eval-shards", str(sample_dir / "caption/val-*.tar"), "--out", str(tmp_path / "down"),
            "--config", str(Path(__file__).parent.parent / "configs/sft_qa.yaml"),
            "--steps", "3", "--train-limit", "8", "--eval-limit", "3", "--max-new-tokens", "6", "--batch-size", "4"]
    assert main(argv) == 0

    report = json.loads((tmp_path / "down" / "downstream.json").read_text())
    assert report["options"]["steps"] == 3
    assert report["options"]["lr"] == 1.0e-3
    rows = report["models"]
    assert [row["name"] for row in rows] == ["early", "again"]
    for row in rows:
        assert {"cider", "digit_accuracy", "qa_accuracy", "qa_accuracy/cell", "val_loss"} <= set(row)
        assert len(row["sft_loss"]) == 2
    table = capsys.readouterr().out
    assert "QA avg" in table
    assert "early" in table
    assert list((tmp_path / "down" / "early").glob("events.out.tfevents.*"))


def test_qa_batch_targets_answers_only():
    import torch

    from fusionlab.data.tokenizer import ByteTokenizer
    from fusionlab.evaluation.finetune import qa_batch
    from fusionlab.evaluation.scene_tasks import Question

    tokenizer = ByteTokenizer()
    questions = [Question("k", "count", "How many?", "2"), Question("k", "presence", "Is there a 7?", "no")]
    batch = qa_batch(questions, {"k": torch.zeros(3, 16, 16, dtype=torch.uint8)}, tokenizer, tokens_per_image=4)

    for b, answer in enumerate([" 2", " no"]):
        targeted = batch.targets[b][batch.targets[b] >= 0].tolist()
        assert targeted == [*answer.encode(), tokenizer.eos_id]
        set_at = (batch.targets[b] >= 0).nonzero().flatten()
        assert batch.tokens[b, set_at + 1].tolist() == targeted
    assert batch.image_index[1].tolist()[2:6] == [1, 1, 1, 1]
    assert batch.images.shape[0] == 2
