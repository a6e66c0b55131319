"""The LightningModule: losses, optimisation, schedule and token accounting for any backbone."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX, Batch
from fusionlab.data.stats import data_metrics
from fusionlab.models.base import Backbone, ParameterCounts
from fusionlab.training.metrics import TokenLossByType, loss_sums_by_type
from fusionlab.training.optim import build_optimizer
from fusionlab.training.schedule import wsd_factor

log = logging.getLogger(__name__)


class FusionModule(L.LightningModule):
    """Train a backbone on packed multimodal batches.

    The loss of an optimiser step is the summed token loss divided by the number of target tokens
    in the whole step (every rank, every micro-batch), so results do not depend on how the global
    batch is split. Optimisation is therefore manual: the target count is known before the first
    backward pass.

    Args:
        backbone: the architecture (early fusion, late fusion, MoE or a plugin).
        lr: peak learning rate.
        weight_decay: fully decoupled weight decay: each step shrinks weights by
            weight_decay * (lr_t / lr), independent of the peak learning rate.
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimiser steps.
        cooldown_fraction: share of the run spent in the inverse-square-root cooldown.
        grad_clip: maximum global gradient norm (0 disables clipping).
        micro_batches: split each loaded batch into this many micro-batches (gradient accumulation).
        max_nonfinite_steps: a step whose loss or gradient norm is not finite is skipped (no
            update) and counted. This many consecutive skips stop training with an error.
        fused_adamw: use the fused AdamW kernel (one kernel for all parameters; CPU and CUDA in
            torch 2.14).
        compile: compile the backbone with torch.compile (the first steps pay the compilation).
        shuffled_image_eval: also report validation loss with images shuffled across samples,
            which measures how much the model uses the pixels.
        init_from: a checkpoint of `fusionlab fit` whose backbone weights start this run, for
            fine-tuning a pretrained model. The optimiser, schedule, step and token counts start
            afresh. The recipe's backbone must have the same class and shapes; the simplest way
            is to give the pretraining run's config.yaml as the first --config. A run resumed with
            --ckpt_path restores its own weights over these.
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        cooldown_fraction: float = 0.2,
        grad_clip: float = 1.0,
        micro_batches: int = 1,
        max_nonfinite_steps: int = 10,
        fused_adamw: bool = False,
        compile: bool = False,
        shuffled_image_eval: bool = True,
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.automatic_optimization = False
        self.val_losses = TokenLossByType()
        self.val_losses_shuffled = TokenLossByType()
        # Tokens seen, as non-padding positions summed over ranks and steps (D and D_v).
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("image_tokens_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.data_counters: dict[str, int] = {}
        self.nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        self.last_val_losses: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------
    # optimisation

    def setup(self, stage: str) -> None:
        # Before configure_model (so before compilation) and before Lightning restores a --ckpt_path.
        if self.hparams.init_from and not getattr(self, "_initialised_from", None):
            self._load_pretrained(self.hparams.init_from)
            self._initialised_from = self.hparams.init_from
        # Counted now, before a sharding strategy wraps the model and leaves each rank a shard.
        _ = self.parameter_counts

    def _load_pretrained(self, path: str) -> None:
        from fusionlab.training.routing import read_backbone_checkpoint

        if not Path(path).is_file():
            raise FileNotFoundError(f"model.init_from {path} not found: give the path of a checkpoint of `fusionlab fit`")
        spec, state = read_backbone_checkpoint(path)
        cls = type(self.backbone)
        ours = f"{cls.__module__}.{cls.__qualname__}"
        if spec["class_path"] != ours:
            raise ValueError(
                f"model.init_from {path} contains a {spec['class_path']} backbone but the recipe builds a {ours}: "
                "give the pretraining run's config.yaml as the first --config"
            )
        try:
            self.backbone.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"model.init_from {path}: the recipe's backbone does not match the checkpoint's shapes "
                f"({error}). The checkpoint was built with {spec.get('init_args')}; give the pretraining "
                "run's config.yaml as the first --config"
            ) from error
        log.info("backbone weights initialised from %s", path)

    def configure_model(self) -> None:
        # In place, so parameter names and checkpoints are the same with and without compilation.
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self._compiled = True

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(
            self.backbone,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
            fused=self.hparams.fused_adamw,
        )
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("the warmup-stable-decay schedule needs trainer.max_steps > 0 in the recipe")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: wsd_factor(step, total, self.hparams.warmup_steps, self.hparams.cooldown_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        schedule = self.lr_schedulers()
        micro = split_rows(batch, self.hparams.micro_batches)

        # normalise by the target count of the whole optimiser step, over all ranks
        n_targets = self._all_reduce_sum((batch.targets != IGNORE_INDEX).sum().double())
        scale = self.trainer.world_size / n_targets.clamp(min=1)

        sums = torch.zeros(len(DATA_TYPES), dtype=torch.float64, device=self.device)
        counts = torch.zeros_like(sums)
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with self._maybe_no_sync(last):
                token_loss, aux = self._token_loss(part)
                loss = token_loss.sum() * scale.to(token_loss.dtype) + aux / len(micro)
                self.manual_backward(loss)
            part_sums, part_counts = loss_sums_by_type(token_loss.detach(), part.targets, part.source)
            sums += part_sums
            counts += part_counts

        grad_norm = self._clip_gradients()
        self._step_or_skip(optimizer, grad_norm)
        schedule.step()
        self._account(batch, sums, counts, n_targets, grad_norm)
        return (sums.sum() / counts.sum().clamp(min=1)).float()

    def _token_loss(self, batch: Batch, with_stats: bool = False) -> tuple:
        out = self.backbone(batch)
        token_loss = F.cross_entropy(
            out.logits.float().flatten(0, 1),
            batch.targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(batch.targets)
        if with_stats:
            return token_loss, out.aux_loss, out.stats
        return token_loss, out.aux_loss

    def _clip_gradients(self) -> Tensor:
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip > 0 else float("inf")
        model = getattr(self.trainer.strategy, "model", None)
        if isinstance(model, FullyShardedDataParallel):
            # Each rank has a shard of every gradient, so the global norm needs a reduction over
            # ranks, which FSDP's own clipping does. Every rank then gets the same norm.
            return model.clip_grad_norm_(max_norm)
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _step_or_skip(self, optimizer: Any, grad_norm: Tensor) -> None:
        # The gradient norm is computed from gradients already reduced across ranks, so every
        # rank takes the same decision. A non-finite loss makes the norm non-finite too.
        if torch.isfinite(grad_norm):
            optimizer.step()
            self._consecutive_nonfinite = 0
        else:
            self.nonfinite_steps += 1
            self._consecutive_nonfinite += 1
            log.warning(
                "step %d: non-finite loss or gradient norm; update skipped (%d consecutive)",
                self.global_step, self._consecutive_nonfinite,
            )
            if self._consecutive_nonfinite >= self.hparams.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self._consecutive_nonfinite} consecutive steps had a non-finite loss or "
                    "gradient: lower the learning rate, check the data, or resume from an earlier "
                    "checkpoint"
                )
        optimizer.zero_grad(set_to_none=True)

    def _maybe_no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        model = getattr(self.trainer.strategy, "model", None)
        if not last and hasattr(model, "no_sync"):
            # Reduce gradients across ranks once per optimiser step, on the last micro-batch.
            return model.no_sync()
        return contextlib.nullcontext()

    def _all_reduce_sum(self, value: Tensor) -> Tensor:
        if self.trainer.world_size > 1:
            value = self.trainer.strategy.reduce(value, reduce_op="sum")
        return value

    # ----------------------------------------------------------------------------------------
    # accounting and logging

    def _account(self, batch: Batch, sums: Tensor, counts: Tensor, n_targets: Tensor, grad_norm: Tensor) -> None:
        local = torch.stack([
            (~batch.padding_mask).sum().double(),
            batch.image_mask.sum().double(),
            (batch.document.amax(dim=1) + 1).sum().double(),  # documents (samples) in the batch
            *sums,
            *counts,
        ])
        total = self._all_reduce_sum(local)
        self.tokens_seen += total[0]
        self.image_tokens_seen += total[1]
        self.samples_seen += total[2]
        n_types = len(DATA_TYPES)
        type_sums, type_counts = total[3 : 3 + n_types], total[3 + n_types :]
        for key, value in batch.stats.items():
            self.data_counters[key] = self.data_counters.get(key, 0) + int(value)

        self.log("train/loss", (type_sums.sum() / n_targets.clamp(min=1)).float(), prog_bar=True)
        if not self._writes_logs_this_step():
            return
        for i, name in enumerate(DATA_TYPES):
            if type_counts[i] > 0:
                self.log(f"train/loss_{name}", (type_sums[i] / type_counts[i]).float())
        self.log("train/grad_norm", grad_norm.float())
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        self.log("train/packing_efficiency", total[0].float() / batch.tokens.numel() / self.trainer.world_size)
        self.log("train/tokens_seen", self.tokens_seen.float())
        self.log("train/flops", self.flops_seen_tensor())
        for key, value in data_metrics(self.data_counters).items():
            self.log(f"data/{key}", value)

    def _writes_logs_this_step(self) -> bool:
        # Lightning writes step metrics every log_every_n_steps and drops the others. Each self.log
        # costs Python time (about 1 ms on CPU), and the checks on type counts sync a GPU, so the
        # metrics beyond the progress bar's loss are logged only on steps that write them.
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def flops_seen_tensor(self) -> Tensor:
        """Training FLOPs so far, C = 6 (N D + N_v D_v), as a device tensor (no host sync)."""
        counts = self.parameter_counts
        return (6.0 * (counts.N * self.tokens_seen + counts.N_v * self.image_tokens_seen)).float()

    @functools.cached_property
    def parameter_counts(self) -> ParameterCounts:
        # Counts do not change during training: computed once, not every logged step.
        return self.backbone.parameter_counts()

    # ----------------------------------------------------------------------------------------
    # validation

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        token_loss, _, stats = self._token_loss(batch, with_stats=True)
        self.val_losses.update(token_loss, batch.targets, batch.source)
        if self.hparams.shuffled_image_eval and batch.images.shape[0] > 1:
            shuffled = batch.with_images(batch.images.roll(1, dims=0))
            token_loss, _ = self._token_loss(shuffled)
            self.val_losses_shuffled.update(token_loss, batch.targets, batch.source)
        # Backbone statistics (such as MoE routing counts) go to callbacks through the outputs.
        return {"stats": stats}

    def on_validation_epoch_end(self) -> None:
        losses = self.val_losses.compute()
        self.val_losses.reset()
        for name, value in losses.items():
            self.log(f"val/loss_{name}" if name != "mean" else "val/loss", value, prog_bar=name == "mean")
        self.last_val_losses = {name: float(value) for name, value in losses.items()}
        shuffled = self.val_losses_shuffled.compute() if self.hparams.shuffled_image_eval else {}
        self.val_losses_shuffled.reset()
        for name in ("caption", "interleaved", "qa"):
            if name in shuffled:
                self.log(f"val/loss_{name}_shuffled_images", shuffled[name])
                self.last_val_losses[f"{name}_shuffled_images"] = float(shuffled[name])

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ----------------------------------------------------------------------------------------
    # checkpoints: plain values only, so they load with torch.load(weights_only=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self.backbone)
        checkpoint["backbone"] = {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": self.backbone.init_arguments(),
        }
        checkpoint["fusionlab"] = {
            "tokens_seen": int(self.tokens_seen.item()),
            "image_tokens_seen": int(self.image_tokens_seen.item()),
            "samples_seen": int(self.samples_seen.item()),
            "data_counters": dict(self.data_counters),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("fusionlab", {})
        self.tokens_seen.fill_(state.get("tokens_seen", 0))
        self.image_tokens_seen.fill_(state.get("image_tokens_seen", 0))
        self.samples_seen.fill_(state.get("samples_seen", 0))
        self.data_counters = dict(state.get("data_counters", {}))
        self.nonfinite_steps = state.get("nonfinite_steps", 0)


def split_rows(batch: Batch, n: int) -> list[Batch]:
    """Split a batch into n micro-batches of consecutive rows, re-basing image indices."""
    if n <= 1:
        return [batch]
    B = batch.tokens.shape[0]
    if B % n:
        raise ValueError(f"batch_size {B} is not divisible by model.micro_batches {n}")
    size = B // n
    parts = []
    for start in range(0, B, size):
        rows = slice(start, start + size)
        image_index = batch.image_index[rows]
        used = image_index[image_index >= 0]
        first = int(used.min()) if used.numel() else 0
        last = int(used.max()) + 1 if used.numel() else 0
        parts.append(Batch(
            tokens=batch.tokens[rows],
            images=batch.images[first:last],
            image_index=torch.where(image_index >= 0, image_index - first, image_index),
            patch_index=batch.patch_index[rows],
            document=batch.document[rows],
            positions=batch.positions[rows],
            targets=batch.targets[rows],
            source=batch.source[rows],
        ))
    return parts
