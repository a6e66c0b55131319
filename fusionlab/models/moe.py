"""Sparse mixture-of-experts feed-forward layer: router, dropless dispatch, auxiliary losses.

An `MoE` layer replaces the dense SwiGLU of a decoder block. Each token goes to `top_k` of
`n_experts` SwiGLU experts and the experts' outputs are summed, weighted by the router
probabilities. Dispatch is dropless: there is no capacity factor, so every non-padding token is
processed by exactly `top_k` experts. Padding positions go to no expert and get a zero output.

Shape suffixes: N tokens (B*T flattened), D d_model, F d_ff of one expert, E n_experts,
K top_k, S = N*K routed slots (one per token and chosen expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlab.models.layers import LayerContext

Routing = Literal["learned", "modality"]
ExpertImpl = Literal["grouped_mm", "loop"]

# torch.nn.functional.grouped_mm (torch 2.14) rejects row strides that are not a multiple of
# 16 bytes, in the forward pass and in the backward pass.
GROUPED_MM_ALIGNMENT_BYTES = 16


@dataclass
class MoEConfig:
    """Mixture-of-experts settings of a backbone's feed-forward layers."""

    n_experts: int = 8
    """Experts per MoE layer. With routing "modality" the first half serves image tokens and the
    second half text tokens, so n_experts must be even (2 gives one FFN per modality)."""
    top_k: int = 1
    """Experts each token is sent to (token-choice routing), at most the experts of one group."""
    routing: Routing = "learned"
    """"learned": a float32 linear router over all experts. "modality": image and text tokens go to
    separate expert groups, and a learned router chooses inside a group when it has several experts."""
    layers: list[int] | None = None
    """Decoder layers (0-based) whose feed-forward is an MoE, or every layer when None."""
    d_ff: int | None = None
    """SwiGLU hidden size of one expert, or the dense model's d_ff when None (full-size experts)."""
    balance_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss, added once per MoE layer (0 disables it)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss, mean over tokens of logsumexp(logits)^2 (0 disables it)."""
    expert_impl: ExpertImpl = "grouped_mm"
    """"grouped_mm": tokens sorted by expert and computed by torch grouped_mm, which needs
    d_model and d_ff rows of a multiple of 16 bytes. "loop": one matmul per expert (reference)."""

    def __post_init__(self) -> None:
        if self.routing not in ("learned", "modality"):
            raise ValueError(f"moe.routing {self.routing!r} is invalid: use 'learned' or 'modality'")
        if self.expert_impl not in ("grouped_mm", "loop"):
            raise ValueError(f"moe.expert_impl {self.expert_impl!r} is invalid: use 'grouped_mm' or 'loop'")
        if self.n_experts < 1:
            raise ValueError(f"moe.n_experts must be at least 1, got {self.n_experts}")
        if self.routing == "modality" and self.n_experts % 2:
            raise ValueError(
                f"moe.routing 'modality' splits the experts into an image half and a text half, so "
                f"moe.n_experts must be even, got {self.n_experts}"
            )
        if not 1 <= self.top_k <= self.experts_per_group:
            raise ValueError(
                f"moe.top_k {self.top_k} is invalid: it must be between 1 and the {self.experts_per_group} "
                f"experts a token can choose from (routing {self.routing!r}, n_experts {self.n_experts})"
            )
        if self.balance_loss_weight < 0 or self.z_loss_weight < 0:
            raise ValueError(
                f"moe loss weights must be non-negative, got balance_loss_weight {self.balance_loss_weight} "
                f"and z_loss_weight {self.z_loss_weight}"
            )
        layers = self.layers or []
        if len(set(layers)) != len(layers) or min(layers, default=0) < 0:
            raise ValueError(f"moe.layers {self.layers} must be distinct 0-based layer indices")

    @property
    def n_groups(self) -> int:
        """Expert groups: 2 (image, text) for modality routing, else 1."""
        return 2 if self.routing == "modality" else 1

    @property
    def experts_per_group(self) -> int:
        return self.n_experts // self.n_groups

    def layer_indices(self, n_layers: int) -> list[int]:
        """Return the decoder layers that get an MoE, checked against the decoder depth."""
        if self.layers is None:
            return list(range(n_layers))
        out_of_range = [i for i in self.layers if i >= n_layers]
        if out_of_range:
            raise ValueError(
                f"moe.layers {out_of_range} are out of range for a decoder of n_layers {n_layers}: "
                "use indices from 0 to n_layers - 1"
            )
        return sorted(self.layers)


class RouterOutput(NamedTuple):
    experts_NK: Tensor  # chosen expert ids, long
    gates_NK: Tensor  # weights of the chosen experts' outputs, float32
    probs_NE: Tensor | None  # router probabilities in float32, None without a learned router
    logits_NE: Tensor | None  # router logits (-inf outside a token's group), float32
    token_group_N: Tensor | None  # 0 image, 1 text, or None for learned routing


def load_balance_loss(
    probs_NE: Tensor,
    experts_NK: Tensor,
    valid_N: Tensor,
    token_group_N: Tensor | None = None,
    n_groups: int = 1,
) -> Tensor:
    """Compute the Switch Transformer load-balancing loss E * sum_e f_e P_e over non-padding tokens.

    f_e is the fraction of routed slots that go to expert e (slots = tokens * top_k, so the f_e
    sum to 1) and P_e the mean router probability of e. The loss is 1.0 when routing is uniform.
    Padding positions (valid_N false) count in neither, while image positions count like text.
    With n_groups > 1 the experts form n_groups contiguous blocks of equal size, each serving the
    tokens of one group (token_group_N). The loss is then the token-weighted mean of each group's
    loss with E replaced by the group size.
    """
    E = probs_NE.shape[1]
    K = experts_NK.shape[1]
    group_size = E // n_groups
    valid = valid_N.float()

    # slots of padding tokens land in the extra bin E, which is dropped
    routed = torch.where(valid_N[:, None], experts_NK, E).flatten()
    counts_E = bin_counts(routed, E + 1)[:E].float()
    prob_sums_E = (probs_NE.float() * valid[:, None]).sum(0)

    if token_group_N is None:
        group_tokens_E = valid.sum().expand(E)
    else:
        group_of_expert_E = torch.arange(E, device=probs_NE.device) // group_size
        group_tokens = torch.zeros(n_groups, device=probs_NE.device).index_add_(0, token_group_N, valid)
        group_tokens_E = group_tokens[group_of_expert_E]

    # sum_g (n_g / n) * G * sum_{e in g} (c_e / (K n_g)) * (S_e / n_g), written per expert
    n_valid = valid.sum().clamp(min=1)
    per_expert = counts_E * prob_sums_E / group_tokens_E.clamp(min=1)
    return group_size / (K * n_valid) * per_expert.sum()


def bin_counts(index: Tensor, n_bins: int) -> Tensor:
    """Count each value 0 .. n_bins - 1 in a 1-D long tensor.

    torch.bincount on CUDA copies values of its input to the host to check them and size its
    output, which stalls the GPU. This scatter_add_ never reads values back.
    """
    counts = torch.zeros(n_bins, dtype=torch.long, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


def router_z_loss(logits_NE: Tensor, valid_N: Tensor) -> Tensor:
    """Compute the ST-MoE router z-loss: mean over non-padding tokens of logsumexp(logits)^2."""
    z_N = torch.logsumexp(logits_NE.float(), dim=-1)
    valid = valid_N.float()
    return (z_N.square() * valid).sum() / valid.sum().clamp(min=1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # grouped_mm has no autocast rule (torch 2.14) and needs both operands in one dtype, so the
    # autocast dtype is applied by hand, as autocast does for nn.Linear.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights in nn.Linear layout (out_features, in_features)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # (E, F, D)
        self.w_up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # (E, F, D)
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # (E, D, F)
        # Decoder.reset_parameters initialises these again. This init keeps a standalone layer usable.
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)

    def parameters_per_expert(self) -> int:
        return sum(w[0].numel() for w in (self.w_gate, self.w_up, self.w_down))

    def forward_one(self, expert: int, x_ND: Tensor) -> Tensor:
        """Run one expert on its tokens (the per-expert reference path)."""
        hidden = F.silu(F.linear(x_ND, self.w_gate[expert])) * F.linear(x_ND, self.w_up[expert])
        return F.linear(hidden, self.w_down[expert])

    def forward_grouped(self, x_SD: Tensor, offsets_E: Tensor) -> Tensor:
        """Run every expert on its contiguous block of x_SD, block e ending at row offsets_E[e].

        Rows past offsets_E[-1] are left uninitialised by grouped_mm, in the output and in the
        input's gradient: the caller must mask them.
        """
        # NOTE: checked on CPU only (torch 2.14.1, float32 and bfloat16). torch documents the CUDA
        # kernel for bfloat16 on compute capability 8.0 or newer, so float32 on a GPU may need
        # expert_impl "loop".
        dtype = _compute_dtype(x_SD)
        x_SD = x_SD.to(dtype)
        gate_SF = F.grouped_mm(x_SD, self.w_gate.to(dtype).transpose(-2, -1), offs=offsets_E)
        up_SF = F.grouped_mm(x_SD, self.w_up.to(dtype).transpose(-2, -1), offs=offsets_E)
        hidden_SF = F.silu(gate_SF) * up_SF
        return F.grouped_mm(hidden_SF, self.w_down.to(dtype).transpose(-2, -1), offs=offsets_E)


class MoE(nn.Module):
    """Mixture-of-experts feed-forward layer, a drop-in for SwiGLU in a decoder block.

    Forward steps:
    1. route: float32 router logits, softmax, top-k experts per token (modality routing masks
       the logits to the token's group, or assigns the group's only expert directly);
    2. store the weighted auxiliary losses and the per-expert image/text token counts in the
       LayerContext, under keys of this layer;
    3. dispatch: sort the routed slots by expert, run the experts with grouped_mm (or a
       per-expert loop), scatter the outputs back and sum them weighted by the gates.

    The gates are the router probabilities of the chosen experts, not renormalised over the top_k,
    so with top-1 the router also learns through the output (as in the Switch Transformer).

    Keys stored in the context (i = layer_idx):
    - aux_losses["moe/layer{i}/load_balance"], aux_losses["moe/layer{i}/router_z"]: weighted
      scalars, present when the weight is positive and a learned router exists;
    - stats["routing/layer{i}/image_tokens"], stats["routing/layer{i}/text_tokens"]: int64 (E,)
      routed slot counts per expert, padding excluded (they sum to top_k * tokens).
    """

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.experts = Experts(config.n_experts, d_model, d_ff)
        # Modality routing with one expert per modality has nothing to learn: no router.
        has_router = config.experts_per_group > 1 or config.routing == "learned"
        self.router = nn.Linear(d_model, config.n_experts, bias=False) if has_router else None
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=0.02)
        if config.expert_impl == "grouped_mm":
            _check_grouped_mm(d_model, d_ff)

    def forward(self, x: Tensor, context: LayerContext) -> Tensor:
        if context is None:
            raise ValueError(
                "MoE needs the LayerContext of the batch (padding and image masks) to route tokens: "
                "pass the context that the decoder builds"
            )
        B, T, D = x.shape
        x_ND = x.reshape(B * T, D)
        routing = self.route(x_ND, context)
        self._store_losses(routing, context)
        self._store_stats(routing, context)
        if self.config.expert_impl == "grouped_mm":
            y_ND = self._dispatch_grouped(x_ND, routing, context.valid_mask)
        else:
            y_ND = self._dispatch_loop(x_ND, routing, context.valid_mask)
        return y_ND.view(B, T, D)

    def route(self, x_ND: Tensor, context: LayerContext) -> RouterOutput:
        """Choose top_k experts and their gates for every token (padding included, masked later)."""
        N = x_ND.shape[0]
        token_group_N = None
        if self.config.routing == "modality":
            token_group_N = (~context.image_mask).long()
        if self.router is None:
            ones = torch.ones(N, 1, device=x_ND.device)
            return RouterOutput(token_group_N[:, None], ones, None, None, token_group_N)

        # Routing in float32, even under autocast: bf16 logits flip the choice of near-tied
        # experts and make the softmax and the auxiliary losses noisy.
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
        if token_group_N is not None:
            expert_ids = torch.arange(self.n_experts, device=x_ND.device)
            group_of_expert_E = expert_ids // self.config.experts_per_group
            outside_group_NE = group_of_expert_E[None, :] != token_group_N[:, None]
            logits_NE = logits_NE.masked_fill(outside_group_NE, float("-inf"))
        probs_NE = logits_NE.softmax(dim=-1)
        gates_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        return RouterOutput(experts_NK, gates_NK, probs_NE, logits_NE, token_group_N)

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not use: n_experts - top_k experts."""
        return (self.n_experts - self.top_k) * self.experts.parameters_per_expert()

    # ----------------------------------------------------------------------------------------
    # auxiliary losses and statistics

    def _store_losses(self, routing: RouterOutput, context: LayerContext) -> None:
        if routing.probs_NE is None:
            return
        prefix = f"moe/layer{self.layer_idx}"
        if self.config.balance_loss_weight > 0:
            loss = load_balance_loss(
                routing.probs_NE,
                routing.experts_NK,
                context.valid_mask,
                routing.token_group_N,
                self.config.n_groups,
            )
            context.aux_losses[f"{prefix}/load_balance"] = self.config.balance_loss_weight * loss
        if self.config.z_loss_weight > 0:
            loss = router_z_loss(routing.logits_NE, context.valid_mask)
            context.aux_losses[f"{prefix}/router_z"] = self.config.z_loss_weight * loss

    @torch.no_grad()
    def _store_stats(self, routing: RouterOutput, context: LayerContext) -> None:
        E = self.n_experts
        valid_N, image_N = context.valid_mask, context.image_mask
        image_slots = torch.where((valid_N & image_N)[:, None], routing.experts_NK, E).flatten()
        text_slots = torch.where((valid_N & ~image_N)[:, None], routing.experts_NK, E).flatten()
        prefix = f"routing/layer{self.layer_idx}"
        context.stats[f"{prefix}/image_tokens"] = bin_counts(image_slots, E + 1)[:E]
        context.stats[f"{prefix}/text_tokens"] = bin_counts(text_slots, E + 1)[:E]

    # ----------------------------------------------------------------------------------------
    # dispatch

    def _dispatch_grouped(self, x_ND: Tensor, routing: RouterOutput, valid_N: Tensor) -> Tensor:
        N, D = x_ND.shape
        K, E = self.top_k, self.n_experts

        # sort slots by expert, giving padding slots the key E so that they sort last, past every group
        expert_S = torch.where(valid_N[:, None], routing.experts_NK, E).flatten()
        order_S = torch.argsort(expert_S, stable=True)
        offsets_E = bin_counts(expert_S, E + 1)[:E].cumsum(0).to(torch.int32)
        token_S = order_S // K
        routed_S = (expert_S[order_S] < E)[:, None]

        # NOTE: grouped_mm leaves the padding rows (past offsets_E[-1]) uninitialised, in its
        # output and in its input's gradient. Both `where`s keep those values out of the result
        # and out of the gradients: a multiplication by zero would turn NaN garbage into NaN.
        x_SD = torch.where(routed_S, x_ND[token_S], 0.0)
        y_SD = torch.where(routed_S, self.experts.forward_grouped(x_SD, offsets_E), 0.0)

        # undo the sort, then sum each token's K expert outputs weighted by the gates
        inverse_S = torch.argsort(order_S)
        y_NKD = y_SD[inverse_S].view(N, K, D)
        return (y_NKD * routing.gates_NK[..., None].to(y_NKD.dtype)).sum(dim=1)

    def _dispatch_loop(self, x_ND: Tensor, routing: RouterOutput, valid_N: Tensor) -> Tensor:
        y_ND = x_ND.new_zeros(x_ND.shape, dtype=_compute_dtype(x_ND))
        for expert in range(self.n_experts):
            token, slot = torch.nonzero(valid_N[:, None] & (routing.experts_NK == expert), as_tuple=True)
            if token.numel() == 0:
                continue
            y = self.experts.forward_one(expert, x_ND[token])
            y = y * routing.gates_NK[token, slot, None].to(y.dtype)
            y_ND = y_ND.index_add(0, token, y.to(y_ND.dtype))
        return y_ND


def _check_grouped_mm(d_model: int, d_ff: int) -> None:
    if not hasattr(F, "grouped_mm"):
        raise RuntimeError(
            f"moe.expert_impl 'grouped_mm' needs torch.nn.functional.grouped_mm, missing in torch "
            f"{torch.__version__}: upgrade torch or set moe.expert_impl to 'loop'"
        )
    # a multiple of 8 elements gives 16-byte rows for bf16 and fp16 (and for fp32, which needs 4)
    multiple = GROUPED_MM_ALIGNMENT_BYTES // 2
    if d_model % multiple or d_ff % multiple:
        raise ValueError(
            f"moe.expert_impl 'grouped_mm' needs d_model and the expert d_ff to be multiples of {multiple} "
            f"(rows of a multiple of {GROUPED_MM_ALIGNMENT_BYTES} bytes in bf16), got d_model {d_model} and "
            f"d_ff {d_ff}: change the sizes or set moe.expert_impl to 'loop'"
        )


def moe_layers(module: nn.Module) -> dict[int, int]:
    """Return {layer_idx: n_experts} for every MoE layer inside a module."""
    return {m.layer_idx: m.n_experts for m in module.modules() if isinstance(m, MoE)}


def inactive_parameters(module: nn.Module) -> int:
    """Count the expert parameters of a module that a token does not use, summed over MoE layers."""
    return sum(m.inactive_parameters() for m in module.modules() if isinstance(m, MoE))
