"""Token-level loss accumulation per data type."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX


class TokenLossByType(Metric):
    """Sum of token losses and token counts per data type, reduced by summation across ranks.

    The loss of a type is sum / count over the whole evaluation set, never a mean of batch means,
    so it does not depend on how the set is batched or split across ranks.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        n = len(DATA_TYPES)
        self.add_state("loss_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_loss: Tensor, targets: Tensor, source: Tensor) -> None:
        loss_sum, count = loss_sums_by_type(token_loss, targets, source)
        self.loss_sum += loss_sum
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        """Return {type: mean loss} for types that had targets, plus "mean" over those types."""
        losses = {
            name: (self.loss_sum[i] / self.count[i]).float()
            for i, name in enumerate(DATA_TYPES)
            if self.count[i] > 0
        }
        if losses:
            losses["mean"] = torch.stack(list(losses.values())).mean()
        return losses


def loss_sums_by_type(token_loss: Tensor, targets: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
    """Sum per-position losses (B, T) and target counts by data type, in float64."""
    has_target = targets != IGNORE_INDEX
    type_ids = torch.where(has_target, source, len(DATA_TYPES)).reshape(-1).clamp(min=0)
    n = len(DATA_TYPES) + 1
    loss_sum = torch.zeros(n, dtype=torch.float64, device=token_loss.device)
    count = torch.zeros(n, dtype=torch.float64, device=token_loss.device)
    loss_sum.index_add_(0, type_ids, (token_loss * has_target).reshape(-1).double())
    count.index_add_(0, type_ids, has_target.reshape(-1).double())
    return loss_sum[:-1], count[:-1]
