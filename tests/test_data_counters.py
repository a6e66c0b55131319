"""Bad input during training, and the measured token shares of the mixture.

Every reason is skipped, counted, logged to TensorBoard and written to the run summary, and strict
mode raises instead.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fusionlab.data.datamodule import FusionDataModule, Source
from fusionlab.data.errors import StrictDataError
from fusionlab.data.stats import data_metrics
from fusionlab.models import EarlyFusion
from fusionlab.training.module import FusionModule
from fusionlab.training.summary import RunSummary
from test_formats import caption_members, jpeg, png, truncated_copy, write_tar
from test_images import png_header_only

GEOMETRY = dict(image_size=8, patch_size=4, context=48, batch_size=2)

# One sample (or member) per reason; each reason must be counted exactly once in one epoch.
EXPECTED = {
    "damaged_shard": 1,
    "image_undecodable": 1,
    "ignored_member": 1,
    "image_too_large": 1,
    "empty_member": 1,
    "empty_text": 1,
    "missing_text": 1,
    "missing_image": 1,
    "dotted_key": 1,
    "invalid_json": 1,
    "missing_json": 1,
}


@pytest.fixture
def bad_sources(tmp_path) -> list[Source]:
    caption = caption_members(["a0", "a1"]) + [
        ("b.png", png()), ("b.pyd", b"\x80\x04K\x01."), ("b.txt", "sample b."),  # pickle: never read
        ("c.png", png_header_only(20_000, 20_000)), ("c.txt", "a bomb"),
        ("d.jpg", jpeg()[:100]), ("d.txt", "a truncated jpeg"),
        ("e.png", b""), ("e.txt", "a zero-byte image"),
        ("f.png", png()), ("f.txt", ""),
        ("g.png", png()),
        ("h.txt", "an orphan caption"),
        ("photo.v2.jpg", jpeg()), ("photo.v2.txt", "a dotted key"),
    ]
    write_tar(tmp_path / "cap-0.tar", caption)
    full = write_tar(tmp_path / "full.tar", caption_members([f"z{i}" for i in range(5)], jpeg))
    truncated_copy(full, "z2.jpg", 100, tmp_path / "cap-1.tar")  # a shard cut inside sample z2's image
    document = {"texts": ["sample i0.", None], "images": [None, "img0.png"]}
    write_tar(tmp_path / "il.tar", [("i0.img0.png", png()), ("i0.json", json.dumps(document)),
                                    ("i1.json", "{not json"), ("i2.png", png()), ("i2.txt", "no json")])
    write_tar(tmp_path / "txt.tar", [(f"t{i}.txt", f"sample t{i}. Some prose.") for i in range(4)])
    return [
        Source(str(tmp_path / "cap-{0..1}.tar"), "caption"),
        Source(str(tmp_path / "il.tar"), "interleaved"),
        Source(str(tmp_path / "txt.tar"), "text"),
    ]


def fit(dm: FusionDataModule, tmp_path) -> L.Trainer:
    torch.manual_seed(0)
    backbone = EarlyFusion(vocab_size=dm.vocab_size, image_size=8, patch_size=4, d_model=16, n_layers=1,
                           n_heads=2, ffn_multiple_of=16)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, max_steps=100, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[RunSummary()],
        logger=TensorBoardLogger(tmp_path / "runs", name="counters"),
    )
    trainer.fit(FusionModule(backbone, warmup_steps=1, shuffled_image_eval=False), datamodule=dm)
    return trainer


def last_scalars(log_dir: str) -> dict[str, float]:
    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def test_every_reason_counted_logged_and_summarised(tmp_path, bad_sources):
    dm = FusionDataModule(bad_sources, resample=False, **GEOMETRY)
    trainer = fit(dm, tmp_path)

    summary = json.loads((tmp_path / "runs" / "counters" / "version_0" / "summary.json").read_text())
    counters = summary["data_counters"]
    skipped = {key.removeprefix("skipped/"): n for key, n in counters.items() if key.startswith("skipped/")}
    assert skipped == EXPECTED
    assert not any(key.startswith("position/") for key in counters)

    scalars = last_scalars(trainer.logger.log_dir)
    for reason, count in EXPECTED.items():
        assert scalars[f"data/skipped/{reason}"] == count, reason
    tokens = sum(counters[f"tokens/{name}"] for name in ("caption", "interleaved", "text"))
    assert scalars["data/share/image"] == pytest.approx(counters["tokens/image"] / tokens)
    assert scalars["data/share/text"] == pytest.approx(counters["tokens/text"] / tokens)


def test_strict_mode_raises_in_training(tmp_path, bad_sources):
    dm = FusionDataModule(bad_sources, resample=False, strict=True, **GEOMETRY)
    with pytest.raises(StrictDataError, match=r"shard '.*\.tar', sample '\w+'"):
        fit(dm, tmp_path)


def test_data_metrics_shares():
    counters = {"tokens/caption": 300, "tokens/interleaved": 500, "tokens/text": 200, "tokens/image": 540,
                "skipped/empty_text": 3, "images_dropped": 2, "positions": 4096, "padding_batches": 1}
    metrics = data_metrics(counters)
    assert metrics["share/image"] == pytest.approx(0.54)
    assert metrics["share/caption"] == pytest.approx(0.3)
    assert metrics["share/interleaved"] == pytest.approx(0.5)
    assert metrics["share/text"] == pytest.approx(0.2)
    assert metrics["skipped/empty_text"] == 3
    assert metrics["images_dropped"] == 2
    assert metrics["padding_batches"] == 1
    assert "positions" not in metrics
    assert data_metrics({"skipped/invalid_json": 1}) == {"skipped/invalid_json": 1.0}
