"""Cross-attention fusion: a decoder that reads a vision encoder's tokens through gated cross-attention.

As in Flamingo (Alayrac et al. 2022, arXiv 2204.14198, section 2.2), a gated cross-attention block
sits before every `cross_every`-th decoder layer (layers 0, k, 2k, ...):

    x = x + tanh(attn_gate) * cross_attention(norm(x), image tokens)
    x = x + tanh(ffn_gate) * ffn(norm(x))

The image tokens are the patch features of a timm vision transformer (fusionlab's late-fusion
encoder), projected to d_model by a linear connector.

Image positions. The packed batch keeps the positions each image occupies, so packing, position ids
and targets are the same as for every other backbone. At those positions the decoder's input is the
embedding of the tokenizer's image placeholder id, one learned vector, and no pixels: pixels reach
the decoder only through cross-attention. No loss is taken at image positions.

Which images a position attends to (`image_scope`). Never an image of another packed document.
"preceding" (the default): the images of its own document that start at or before it. A caption
token thus attends to the image it follows, and the patches of an image attend to that image, as
causal attention allows in early fusion. This keeps losses comparable across architectures. "document":
every image of its own document, including later ones. A position with no such image (text-only
documents, text before a document's first image) gets no cross-attention output.

Shapes in trailing comments: B rows, T positions, n images, P patches per image, M images per row
(the maximum in the batch), S = M * P image tokens per row, H heads, K head_dim, D d_model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

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
)
from fusionlab.models.decoder import Decoder
from fusionlab.models.late_fusion import build_vit, resolve_head_dim
from fusionlab.models.layers import RMSNorm, SwiGLU, ffn_hidden_size


class CrossAttention(nn.Module):
    """Multi-head attention from decoder positions (queries) to image tokens (keys and values).

    No rotary embedding: the image tokens carry the encoder's own position embedding, and a query's
    place in the text is unrelated to where a patch is. QK-norm as in the decoder's self-attention.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_heads * head_dim, bias=False)
        self.proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(self, x: Tensor, image_tokens: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        S = image_tokens.shape[1]
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, K)
        k, v = (
            self.kv(image_tokens).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (B, H, S, K)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask)  # (B, H, T, K)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: gated cross-attention, then a gated feed-forward layer."""

    def __init__(
        self, d_model: int, n_heads: int, head_dim: int, d_ff: int, gate_init: float, norm_eps: float
    ):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = CrossAttention(d_model, n_heads, head_dim, norm_eps)
        self.attn_gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = SwiGLU(d_model, d_ff)
        self.ffn_gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: Tensor, cross: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """Apply the block. `cross` is image_keys' (image_tokens, mask, has_image), or None without images."""
        if cross is not None:
            image_tokens, mask, has_image = cross
            attended = self.attn(self.attn_norm(x), image_tokens, mask) * has_image  # (B, T, D)
            x = x + torch.tanh(self.attn_gate) * attended
        return x + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x))


class CrossAttentionFusion(Backbone):
    """Vision encoder + connector, read by a decoder through gated cross-attention layers.

    Args:
        vocab_size: tokenizer vocabulary (linked from the data section by the CLI).
        image_size: side of the square input images, in pixels.
        patch_size: encoder patch size; an image takes (image_size / patch_size)^2 positions.
        d_model, n_layers, n_heads, head_dim, d_ff, ffn_multiple_of, rope_theta: the decoder, as in
            fusionlab's EarlyFusion and LateFusion.
        cross_every: a gated cross-attention block before every k-th decoder layer (0, k, 2k, ...).
        gate_init: initial value of every tanh gate. Flamingo starts at 0 so that a pretrained,
            frozen language model is unchanged at the start of training. Trained from scratch there
            is nothing to preserve. A gate of exactly 0 leaves the cross-attention and encoder
            weights without gradient until the first update has moved the gates, so the default 0.1
            lets every parameter learn from the first step. Set 0.0 for Flamingo's initialisation.
        image_scope: "preceding" (images of the same document starting at or before the position)
            or "document" (every image of the same document); see the module docstring.
        encoder, encoder_width, encoder_layers, encoder_heads, encoder_mlp_ratio, encoder_weights,
            freeze_encoder, encoder_lr_multiplier: the timm vision encoder, as in LateFusion.
        attention: kernel of the decoder's self-attention, as in EarlyFusion: "flex", "sdpa" or
            "auto" (flex on CUDA, sdpa elsewhere). Cross-attention always uses a dense mask with
            scaled_dot_product_attention.
        activation_checkpointing: recompute each decoder and cross-attention layer in the backward pass.
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
        cross_every: int = 2,
        gate_init: float = 0.1,
        image_scope: Literal["preceding", "document"] = "preceding",
        encoder: str = "vit_base_patch16_224",
        encoder_width: int = 64,
        encoder_layers: int = 2,
        encoder_heads: int = 4,
        encoder_mlp_ratio: float = 4.0,
        encoder_lr_multiplier: float = 0.01,
        freeze_encoder: bool = False,
        encoder_weights: str | None = None,
        attention: AttentionKind = "auto",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        _check_arguments(
            image_size, patch_size, n_layers, cross_every, image_scope, encoder_width, encoder_heads
        )
        head_dim = head_dim or resolve_head_dim(d_model, n_heads)
        d_ff = d_ff or ffn_hidden_size(d_model, ffn_multiple_of)
        self.vocab_size = vocab_size
        self.tokens_per_image = (image_size // patch_size) ** 2
        self.image_scope = image_scope
        self.attention = attention
        self.activation_checkpointing = activation_checkpointing

        self.encoder = build_vit(
            encoder,
            image_size,
            patch_size,
            encoder_width,
            encoder_layers,
            encoder_heads,
            encoder_mlp_ratio,
            encoder_weights,
        )
        self.connector = nn.Linear(encoder_width, d_model)
        self.decoder = Decoder(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            head_dim=head_dim,
            d_ff=d_ff,
            rope_theta=rope_theta,
        )
        self.cross_layers = list(range(0, n_layers, cross_every))
        self.cross_blocks = nn.ModuleList(
            GatedCrossAttentionBlock(d_model, n_heads, head_dim, d_ff, gate_init, norm_eps=1e-5)
            for _ in self.cross_layers
        )
        self._init_cross_blocks(n_layers)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        # Read by fusionlab's optimiser builder: parameter-name prefix -> learning-rate multiplier.
        self.lr_multipliers = {"encoder.": encoder_lr_multiplier}

    def _init_cross_blocks(self, n_layers: int) -> None:
        # The decoder's GPT-2 initialisation, residual-stream outputs scaled by 1/sqrt(2 n_layers).
        for name, p in self.cross_blocks.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith(("attn.proj.weight", "down.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def encode_images(self, images: Tensor) -> Tensor:
        """Map uint8 images (n, 3, H, W) to decoder-width image tokens (n, P, D)."""
        pixels = normalize_images(images, self.encoder.patch_embed.proj.weight.dtype)
        features = self.encoder.forward_features(pixels)  # (n, prefix + P, encoder_width)
        return self.connector(features[:, self.encoder.num_prefix_tokens :])

    def forward(self, batch: Batch) -> BackboneOutput:
        # Image positions hold the placeholder id, so the embedding gives them its learned vector.
        x = self.decoder.embed(batch.tokens)  # (B, T, D)
        cross = None
        if batch.images.numel():
            cross = image_keys(self.encode_images(batch.images), batch, self.image_scope)
        else:
            # NOTE: DistributedDataParallel expects every parameter in the graph of every step, and
            # a rank whose batch is text only would otherwise leave the vision path out of it.
            x = x + self._vision_anchor()

        context = layer_context(batch)
        mask = attention_mask(batch, self.attention)
        rope = self.decoder.rope(batch.positions)
        blocks = dict(zip(self.cross_layers, self.cross_blocks))
        for i, layer in enumerate(self.decoder.layers):
            if i in blocks:
                x = self._call(blocks[i], x, cross)
            x = self._call(layer, x, rope, mask, context)
        hidden = self.decoder.norm(x)
        aux = sum(context.aux_losses.values(), x.new_zeros(()).float())
        return BackboneOutput(self.decoder.head(hidden), aux, context.stats)

    def _call(self, module: nn.Module, *args) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _vision_anchor(self) -> Tensor:
        """Return a zero that depends on every parameter used only when the batch has images."""
        params = [*self.encoder.parameters(), *self.connector.parameters()]
        for block in self.cross_blocks:
            # attn_norm, attn and attn_gate: the cross-attention half of the block
            params += [p for name, p in block.named_parameters() if name.startswith("attn")]
        params = [p for p in params if p.requires_grad]
        return sum((p.sum() for p in params), self.connector.weight.new_zeros(())) * 0.0

    def parameter_counts(self) -> ParameterCounts:
        # The encoder, the connector and the key/value projections run once per image token (D_v);
        # everything else runs at every position, image placeholders included (D).
        N_v = count_parameters(self.encoder) + count_parameters(self.connector)
        N_v += sum(block.attn.kv.weight.numel() for block in self.cross_blocks)
        total = count_parameters(self)
        return ParameterCounts(N=total - N_v, N_v=N_v, active=total, total=total)


def image_keys(features: Tensor, batch: Batch, scope: str) -> tuple[Tensor, Tensor, Tensor]:
    """Arrange image tokens (n, P, D) into per-row key sets and the cross-attention mask.

    Returns image_tokens (B, S, D), mask (B, 1, T, S) true where a position may attend to a token,
    and has_image (B, T, 1), 1.0 where a position may attend to at least one image. Rows of the mask
    with no allowed image are set all true, because an all-false row makes
    scaled_dot_product_attention return NaN; has_image then zeroes their output.
    """
    B, T = batch.tokens.shape
    P = features.shape[1]

    # where each image starts; nonzero() lists them row by row, in sequence order
    rows, starts = ((batch.patch_index == 0) & (batch.image_index >= 0)).nonzero(as_tuple=True)
    images = batch.image_index[rows, starts]
    counts = torch.bincount(rows, minlength=B)
    M = max(int(counts.max()), 1) if rows.numel() else 1
    slots = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]

    # per row: up to M images with their document and first position; -1 marks an empty slot
    key_image = torch.full((B, M), -1, dtype=torch.long, device=rows.device)
    key_start = torch.full((B, M), T, dtype=torch.long, device=rows.device)
    key_image[rows, slots] = images
    key_start[rows, slots] = starts
    key_document = torch.where(key_image >= 0, batch.document.gather(1, key_start.clamp(max=T - 1)), -2)

    document = batch.document[:, :, None]  # (B, T, 1)
    allowed = (key_document[:, None, :] == document) & (document >= 0)  # (B, T, M)
    if scope == "preceding":
        position = torch.arange(T, device=rows.device)[None, :, None]
        allowed &= key_start[:, None, :] <= position
    has_image = allowed.any(dim=-1, keepdim=True)  # (B, T, 1)
    mask = (allowed | ~has_image).repeat_interleave(P, dim=-1)[:, None]  # (B, 1, T, S)

    image_tokens = features[key_image.clamp(min=0)].reshape(B, M * P, -1)  # (B, S, D)
    return image_tokens, mask, has_image.to(features.dtype)


def _check_arguments(
    image_size: int,
    patch_size: int,
    n_layers: int,
    cross_every: int,
    image_scope: str,
    encoder_width: int,
    encoder_heads: int,
) -> None:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if not 1 <= cross_every <= n_layers:
        raise ValueError(f"cross_every {cross_every} must be between 1 and n_layers ({n_layers})")
    if image_scope not in ("preceding", "document"):
        raise ValueError(f"image_scope {image_scope!r} is invalid: use 'preceding' or 'document'")
    if encoder_width % encoder_heads:
        raise ValueError(f"encoder_width {encoder_width} is not divisible by encoder_heads {encoder_heads}")
