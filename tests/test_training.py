"""The training module: loss normalisation, padding, non-finite steps, schedule, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_recipe, write_recipe
from fusionlab.batch import IGNORE_INDEX
from fusionlab.models import EarlyFusion
from fusionlab.training.cli import run_lightning_cli
from fusionlab.training.metrics import TokenLossByType
from fusionlab.training.module import FusionModule, split_rows
from fusionlab.training.schedule import wsd_factor
from helpers import make_batch


def tiny_backbone() -> EarlyFusion:
    torch.manual_seed(0)
    return EarlyFusion(image_size=8, patch_size=4, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32)


def sample_batch(seed: int = 0):
    rows = [
        [[("text", 5), ("image", 1), ("text", 6)], [("text", 9)]],
        [[("text", 3)]],
        [[("image", 1), ("text", 12)]],
        [[("text", 20)], [("text", 2), ("image", 1), ("text", 2)]],
    ]
    return make_batch(rows, context=32, tokens_per_image=4, image_size=8, seed=seed)


def test_wsd_schedule_shape():
    T, warmup = 100, 10
    assert wsd_factor(0, T, warmup) == pytest.approx(0.1)
    assert wsd_factor(9, T, warmup) == pytest.approx(1.0)
    assert wsd_factor(50, T, warmup) == 1.0
    assert wsd_factor(80, T, warmup) == 1.0
    # lr = peak * (1 - sqrt((t - 0.8 T) / (0.2 T)))
    assert wsd_factor(85, T, warmup) == pytest.approx(1 - math.sqrt(5 / 20))
    assert wsd_factor(100, T, warmup) == 0.0


def _gradients(module: FusionModule, micro_batches: int, batch) -> dict[str, torch.Tensor]:
    """Gradients of one optimiser step's loss, computed as training_step normalises it."""
    module.zero_grad()
    n_targets = (batch.targets != IGNORE_INDEX).sum()
    for part in split_rows(batch, micro_batches):
        token_loss, aux = module._token_loss(part)
        (token_loss.sum() / n_targets + aux / micro_batches).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_loss_does_not_depend_on_micro_batches():
    module = FusionModule(tiny_backbone())
    batch = sample_batch()
    whole = _gradients(module, 1, batch)
    split = _gradients(module, 2, batch)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_split_rows_rebases_images():
    batch = sample_batch()
    parts = split_rows(batch, 2)
    assert sum(p.images.shape[0] for p in parts) == batch.images.shape[0]
    for part in parts:
        used = part.image_index[part.image_index >= 0]
        assert used.min() == 0
        assert used.max() == part.images.shape[0] - 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padding_row_does_not_change_loss(precision):
    """C10: a row that is all padding leaves the loss and gradients finite and unchanged."""
    module = FusionModule(tiny_backbone())
    real = make_batch([[[("text", 5), ("image", 1), ("text", 6)]]], context=16, tokens_per_image=4, image_size=8)
    padded = make_batch([[[("text", 5), ("image", 1), ("text", 6)]], []], context=16, tokens_per_image=4, image_size=8)
    padded.images = real.images
    tolerance = 1e-6 if precision == "fp32" else 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss_real = module._token_loss(real)[0].sum() / (real.targets != IGNORE_INDEX).sum()
        token_loss, _ = module._token_loss(padded)
        loss_padded = token_loss.sum() / (padded.targets != IGNORE_INDEX).sum()
    loss_padded.backward()
    assert torch.isfinite(loss_padded)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert abs(loss_padded.item() - loss_real.item()) <= tolerance * abs(loss_real.item())


def test_validation_loss_is_token_weighted_not_batch_mean():
    metric = TokenLossByType()
    # Two batches of caption tokens: 1 token with loss 4, then 3 tokens with loss 0.
    targets = torch.tensor([[1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    metric.update(torch.tensor([[4.0, 9.0, 9.0, 9.0]]), targets, torch.zeros(1, 4, dtype=torch.long))
    metric.update(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    losses = metric.compute()
    assert losses["caption"].item() == pytest.approx(1.0)  # (4 + 0 + 0 + 0) / 4, not (4 + 0) / 2
    assert "text" not in losses
    assert losses["mean"].item() == pytest.approx(1.0)


def test_nonfinite_steps_are_skipped_then_fatal(sample_dir, tmp_path, monkeypatch):
    """Steps 2 and later produce a NaN loss: each is skipped without an update, the third stops."""
    original = FusionModule._token_loss
    weights_after_first_step: dict[str, torch.Tensor] = {}
    modules: list[FusionModule] = []

    def poisoned(self, batch, with_stats=False):
        out = original(self, batch, with_stats)
        if not self.training or self.global_step < 1:
            return out
        if not weights_after_first_step:
            modules.append(self)
            weights_after_first_step.update({n: p.detach().clone() for n, p in self.named_parameters()})
        return (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(FusionModule, "_token_loss", poisoned)
    recipe = tiny_recipe(
        sample_dir, tmp_path, trainer={"max_steps": 8, "val_check_interval": 8}, model={"max_nonfinite_steps": 3},
    )
    config = write_recipe(tmp_path / "nan.yaml", recipe)
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        run_lightning_cli(["fit", "--config", str(config)])
    assert modules, "the poisoned steps never ran"
    module = modules[0]
    assert module.nonfinite_steps == 3
    for name, param in module.named_parameters():
        assert torch.equal(param.detach(), weights_after_first_step[name]), f"{name} changed in a skipped step"


def test_fit_writes_summary_config_and_safe_checkpoint(sample_dir, tmp_path):
    config = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(sample_dir, tmp_path))
    run_lightning_cli(["fit", "--config", str(config)])
    run_dir = tmp_path / "tiny" / "version_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    assert set(summary["val_loss"]) >= {"caption", "interleaved", "text", "mean"}
    mean = summary["val_loss"]["mean"]
    assert mean == pytest.approx(sum(summary["val_loss"][t] for t in ("caption", "interleaved", "text")) / 3)
    counts = summary["parameters"]
    assert summary["flops"] == pytest.approx(6 * counts["N"] * summary["tokens"]["D"])
    # 8 steps of 4 rows of 128 positions: tokens seen count non-padding positions only
    assert 0 < summary["tokens"]["D"] <= 8 * 4 * 128
    assert 0 < summary["tokens"]["D_v"] < summary["tokens"]["D"]
    assert summary["provenance"]["precision"] == "32-true"
    assert summary["provenance"]["shards"]["train"][0]["type"] == "caption"
    assert (run_dir / "config.yaml").is_file()

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["backbone"]["class_path"].endswith("EarlyFusion")
    assert checkpoint["backbone"]["init_args"]["vocab_size"] == 264
    assert checkpoint["fusionlab"]["tokens_seen"] == summary["tokens"]["D"]


def test_cross_entropy_matches_reference():
    module = FusionModule(tiny_backbone())
    batch = sample_batch()
    token_loss, _ = module._token_loss(batch)
    logits = module.backbone(batch).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(token_loss.sum(), expected, rtol=1e-5, atol=1e-5)


def test_validate_and_test_from_checkpoint(sample_dir, tmp_path):
    config = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(sample_dir, tmp_path, trainer={"max_steps": 4}))
    fit = run_lightning_cli(["fit", "--config", str(config)])
    checkpoint = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    trained = fit.model.last_val_losses
    for command in ("validate", "test"):
        cli = run_lightning_cli([command, "--config", str(config), "--ckpt_path", str(checkpoint)])
        losses = cli.model.last_val_losses
        assert set(losses) >= {"caption", "interleaved", "text", "mean"}
        # the same weights on the same validation set give the fit's final losses
        assert losses["mean"] == pytest.approx(trained["mean"], rel=1e-5)


def test_last_checkpoint_holds_final_step(sample_dir, tmp_path):
    # every_n_train_steps 5 does not divide max_steps 8: last.ckpt must still be step 8, not 5.
    recipe = tiny_recipe(sample_dir, tmp_path, checkpoint={"every_n_train_steps": 5})
    run_lightning_cli(["fit", "--config", str(write_recipe(tmp_path / "r.yaml", recipe))])
    checkpoints = tmp_path / "tiny" / "version_0" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    assert (checkpoints / "epoch=0-step=5.ckpt").is_file()
