"""Pure PyTorch model code: no Lightning, data-loading or logging imports in this package."""

from fusionlab.models.base import Backbone, BackboneOutput, ParameterCounts
from fusionlab.models.early_fusion import EarlyFusion

__all__ = ["Backbone", "BackboneOutput", "EarlyFusion", "ParameterCounts"]
