"""Pure PyTorch model code: no Lightning, data-loading or logging imports in this package."""

from fusionlab.models.base import Backbone, BackboneOutput, ParameterCounts
from fusionlab.models.early_fusion import EarlyFusion
from fusionlab.models.late_fusion import LateFusion

__all__ = ["Backbone", "BackboneOutput", "EarlyFusion", "LateFusion", "ParameterCounts"]
