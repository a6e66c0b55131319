"""Early fusion: image patches linearly projected straight into the decoder.

No vision encoder and no image tokenizer: each flattened patch (3 p^2 values) goes through one
linear layer to d_model and takes its place in the packed sequence. With an `MoEConfig` the
feed-forward layers of the chosen decoder layers are sparse mixtures of experts.
"""

from __future__ import annotations

import dataclasses

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
    patchify,
    place_image_features,
    touch_unused,
)
from fusionlab.models.decoder import Decoder
from fusionlab.models.layers import SwiGLU, ffn_hidden_size, resolve_head_dim
from fusionlab.models.moe import MoE, MoEConfig, inactive_parameters


class EarlyFusion(Backbone):
    """Early-fusion decoder.

    Args:
        vocab_size: tokenizer vocabulary (linked from the data section by the CLI).
        image_size: side of the square input images, in pixels.
        patch_size: side of a square patch; an image takes (image_size / patch_size)^2 positions.
        d_model: decoder width.
        n_layers: decoder depth.
        n_heads: attention heads.
        head_dim: size of one head; d_model / n_heads when omitted.
        d_ff: SwiGLU hidden size; 8 d_model / 3 rounded up to `ffn_multiple_of` when omitted.
        ffn_multiple_of: rounding of the default d_ff.
        rope_theta: rotary embedding base.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        attention: attention kernel: "flex" (FlexAttention block mask), "sdpa" (dense boolean mask)
            or "auto" (flex on CUDA, sdpa elsewhere).
        moe: mixture-of-experts feed-forward layers; dense SwiGLU layers when None. A plain dict
            of MoEConfig fields is accepted too, which is how checkpoints store it.
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
        activation_checkpointing: bool = False,
        attention: AttentionKind = "auto",
        moe: MoEConfig | None = None,
    ):
        super().__init__()
        moe = _as_moe_config(moe)
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        head_dim = head_dim or resolve_head_dim(d_model, n_heads)
        self.vocab_size = vocab_size
        self.attention = attention
        self.patch_size = patch_size
        self.tokens_per_image = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, d_model)
        d_ff = d_ff or ffn_hidden_size(d_model, ffn_multiple_of)
        self.decoder = Decoder(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            head_dim=head_dim,
            d_ff=d_ff,
            rope_theta=rope_theta,
            ffn_factory=_ffn_factory(d_model, d_ff, n_layers, moe),
            activation_checkpointing=activation_checkpointing,
        )

    def embed(self, batch: Batch) -> Tensor:
        """Build the decoder input (B, T, D): token embeddings with projected patches at image positions."""
        x = self.decoder.embed(batch.tokens)  # (B, T, D)
        if batch.images.numel():
            pixels = normalize_images(batch.images, self.patch_embed.weight.dtype)
            features = self.patch_embed(patchify(pixels, self.patch_size))  # (n_images, P, D)
            x = place_image_features(x, features, batch)
        else:
            x = touch_unused(x, [self.patch_embed])
        return x

    def forward(self, batch: Batch) -> BackboneOutput:
        x = self.embed(batch)
        context = layer_context(batch)
        hidden = self.decoder(x, batch.positions, attention_mask(batch, self.attention), context)
        aux = sum(context.aux_losses.values(), x.new_zeros(()).float())
        return BackboneOutput(self.decoder.head(hidden), aux, context.stats)

    def parameter_counts(self) -> ParameterCounts:
        # Every parameter processes every token except the experts a token is not routed to.
        total = count_parameters(self)
        active = total - inactive_parameters(self)
        return ParameterCounts(N=active, N_v=0, active=active, total=total)

def _as_moe_config(moe: MoEConfig | dict | None) -> MoEConfig | None:
    if not isinstance(moe, dict):
        return moe
    unknown = set(moe) - {f.name for f in dataclasses.fields(MoEConfig)}
    if unknown:
        raise ValueError(
            f"moe has unknown fields {sorted(unknown)}: valid fields are "
            f"{[f.name for f in dataclasses.fields(MoEConfig)]}"
        )
    return MoEConfig(**moe)


def _ffn_factory(d_model: int, d_ff: int, n_layers: int, moe: MoEConfig | None):
    if moe is None:
        return None
    moe_layers = set(moe.layer_indices(n_layers))
    expert_d_ff = moe.d_ff or d_ff

    def make_ffn(layer_idx: int) -> nn.Module:
        if layer_idx in moe_layers:
            return MoE(d_model, expert_d_ff, moe, layer_idx)
        return SwiGLU(d_model, d_ff)

    return make_ffn
