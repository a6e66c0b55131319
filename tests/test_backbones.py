"""Every registered architecture passes the shared backbone battery."""

import pytest

from fusionlab.plugins import discover
from fusionlab.testing import check_backbone

ARCHITECTURES = sorted(discover())
# Entry points that name a configuration of a shared class get the arguments that make it one.
ARGUMENTS = {"moe": {"moe": {"n_experts": 4, "top_k": 1}}}


def test_builtins_are_registered():
    assert {"early_fusion", "late_fusion", "moe"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_backbone_battery(name):
    check_backbone(discover()[name].cls, **ARGUMENTS.get(name, {}))
