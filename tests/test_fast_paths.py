"""Each fast path, switched on from the recipe's arguments, trains like the plain path.

Tolerances: fused AdamW, activation checkpointing and gradient accumulation change only the order of
floating-point operations (1e-5 relative on the loss after 3 steps); torch.compile fuses kernels
(1e-4); bf16 autocast rounds activations to 8 mantissa bits (2 % on the loss).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fusionlab.models import EarlyFusion
from fusionlab.training.module import FusionModule
from helpers import make_batch

STEPS = 3


def batches():
    layouts = [
        [[[("text", 5), ("image", 1), ("text", 9)], [("text", 6)]], [[("text", 20)]], [[("image", 1), ("text", 12)]], [[("text", 3)]]],
        [[[("text", 14), ("image", 1), ("text", 4)]], [[("text", 25)]], [[("text", 7)], [("text", 7)]], [[("image", 1)]]],
    ]
    return [make_batch(rows, context=32, tokens_per_image=4, image_size=8, seed=i) for i, rows in enumerate(layouts)]


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def train(precision: str = "32-true", backbone_args: dict | None = None, **module_args):
    torch.manual_seed(0)
    backbone = EarlyFusion(image_size=8, patch_size=4, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32,
                           **(backbone_args or {}))
    module = FusionModule(backbone, lr=3e-3, warmup_steps=1, shuffled_image_eval=False, **module_args)
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder], limit_val_batches=0,
    )
    data = batches()
    loader = torch.utils.data.DataLoader([data[i % len(data)] for i in range(STEPS)], batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return recorder.losses, {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


@pytest.fixture(scope="module")
def plain():
    return train()


def assert_same_training(run, reference, rtol):
    losses, weights = run
    ref_losses, ref_weights = reference
    assert len(losses) == STEPS
    for got, expected in zip(losses, ref_losses):
        assert got == pytest.approx(expected, rel=rtol)
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=rtol * 10, atol=rtol, msg=name)


def test_losses_change_over_steps(plain):
    losses, _ = plain
    assert losses[0] != losses[-1]


def test_fused_adamw(plain):
    assert_same_training(train(fused_adamw=True), plain, rtol=1e-5)


def test_activation_checkpointing(plain):
    assert_same_training(train(backbone_args={"activation_checkpointing": True}), plain, rtol=1e-5)


def test_gradient_accumulation(plain):
    """Two micro-batches of two rows give the update of one batch of four rows."""
    assert_same_training(train(micro_batches=2), plain, rtol=1e-5)


def test_bf16_autocast(plain):
    losses, _ = train(precision="bf16-mixed")
    for got, expected in zip(losses, plain[0]):
        assert got == pytest.approx(expected, rel=0.02)


def test_torch_compile(plain):
    assert_same_training(train(compile=True), plain, rtol=1e-4)
