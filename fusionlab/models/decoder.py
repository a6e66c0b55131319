"""The decoder shared by every architecture: pre-norm blocks, untied embeddings.

Each block is x + attn(norm(x)) then x + ffn(norm(x)). The feed-forward layer of each block is
built by a factory so that a backbone can put a dense SwiGLU or a mixture of experts in any layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fusionlab.models.layers import Attention, LayerContext, LayerKVCache, RMSNorm, RotaryEmbedding, SwiGLU

FFNFactory = Callable[[int], nn.Module]


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, ffn: nn.Module, norm_eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, head_dim, norm_eps)
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        context: LayerContext,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.ffn(self.ffn_norm(x), context)


class KVCache:
    """Keys and values of every decoder layer, for decoding one position at a time.

    The layers advance together: `length` is the number of positions cached so far.
    """

    def __init__(self, layers: list[LayerKVCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_length(self) -> int:
        return self.layers[0].keys.shape[2]


class Decoder(nn.Module):
    """Token embedding, n_layers blocks, final norm and an untied output head."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        ffn_factory: FFNFactory | None = None,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        make_ffn = ffn_factory or (lambda layer: SwiGLU(d_model, d_ff))
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.layers = nn.ModuleList(
            Block(d_model, n_heads, head_dim, make_ffn(i), norm_eps) for i in range(n_layers)
        )
        self.norm = RMSNorm(d_model, norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.activation_checkpointing = activation_checkpointing
        self.reset_parameters(n_layers)

    def reset_parameters(self, n_layers: int) -> None:
        # GPT-2 initialisation: N(0, 0.02), with the projections that write into the residual
        # stream scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02
            if name.endswith(("attn.proj.weight", "down.weight", "w_down")):
                std = 0.02 / (2 * n_layers) ** 0.5
            nn.init.normal_(p, mean=0.0, std=std)

    def new_cache(
        self, batch_size: int, max_length: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> KVCache:
        """Allocate an empty KV cache of `max_length` positions for `batch_size` rows."""
        attn = self.layers[0].attn
        dtype = dtype or self.head.weight.dtype
        device = device or self.head.weight.device
        return KVCache([
            LayerKVCache(batch_size, attn.n_heads, attn.head_dim, max_length, dtype, device) for _ in self.layers
        ])

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        context: LayerContext,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Map input embeddings (B, T, D) to final hidden states (B, T, D).

        With a cache, x holds only the new positions: the mask then has cache.length + T key
        columns, and the new keys and values are appended to the cache.
        """
        rope = self.rope(positions)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                # Recompute the block in backward: only its input is kept for the backward pass.
                x = checkpoint(layer, x, rope, mask, context, use_reentrant=False)
            else:
                x = layer(x, rope, mask, context, layer_cache)
        return self.norm(x)
