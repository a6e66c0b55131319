"""The backbone contract: what every architecture, built-in or plugin, provides.

A backbone maps a packed `Batch` to next-token logits plus auxiliary losses, and reports the
parameter counts that compute accounting needs (C = 6 (N D + N_v D_v)).
"""

from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from fusionlab.batch import Batch
from fusionlab.models.layers import LayerContext, packed_attention_mask, packed_block_mask


class ParameterCounts(NamedTuple):
    """Parameter counts for compute accounting.

    N: active parameters that process every token (decoder with both embedding matrices, as
    Shukor et al. 2025 count them, plus image stem or connector). N_v: vision encoder parameters,
    which process image tokens only. active = N + N_v. total also counts experts a token does not use.
    """

    N: int
    N_v: int
    active: int
    total: int


@dataclass
class BackboneOutput:
    logits: Tensor  # (B, T, vocab_size)
    aux_loss: Tensor  # scalar, already weighted; zero for dense models
    stats: dict[str, Tensor] = field(default_factory=dict)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _RecordArguments(ABCMeta):
    """Metaclass that stores each backbone's bound constructor arguments after construction.

    Recording happens around the constructor call, not by wrapping `__init__`, so the signature
    that jsonargparse reads to type-check recipes stays the subclass's own.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = super().__call__(*args, **kwargs)
        bound = inspect.signature(cls.__init__).bind(instance, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(arguments)))  # self
        instance._init_arguments = {name: _plain(value) for name, value in arguments.items()}
        return instance


def _plain(value: Any) -> Any:
    """Turn dataclass arguments (such as an MoE config) into dicts, so checkpoints hold plain values."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


class Backbone(nn.Module, metaclass=_RecordArguments):
    """Base class of every architecture.

    Subclasses take plain, YAML-serialisable constructor arguments and set `vocab_size` and
    `tokens_per_image` (positions one image occupies in the packed sequence).
    """

    vocab_size: int
    tokens_per_image: int

    @abstractmethod
    def forward(self, batch: Batch) -> BackboneOutput: ...

    @abstractmethod
    def parameter_counts(self) -> ParameterCounts: ...

    def flops_per_step(self, n_tokens: int, n_image_tokens: int) -> float:
        """Training FLOPs by the 6ND rule: 6 (N D + N_v D_v); attention FLOPs are ignored."""
        counts = self.parameter_counts()
        return 6.0 * (counts.N * n_tokens + counts.N_v * n_image_tokens)

    def init_arguments(self) -> dict[str, Any]:
        """Return the constructor arguments, so the backbone can be rebuilt from a checkpoint."""
        return dict(self._init_arguments)


def layer_context(batch: Batch) -> LayerContext:
    return LayerContext(
        image_mask=batch.image_mask.reshape(-1),
        valid_mask=(~batch.padding_mask).reshape(-1),
    )


def normalize_images(images: Tensor, dtype: torch.dtype) -> Tensor:
    """Map uint8 pixels to [-1, 1] in the given dtype."""
    return images.to(dtype) / 127.5 - 1.0


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images (n, C, H, W) into flattened patches (n, P, C * p * p), row-major over the grid."""
    n, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size {p}")
    patches = images.reshape(n, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (H // p) * (W // p), C * p * p)


def place_image_features(x: Tensor, features: Tensor, batch: Batch) -> Tensor:
    """Write per-patch features (n_images, P, D) into x (B, T, D) at the image positions."""
    mask = batch.image_mask
    if not mask.any():
        return x
    placed = features[batch.image_index[mask], batch.patch_index[mask]].to(x.dtype)
    x = x.clone()
    x[mask] = placed
    return x


AttentionKind = Literal["auto", "sdpa", "flex"]


def touch_unused(x: Tensor, modules: list[nn.Module]) -> Tensor:
    """Add zero times every parameter of `modules` to x, keeping them in the autograd graph.

    NOTE: a batch without images leaves the image stem or encoder out of the graph. Under DDP
    one rank would then skip those gradients while the others reduce them, and training hangs;
    a zero gradient keeps every rank's reduction identical.
    """
    if not torch.is_grad_enabled():
        return x
    zero = sum(p.sum() for module in modules for p in module.parameters() if p.requires_grad)
    return x + 0.0 * zero if isinstance(zero, Tensor) else x


def attention_mask(batch: Batch, kind: AttentionKind = "auto") -> Tensor | BlockMask:
    """Build the packed attention mask for the chosen kernel.

    "sdpa": a dense boolean (B, 1, T, T) mask for scaled_dot_product_attention. "flex": a
    FlexAttention block mask. "auto": flex on CUDA, sdpa elsewhere (eager FlexAttention on CPU
    materialises the score matrix and is slower than SDPA).
    """
    if kind == "flex" or (kind == "auto" and batch.tokens.is_cuda):
        if not batch.tokens.is_cuda and torch.is_grad_enabled():
            raise ValueError(
                "FlexAttention has no backward pass on CPU (torch 2.14): set the backbone's "
                "attention: sdpa (or auto) to train on CPU; flex works on CPU for inference only"
            )
        return packed_block_mask(batch.document, batch.image_index)
    return packed_attention_mask(batch.document, batch.image_index)
