"""Every registered architecture passes the shared backbone battery."""

import pytest

from fusionlab.plugins import discover
from fusionlab.testing import check_backbone

ARCHITECTURES = sorted(discover())


def test_builtins_are_registered():
    assert {"early_fusion", "late_fusion"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_backbone_battery(name):
    check_backbone(discover()[name].cls)
