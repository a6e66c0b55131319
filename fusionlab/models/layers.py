"""Decoder building blocks: RMSNorm, rotary embedding, packed-sequence attention, SwiGLU.

Shapes in trailing comments use B (batch rows), T (positions), H (heads), K (head_dim),
D (d_model), F (d_ff).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def ffn_hidden_size(d_model: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden size 8d/3 rounded up to a multiple, as in the OpenLM/DCLM decoders."""
    hidden = math.ceil(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def resolve_head_dim(d_model: int, n_heads: int) -> int:
    """Return d_model / n_heads, or raise asking for an explicit head_dim."""
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}: set head_dim explicitly")
    return d_model // n_heads


class RMSNorm(nn.Module):
    """Gain-only RMS normalisation (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, because bf16 sums of squares lose too much precision. The output
        # keeps the input's dtype: bf16 queries and keys stay bf16 on their way to attention.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight.type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding evaluated at arbitrary position ids.

    Position ids come from the batch because they restart at every packed document.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, K/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :K/2], x[..., K/2:]) of x (B, H, T, K) by the given angles.

    The angles are computed in float32 and the rotation runs in x's dtype, as is usual for bf16
    training: float32 copies of the queries and keys would double the memory traffic here.
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, K/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def packed_attention_mask(document: Tensor, image_index: Tensor) -> Tensor:
    """Boolean mask (B, 1, T, T), true where query i may attend to key j.

    Text is causal, the patches of one image see each other in both directions, and nothing
    crosses a packed document. Padding positions (document -1) attend only to themselves, so
    no softmax row is empty: an all-false row makes scaled_dot_product_attention return NaN.
    """
    T = document.shape[-1]
    idx = torch.arange(T, device=document.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    same_doc = (document[:, :, None] == document[:, None, :]) & (document[:, :, None] >= 0)
    same_image = (image_index[:, :, None] == image_index[:, None, :]) & (image_index[:, :, None] >= 0)
    allowed = same_doc & (causal | same_image)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=document.device)
    return allowed[:, None]


def packed_block_mask(document: Tensor, image_index: Tensor) -> BlockMask:
    """Build the mask of `packed_attention_mask` as a FlexAttention block mask.

    Fully masked blocks are skipped by the kernel and no (T, T) tensor is kept for the backward
    pass, which is what makes long packed contexts affordable on GPUs.
    """

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        same_doc = (document[b, q] == document[b, kv]) & (document[b, q] >= 0)
        same_image = (image_index[b, q] == image_index[b, kv]) & (image_index[b, q] >= 0)
        return (same_doc & ((kv <= q) | same_image)) | (q == kv)

    B, T = document.shape
    return create_block_mask(mask_mod, B, None, T, T, device=document.device)


@functools.cache
def _compiled_flex_attention():
    # Compiled once per process: eager flex_attention materialises the full score matrix.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask) -> Tensor:
    """Attention over (B, H, T, K) tensors with a boolean mask (SDPA) or a block mask (FlexAttention)."""
    if isinstance(mask, BlockMask):
        kernel = _compiled_flex_attention() if q.is_cuda else flex_attention
        return kernel(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class LayerContext:
    """Per-forward information that feed-forward layers may need (MoE routing) and fill in.

    image_mask and valid_mask are flat (B*T,) booleans: image positions, and positions that are
    not padding. Layers store auxiliary losses and routing statistics under a key of their own
    (for example "layer3"): storing, not appending, keeps the values right when activation
    checkpointing runs a layer's forward a second time in the backward pass.
    """

    image_mask: Tensor
    valid_mask: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class LayerKVCache:
    """Preallocated keys and values (B, H, max_length, K) of one attention layer.

    `update` writes the new keys and values after the `length` cached ones and returns every cached
    position so far, so a decoding step attends over the whole prefix.
    """

    def __init__(self, batch_size: int, n_heads: int, head_dim: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch_size, n_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(
                f"KV cache overflow: {end} positions requested but the cache has room for {self.keys.shape[2]}: "
                "build the cache with a larger max_length"
            )
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and rotary positions."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        # QK-norm: normalising queries and keys per head keeps attention logits bounded,
        # which stabilises training at high learning rates.
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | BlockMask,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """Attend over x (B, T, D), or with a cache over the cached prefix and x, storing x's keys.

        With a cache the mask has one key column per cached position plus T.
        """
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, K)
        q = apply_rotary(self.q_norm(q), *rope)
        k = apply_rotary(self.k_norm(k), *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, cached + T, K)
        y = attend(q, k, v, mask)  # (B, H, T, K)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(y)


class SwiGLU(nn.Module):
    """Gated feed-forward layer: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor, context: LayerContext | None = None) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
