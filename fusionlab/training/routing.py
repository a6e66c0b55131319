"""Routing statistics of mixture-of-experts backbones: how image and text tokens spread over experts.

Each MoE layer i stores two int64 tensors of shape (n_experts,) in BackboneOutput.stats,
`routing/layer{i}/image_tokens` and `routing/layer{i}/text_tokens`: the routed slots per expert,
padding excluded, so together they sum to top_k * non-padding tokens. From these counts:

- the image share of expert e is p_e = image / (image + text);
- the specialisation score of a layer is the mean over experts of 1 - H(p_e), with H the binary
  entropy in bits, so an expert that receives one modality scores 1 and a half-and-half expert 0.
  Experts that received no token have no p_e: they are left out of the mean and counted.

`RoutingStatistics` logs these over each validation epoch. `routing_report` computes them for a
checkpoint on given shards and writes a heatmap PNG and a JSON file.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from fusionlab.batch import Batch
from fusionlab.models.base import Backbone
from fusionlab.models.moe import moe_layers

log = logging.getLogger(__name__)

ROUTING_KEY = re.compile(r"^routing/layer(\d+)/(image|text)_tokens$")
HEATMAP_TAG = "routing/image_share"


# --------------------------------------------------------------------------------------------
# counts and scores


class RoutingCounts:
    """Image and text tokens routed to each expert of each MoE layer, summed over batches."""

    def __init__(self, layers: Mapping[int, int] | None = None, device: torch.device | str = "cpu"):
        # layer index -> (2, n_experts) int64 counts, row 0 image tokens and row 1 text tokens
        self.counts: dict[int, Tensor] = {
            layer: torch.zeros(2, n_experts, dtype=torch.long, device=device)
            for layer, n_experts in (layers or {}).items()
        }

    def add(self, stats: Mapping[str, Tensor]) -> None:
        """Add the routing entries of one forward pass's stats, ignoring other keys."""
        for key, value in stats.items():
            match = ROUTING_KEY.match(key)
            if match is None:
                continue
            layer, row = int(match.group(1)), 0 if match.group(2) == "image" else 1
            value = value.detach().long()
            if layer not in self.counts:
                # NOTE: a layer first seen here, not allocated up front from the model's MoE modules,
                # must reach every rank, or the reduction across ranks gets tensors of other shapes.
                self.counts[layer] = torch.zeros(2, value.numel(), dtype=torch.long, device=value.device)
            target = self.counts[layer]
            if target.shape[1] != value.numel():
                raise ValueError(
                    f"{key} has {value.numel()} experts but earlier batches had {target.shape[1]}: "
                    "routing counts of one run must come from one model"
                )
            target[row] += value.to(target.device)

    @property
    def layers(self) -> list[int]:
        return sorted(self.counts)

    def stacked(self) -> Tensor:
        """Return the counts as one int64 tensor (n_layers, 2, n_experts), layers in order."""
        if not self.counts:
            return torch.zeros(0, 2, 0, dtype=torch.long)
        return torch.stack([self.counts[layer] for layer in self.layers])

    @classmethod
    def from_stacked(cls, layers: Sequence[int], stacked: Tensor) -> RoutingCounts:
        counts = cls()
        counts.counts = {layer: stacked[i] for i, layer in enumerate(layers)}
        return counts

    @property
    def image_tokens(self) -> Tensor:
        """(n_layers, n_experts) image tokens per expert."""
        return self.stacked()[:, 0]

    @property
    def text_tokens(self) -> Tensor:
        """(n_layers, n_experts) text tokens per expert."""
        return self.stacked()[:, 1]


def image_share(image_tokens: Tensor, text_tokens: Tensor) -> Tensor:
    """Return the share of image tokens per expert in float64, NaN for an expert with no token."""
    image, total = image_tokens.double(), (image_tokens + text_tokens).double()
    return torch.where(total > 0, image / total.clamp(min=1), torch.nan)


def specialization_scores(image_tokens: Tensor, text_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Compute each layer's specialisation score and number of empty experts.

    Takes (n_layers, n_experts) counts. The score is the mean over non-empty experts of 1 - H(p),
    H the binary entropy in bits of the expert's image share p: 1 when every expert receives one
    modality, 0 when every expert receives both equally. A layer whose experts are all empty scores NaN.
    """
    p = image_share(image_tokens, text_tokens)
    empty = p.isnan()
    p = p.nan_to_num(0.0)
    # xlogy(0, 0) = 0, so a unimodal expert (p = 0 or 1) has zero entropy
    entropy_bits = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
    specialization = torch.where(empty, 0.0, 1.0 - entropy_bits)
    n_filled = (~empty).sum(-1)
    scores = torch.where(n_filled > 0, specialization.sum(-1) / n_filled.clamp(min=1), torch.nan)
    return scores, empty.sum(-1)


# --------------------------------------------------------------------------------------------
# heatmap


def heatmap_figure(layers: Sequence[int], image_tokens: Tensor, text_tokens: Tensor):
    """Draw the image share of every (layer, expert) as a matplotlib Figure, empty experts in grey.

    Uses the Agg canvas directly, without pyplot, so no global backend is changed.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    share = image_share(image_tokens, text_tokens).numpy()
    n_layers, n_experts = share.shape
    fig = Figure(figsize=(2.5 + 0.55 * n_experts, 1.5 + 0.3 * n_layers), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers), [str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("share of image tokens per expert")
    fig.colorbar(im, ax=ax, label="image tokens / all tokens")
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render a Figure on its Agg canvas into an (H, W, 3) uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------------------------
# validation callback


class RoutingStatistics(L.Callback):
    """Log how MoE layers route image and text tokens, over each whole validation (or test) set.

    Reads the routing counts that the module's validation_step returns under "stats", sums them
    over batches and ranks, and logs per MoE layer `routing/specialization_layer{i}` and
    `routing/empty_experts_layer{i}`. When a logger is TensorBoard, also adds the image-share
    heatmap as the image `routing/image_share`. Nothing is logged for a backbone without MoE
    layers or during the sanity check.

    Args:
        heatmap: add the heatmap image to TensorBoard loggers.
    """

    def __init__(self, heatmap: bool = True):
        super().__init__()
        self.heatmap = heatmap
        self.counts: RoutingCounts | None = None
        # {layer: score} of the last finished epoch, NaN for a layer whose experts were all empty
        self.last_scores: dict[int, float] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Allocating every layer up front gives all ranks the same tensor to reduce, even a rank
        # that receives no validation batch.
        self.counts = RoutingCounts(moe_layers(pl_module), device=pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.counts is not None and isinstance(outputs, Mapping):
            self.counts.add(outputs.get("stats") or {})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts, self.counts = self.counts, None
        if counts is None or not counts.layers or trainer.sanity_checking:
            return
        summed = trainer.strategy.reduce(counts.stacked(), reduce_op="sum")
        counts = RoutingCounts.from_stacked(counts.layers, summed)
        scores, empty = specialization_scores(counts.image_tokens, counts.text_tokens)
        self.last_scores = {layer: float(score) for layer, score in zip(counts.layers, scores)}

        # Python floats: the counts are already summed over ranks, so each rank logs the same value.
        for layer, score, n_empty in zip(counts.layers, scores.tolist(), empty.tolist()):
            if not math.isnan(score):
                pl_module.log(f"routing/specialization_layer{layer}", score)
            pl_module.log(f"routing/empty_experts_layer{layer}", float(n_empty))
        if self.heatmap and trainer.is_global_zero:
            self._add_heatmap(trainer, counts)

    def _add_heatmap(self, trainer: L.Trainer, counts: RoutingCounts) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        fig = heatmap_figure(counts.layers, counts.image_tokens.cpu(), counts.text_tokens.cpu())
        image = figure_to_array(fig)
        for logger in loggers:
            logger.experiment.add_image(HEATMAP_TAG, image, trainer.global_step, dataformats="HWC")

    def summary_section(self) -> dict[str, Any]:
        """Return the routing part of the run summary: the last validation's scores per layer."""
        if not self.last_scores:
            return {}
        scores = {f"layer{layer}": _finite_or_none(score) for layer, score in self.last_scores.items()}
        return {"routing": {"specialization": scores}}

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


# --------------------------------------------------------------------------------------------
# report for a checkpoint


def read_backbone_checkpoint(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return the backbone spec {"class_path", "init_args"} and the backbone state dict of a checkpoint.

    A FusionModule checkpoint stores checkpoint["backbone"] and a state_dict whose backbone keys
    start with "backbone.".
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    spec = checkpoint.get("backbone")
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(
            f"checkpoint {checkpoint_path} has no 'backbone' entry with a class_path: it was not written by "
            "fusionlab's FusionModule (or by a version before backbones were recorded)"
        )
    prefix = "backbone."
    state = {key.removeprefix(prefix): value for key, value in checkpoint["state_dict"].items()
             if key.startswith(prefix)}
    return dict(spec), state


def load_backbone(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """Rebuild the backbone of a FusionModule checkpoint and load its weights."""
    spec, state = read_backbone_checkpoint(checkpoint_path, map_location)
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(f"checkpoint class_path {spec['class_path']!r} is not a fusionlab Backbone subclass")
    backbone = cls(**spec.get("init_args", {}))
    backbone.load_state_dict(state)
    return backbone.eval()


@torch.no_grad()
def collect_routing_counts(
    backbone: Backbone, batches: Iterable[Batch], max_batches: int | None = None
) -> tuple[RoutingCounts, int]:
    """Run the backbone on batches and sum their routing counts. Return the counts and the batch count."""
    layers = moe_layers(backbone)
    if not layers:
        raise ValueError(f"{type(backbone).__name__} has no MoE layer, so there is no routing to report")
    device = next(backbone.parameters()).device
    counts = RoutingCounts(layers, device=device)
    n_batches = 0
    for batch in batches:
        if max_batches is not None and n_batches >= max_batches:
            break
        counts.add(backbone(batch.to(device)).stats)
        n_batches += 1
    return counts, n_batches


def write_routing_report(
    counts: RoutingCounts, out_dir: str | Path, metadata: Mapping[str, Any] | None = None
) -> dict:
    """Write routing.png (heatmap) and routing.json (counts, scores) to out_dir and return the JSON data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_tokens, text_tokens = counts.image_tokens.cpu(), counts.text_tokens.cpu()
    scores, empty = specialization_scores(image_tokens, text_tokens)
    share = image_share(image_tokens, text_tokens)

    layers = []
    for i, layer in enumerate(counts.layers):
        layers.append({
            "layer": layer,
            "specialization": _finite_or_none(float(scores[i])),
            "empty_experts": int(empty[i]),
            "image_tokens": image_tokens[i].tolist(),
            "text_tokens": text_tokens[i].tolist(),
            "image_share": [_finite_or_none(value) for value in share[i].tolist()],
        })
    report = {**(metadata or {}), "layers": layers}
    (out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    heatmap_figure(counts.layers, image_tokens, text_tokens).savefig(out / "routing.png")
    return report


def routing_report(
    checkpoint_path: str | Path,
    sources: Sequence[Any],
    out_dir: str | Path,
    *,
    context: int,
    batch_size: int = 8,
    tokenizer: str = "byte",
    max_batches: int | None = None,
    device: str = "cpu",
) -> dict:
    """Compute the routing statistics of a checkpoint on shards and write routing.png and routing.json.

    Args:
        checkpoint_path: a FusionModule checkpoint of an MoE backbone.
        sources: fusionlab.data Source objects, or dicts with their fields ({"urls", "type"}).
        out_dir: folder for routing.png and routing.json (created when missing).
        context: positions per packed row, as in the training recipe's data.context.
        batch_size: rows per forward pass.
        tokenizer: the tokenizer spec the model was trained with ("byte" or a tokenizers .json path).
        max_batches: stop after this many batches, or read every sample of the shards when None.
        device: where to run the backbone.
    Returns:
        The data written to routing.json.
    """
    backbone = load_backbone(checkpoint_path).to(device)
    batches = read_shard_batches(
        backbone, sources, context=context, batch_size=batch_size, tokenizer=tokenizer
    )
    counts, n_batches = collect_routing_counts(backbone, batches, max_batches)
    metadata = {
        "checkpoint": str(checkpoint_path),
        "batches": n_batches,
        "sources": [_describe(source) for source in sources],
    }
    report = write_routing_report(counts, out_dir, metadata)
    log.info("routing report of %s over %d batches written to %s", checkpoint_path, n_batches, out_dir)
    return report


def read_shard_batches(
    backbone: Backbone, sources: Sequence[Any], *, context: int, batch_size: int, tokenizer: str
) -> Iterable[Batch]:
    """Read every sample of the sources once, in order, as packed Batches for this backbone.

    The data side of the report: the validation stream of FusionDataModule, with the image
    geometry taken from the backbone's constructor arguments.
    """
    from fusionlab.data.datamodule import FusionDataModule

    arguments = backbone.init_arguments()
    if "image_size" not in arguments or "patch_size" not in arguments:
        raise ValueError(
            f"{type(backbone).__name__} records no image_size and patch_size constructor arguments, "
            "so the image geometry of its shards is unknown"
        )
    data = FusionDataModule(
        train=list(sources),
        val=list(sources),
        tokenizer=tokenizer,
        image_size=arguments["image_size"],
        patch_size=arguments["patch_size"],
        context=context,
        batch_size=batch_size,
    )
    data.setup("validate")
    return data.val_dataloader()


def _describe(source: Any) -> Any:
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "urls"):
        return {"urls": source.urls, "type": source.type}
    return str(source)


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN: an empty expert's share and an all-empty layer's score become null.
    return None if math.isnan(value) else value
