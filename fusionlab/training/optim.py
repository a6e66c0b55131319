"""AdamW with parameter groups: no weight decay on gains and biases, per-module learning rates."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool = False,
) -> torch.optim.AdamW:
    """Build AdamW with fully decoupled weight decay.

    torch's AdamW multiplies the decay by the current learning rate. Dividing the coefficient by
    the group's peak rate makes each step shrink weights by weight_decay * schedule(t), independent
    of the peak rate. A model may set `lr_multipliers` ({parameter-name prefix: multiplier}), for
    example a smaller rate for a vision encoder; frozen parameters are left out.
    """
    multipliers: dict[str, float] = dict(getattr(model, "lr_multipliers", {}) or {})
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        multiplier = next((m for prefix, m in multipliers.items() if name.startswith(prefix)), 1.0)
        decay = param.dim() >= 2
        groups.setdefault((multiplier, decay), []).append(param)

    param_groups = []
    for (multiplier, decay), params in groups.items():
        group_lr = lr * multiplier
        param_groups.append({
            "params": params,
            "lr": group_lr,
            "weight_decay": weight_decay / group_lr if decay and group_lr > 0 else 0.0,
            "lr_multiplier": multiplier,
        })
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused or None)
