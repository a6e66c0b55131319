"""Epoch length across DataLoader workers: what Lightning runs is what the loader produces."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from fusionlab.data.datamodule import FusionDataModule, Source
from fusionlab.models import EarlyFusion
from fusionlab.training.module import FusionModule
from test_datamodule import text_shard

# Text samples of exactly one packed row of 32 positions: bos + "sample kNN." + 19 bytes + eos.
ROW_BODY = " " + "x" * 18
GEOMETRY = dict(image_size=8, patch_size=4, context=32, batch_size=4)


class EpochRecorder(Callback):
    def __init__(self) -> None:
        self.trained: dict[int, int] = {}
        self.validated: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.trained[trainer.current_epoch] = self.trained.get(trainer.current_epoch, 0) + 1

    def on_validation_epoch_end(self, trainer, module) -> None:
        self.validated.append(trainer.current_epoch)


def fit(dm: FusionDataModule, tmp_path, max_epochs: int = 2) -> tuple[L.Trainer, EpochRecorder, ModelCheckpoint]:
    torch.manual_seed(0)
    backbone = EarlyFusion(vocab_size=dm.vocab_size, image_size=8, patch_size=4, d_model=16, n_layers=1,
                           n_heads=2, ffn_multiple_of=16)
    recorder = EpochRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, max_steps=100, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder, checkpoint],
    )
    trainer.fit(FusionModule(backbone, warmup_steps=1, shuffled_image_eval=False), datamodule=dm)
    return trainer, recorder, checkpoint


@pytest.fixture
def twelve_samples(tmp_path) -> list[Source]:
    for s in range(2):
        text_shard(tmp_path / f"k-{s}.tar", [f"k{s}{i}" for i in range(6)], body=ROW_BODY)
    return [Source(str(tmp_path / "k-{0..1}.tar"), "text")]


def test_finite_epochs_validate_and_checkpoint(tmp_path, twelve_samples):
    dm = FusionDataModule(twelve_samples, twelve_samples, num_workers=2, resample=False, drop_last=True,
                          shuffle_buffer=0, **GEOMETRY)
    produced = sum(1 for _ in dm.train_dataloader())
    # 2 workers x 6 one-row samples: one full batch each, and each partial batch of 2 rows dropped.
    assert produced == 2
    trainer, recorder, checkpoint = fit(dm, tmp_path)
    assert recorder.trained == {0: produced, 1: produced}
    assert recorder.validated == [0, 1]
    assert checkpoint.best_model_path.endswith(".ckpt")
    assert any((tmp_path / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_configured_epoch_length(tmp_path, twelve_samples, num_workers):
    dm = FusionDataModule(twelve_samples, twelve_samples, num_workers=num_workers, resample=True,
                          batches_per_epoch=5, **GEOMETRY)
    assert len(dm.train_dataloader()) == 5
    trainer, recorder, _ = fit(dm, tmp_path)
    assert trainer.num_training_batches == 5
    assert recorder.trained == {0: 5, 1: 5}
    assert recorder.validated == [0, 1]


def test_epoch_length_needs_resampling(twelve_samples):
    with pytest.raises(ValueError, match="resample=True"):
        FusionDataModule(twelve_samples, resample=False, batches_per_epoch=5, **GEOMETRY)


def test_unknown_length_is_a_type_error(twelve_samples):
    loader = FusionDataModule(twelve_samples, **GEOMETRY).train_dataloader()
    with pytest.raises(TypeError, match="batches_per_epoch"):
        len(loader)
