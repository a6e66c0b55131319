"""Late fusion: a timm vision transformer, a connector, then the decoder.

The encoder is built from scratch by name (never downloaded) and sized by the recipe. Its patch
features, prefix tokens (class and register tokens) dropped, are projected to the decoder width
and take the image's positions in the packed sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import timm
from torch import Tensor, nn

from fusionlab.batch import Batch
from fusionlab.models.base import (
    AttentionKind,
    Backbone,
    BackboneOutput,
    ParameterCounts,
    attention_mask,
    count_parameters,
    layer_context,
    normalize_images,
    place_image_features,
    touch_unused,
)
from fusionlab.models.decoder import Decoder
from fusionlab.models.layers import ffn_hidden_size, resolve_head_dim


class LateFusion(Backbone):
    """Vision encoder + connector + decoder.

    Args:
        vocab_size: tokenizer vocabulary (linked from the data section by the CLI).
        image_size: side of the square input images, in pixels.
        patch_size: encoder patch size; an image takes (image_size / patch_size)^2 positions.
        d_model, n_layers, n_heads, head_dim, d_ff, ffn_multiple_of, rope_theta: the decoder, as
            in EarlyFusion.
        encoder: timm model name of a vision transformer, built with random weights.
        encoder_width: encoder embedding width (Shukor et al. 2025 use half the decoder width).
        encoder_layers: encoder depth.
        encoder_heads: encoder attention heads (must divide encoder_width).
        encoder_mlp_ratio: encoder MLP hidden size over width.
        connector: "linear" (one projection) or "mlp" (Linear-GELU-Linear).
        encoder_lr_multiplier: the encoder's learning rate is the peak rate times this (0.01 was
            best in Shukor et al. 2025).
        freeze_encoder: keep the encoder's weights fixed.
        encoder_weights: optional path of a local encoder checkpoint to start from.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        attention: attention kernel: "flex" (FlexAttention block mask), "sdpa" (dense boolean mask)
            or "auto" (flex on CUDA, sdpa elsewhere).
    """

    def __init__(
        self,
        vocab_size: int = 264,
        image_size: int = 32,
        patch_size: int = 4,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        head_dim: int | None = None,
        d_ff: int | None = None,
        ffn_multiple_of: int = 256,
        rope_theta: float = 10000.0,
        encoder: str = "vit_base_patch16_224",
        encoder_width: int = 64,
        encoder_layers: int = 4,
        encoder_heads: int = 4,
        encoder_mlp_ratio: float = 4.0,
        connector: Literal["linear", "mlp"] = "linear",
        encoder_lr_multiplier: float = 0.01,
        freeze_encoder: bool = False,
        encoder_weights: str | None = None,
        activation_checkpointing: bool = False,
        attention: AttentionKind = "auto",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if encoder_width % encoder_heads:
            raise ValueError(f"encoder_width {encoder_width} is not divisible by encoder_heads {encoder_heads}")
        self.vocab_size = vocab_size
        self.attention = attention
        self.tokens_per_image = (image_size // patch_size) ** 2
        self.encoder = build_vit(
            encoder, image_size, patch_size, encoder_width, encoder_layers, encoder_heads,
            encoder_mlp_ratio, encoder_weights,
        )
        self.connector = build_connector(connector, encoder_width, d_model)
        self.decoder = Decoder(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            head_dim=head_dim or resolve_head_dim(d_model, n_heads),
            d_ff=d_ff or ffn_hidden_size(d_model, ffn_multiple_of),
            rope_theta=rope_theta,
            activation_checkpointing=activation_checkpointing,
        )
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        # Read by the optimiser builder: parameter-name prefix -> learning-rate multiplier.
        self.lr_multipliers = {"encoder.": encoder_lr_multiplier}

    def encode_images(self, images: Tensor) -> Tensor:
        """Map uint8 images (n, 3, H, W) to decoder-width patch features (n, P, D)."""
        pixels = normalize_images(images, self.encoder.patch_embed.proj.weight.dtype)
        features = self.encoder.forward_features(pixels)  # (n, prefix + P, encoder_width)
        features = features[:, self.encoder.num_prefix_tokens :]
        return self.connector(features)

    def embed(self, batch: Batch) -> Tensor:
        """Build the decoder input (B, T, D): token embeddings with encoded patches at image positions."""
        x = self.decoder.embed(batch.tokens)  # (B, T, D)
        if batch.images.numel():
            x = place_image_features(x, self.encode_images(batch.images), batch)
        else:
            x = touch_unused(x, [self.encoder, self.connector])
        return x

    def forward(self, batch: Batch) -> BackboneOutput:
        x = self.embed(batch)
        context = layer_context(batch)
        hidden = self.decoder(x, batch.positions, attention_mask(batch, self.attention), context)
        aux = sum(context.aux_losses.values(), x.new_zeros(()).float())
        return BackboneOutput(self.decoder.head(hidden), aux, context.stats)

    def parameter_counts(self) -> ParameterCounts:
        N_v = count_parameters(self.encoder)
        N = count_parameters(self.decoder) + count_parameters(self.connector)
        return ParameterCounts(N=N, N_v=N_v, active=N + N_v, total=N + N_v)


def build_vit(
    name: str,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    mlp_ratio: float,
    weights: str | None,
) -> nn.Module:
    """Build a timm vision transformer with random weights, or with weights from a local file."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"encoder_weights {weights!r} is not a file: give a local checkpoint path")
    kwargs = dict(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=layers,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        num_classes=0,
        global_pool="",
    )
    try:
        if weights is None:
            encoder = timm.create_model(name, pretrained=False, **kwargs)
        else:
            # A local file: timm adapts it (position embeddings resampled to image_size) and
            # never goes to the network when `file` is given.
            encoder = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs)
    except RuntimeError as error:
        raise ValueError(
            f"could not build timm encoder {name!r}: {error}. Choose a vision transformer name from "
            "timm.list_models('vit_*')"
        ) from error
    if not hasattr(encoder, "forward_features") or not hasattr(encoder, "num_prefix_tokens"):
        raise ValueError(f"timm model {name!r} is not a vision transformer with patch tokens")
    return encoder


def build_connector(kind: str, encoder_width: int, d_model: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(encoder_width, d_model)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(encoder_width, d_model), nn.GELU(), nn.Linear(d_model, d_model))
    raise ValueError(f"unknown connector {kind!r}: use 'linear' or 'mlp'")
