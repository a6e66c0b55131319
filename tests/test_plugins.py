"""Architecture plugins: discovery, `fusionlab plugins`, and one broken plugin among good ones.

Plugins here are real distributions: a hand-written dist-info (METADATA and entry_points.txt) and a
module in a folder put on sys.path, which importlib.metadata finds like any installed package.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe, write_recipe
from fusionlab import plugins
from fusionlab.cli import main
from fusionlab.models import EarlyFusion
from fusionlab.training.cli import run_lightning_cli

GOOD_MODULE = '''
from fusionlab.models import EarlyFusion


class {name}(EarlyFusion):
    """Early fusion under another name, standing in for a third-party architecture."""


def not_a_backbone():
    return None
'''


def write_distribution(
    root: Path,
    name: str,
    entry_points: dict[str, str],
    modules: dict[str, str] | None = None,
    version: str = "1.0",
) -> Path:
    """Write an installed-distribution layout under `root`: NAME-VERSION.dist-info plus module files."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"{key} = {value}" for key, value in entry_points.items()]
    (info / "entry_points.txt").write_text(f"[{plugins.GROUP}]\n" + "\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source)
    return root


@pytest.fixture
def fresh_scan(monkeypatch):
    """Forget cached scans before and after the test, and start with plugin errors reported as warnings."""
    monkeypatch.delenv(plugins.DEBUG_ENV, raising=False)
    plugins.refresh()
    yield
    plugins.refresh()


@pytest.fixture
def broken_dist(tmp_path, monkeypatch, fresh_scan) -> Path:
    """One distribution registering an importable architecture and one whose module is missing."""
    root = write_distribution(
        tmp_path / "site",
        "fakeplug",
        {"good": "fakeplug_good:GoodFusion", "broken": "fakeplug_missing:Broken"},
        {"fakeplug_good": GOOD_MODULE.format(name="GoodFusion")},
    )
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("fakeplug_good", None)


def plugin_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == plugins.__name__ and r.levelno == logging.WARNING
    ]


def test_builtins_and_example_plugin_listed(fresh_scan, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    for name in ("early_fusion", "late_fusion", "moe"):
        assert rows[name]["distribution"] == "fusionlab", name
        assert rows[name]["status"] == "ok", rows[name]
    assert "cross_attention" in rows, (
        "the example plugin is not installed: pip install -e plugins/fusionlab-xattn"
    )
    assert rows["cross_attention"]["distribution"] == "fusionlab-xattn"
    assert rows["cross_attention"]["class_path"] == "fusionlab_xattn.model.CrossAttentionFusion"
    assert rows["moe"]["class_path"] == "fusionlab.models.early_fusion.EarlyFusion"


def test_broken_plugin_reported_once_and_skipped(broken_dist, caplog):
    caplog.set_level(logging.INFO, logger=plugins.__name__)
    first = plugins.discover()
    second = plugins.discover()
    assert first is second
    assert first["good"].status == "ok"
    assert first["good"].cls.__name__ == "GoodFusion"
    assert first["broken"].cls is None
    assert first["broken"].error == "ModuleNotFoundError: No module named 'fakeplug_missing'"
    assert first["early_fusion"].cls is EarlyFusion

    warnings = plugin_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "'broken'" in warnings[0]
    assert "fakeplug 1.0" in warnings[0]
    assert "No module named 'fakeplug_missing'" in warnings[0]
    assert plugins.DEBUG_ENV in warnings[0], "the warning does not name the debug switch"
    added = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("added architecture 'good' from fakeplug 1.0" in message for message in added)


def test_command_line_survives_broken_plugin(broken_dist, capsys):
    assert main(["--help"]) == 0
    assert "plugins" in capsys.readouterr().out
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "CLASS_PATH", "DISTRIBUTION", "VERSION", "STATUS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["good"].split()[1:5] == ["fakeplug_good.GoodFusion", "fakeplug", "1.0", "ok"]
    assert "failed: ModuleNotFoundError: No module named 'fakeplug_missing'" in rows["broken"]
    assert rows["early_fusion"].endswith("ok")


def test_selecting_broken_plugin_raises_its_error(broken_dist):
    with pytest.raises(plugins.PluginError, match="No module named 'fakeplug_missing'"):
        plugins.get_architecture("broken")
    with pytest.raises(KeyError, match="unknown architecture 'nope'.*early_fusion"):
        plugins.get_architecture("nope")
    assert plugins.get_architecture("good").__name__ == "GoodFusion"


def test_recipe_selecting_broken_plugin_fails(broken_dist, sample_dir, tmp_path, capsys):
    recipe = tiny_recipe(sample_dir, tmp_path)
    recipe["model"]["backbone"]["class_path"] = "fakeplug_missing.Broken"
    config = write_recipe(tmp_path / "broken.yaml", recipe)
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code != 0
    assert "fakeplug_missing" in capsys.readouterr().err


def test_debug_switch_raises(broken_dist, monkeypatch):
    monkeypatch.setenv(plugins.DEBUG_ENV, "1")
    with pytest.raises(plugins.PluginError, match="'broken'.*No module named 'fakeplug_missing'") as error:
        plugins.discover()
    assert isinstance(error.value.__cause__, ModuleNotFoundError)


def test_debug_flag_of_plugins_command_raises(broken_dist, monkeypatch):
    # The flag sets the switch for the rest of the process; setenv lets monkeypatch undo that.
    monkeypatch.setenv(plugins.DEBUG_ENV, "0")
    plugins.discover()  # without the switch: a warning, no error
    with pytest.raises(plugins.PluginError, match="fakeplug_missing"):
        main(["plugins", "--debug"])


@pytest.mark.parametrize(
    "class_path", ["fusionlab.models.EarlyFusion", "ShortNameFusion", "shortname_plugin.ShortNameFusion"]
)
def test_training_works_beside_broken_plugin(broken_dist, sample_dir, tmp_path, class_path):
    """A built-in, and a plugin by class name and by import path, train with a broken plugin installed."""
    write_distribution(
        broken_dist,
        "shortname",
        {"short": "shortname_plugin:ShortNameFusion"},
        {"shortname_plugin": GOOD_MODULE.format(name="ShortNameFusion")},
    )
    # Nothing has imported the plugin module: only the discovery before parsing can make the name known.
    assert "shortname_plugin" not in sys.modules
    recipe = tiny_recipe(
        sample_dir,
        tmp_path,
        trainer={"max_steps": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0},
    )
    recipe["model"]["backbone"]["class_path"] = class_path
    config = write_recipe(tmp_path / "plugin.yaml", recipe)
    try:
        cli = run_lightning_cli(["fit", "--config", str(config)])
    finally:
        sys.modules.pop("shortname_plugin", None)
    assert type(cli.model.backbone).__name__ == class_path.rsplit(".", 1)[-1]
    assert cli.trainer.global_step == 1


def test_duplicate_dist_info_yields_plugin_once(tmp_path, monkeypatch, fresh_scan, caplog):
    modules = {"fakeplug_good": GOOD_MODULE.format(name="GoodFusion")}
    for copy in ("a", "b"):
        root = write_distribution(tmp_path / copy, "fakeplug", {"good": "fakeplug_good:GoodFusion"}, modules)
        monkeypatch.syspath_prepend(str(root))
    try:
        registry = plugins.scan()
    finally:
        sys.modules.pop("fakeplug_good", None)
    assert registry.architectures["good"].status == "ok"
    assert [arch.name for arch in registry.architectures.values()].count("good") == 1
    assert registry.conflicts == []
    assert plugin_warnings(caplog) == []


def test_different_target_under_same_name_is_conflict(tmp_path, monkeypatch, fresh_scan, caplog, capsys):
    modules = {"fakeplug_good": GOOD_MODULE.format(name="GoodFusion")}
    write_distribution(tmp_path / "first", "fakeplug", {"good": "fakeplug_good:GoodFusion"}, modules)
    write_distribution(
        tmp_path / "second",
        "otherplug",
        {"good": "fakeplug_good:not_a_backbone", "early_fusion": "fakeplug_good:GoodFusion"},
    )
    # sys.path order decides which of two plugins is seen first: "first", then "second"
    monkeypatch.syspath_prepend(str(tmp_path / "second"))
    monkeypatch.syspath_prepend(str(tmp_path / "first"))
    try:
        registry = plugins.scan()
        assert main(["plugins"]) == 0
    finally:
        sys.modules.pop("fakeplug_good", None)

    assert registry.architectures["early_fusion"].cls is EarlyFusion, "a plugin took over a built-in name"
    assert registry.architectures["good"].distribution == "fakeplug"
    assert {arch.distribution for arch in registry.conflicts} == {"otherplug"}
    assert sorted(arch.name for arch in registry.conflicts) == ["early_fusion", "good"]
    warnings = plugin_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert any("'good' is registered twice" in w and "fakeplug_good:not_a_backbone" in w for w in warnings)
    listing = capsys.readouterr().out
    assert "conflict: ignored, the name belongs to fusionlab" in listing


def test_entry_point_to_non_backbone_fails(tmp_path, monkeypatch, fresh_scan, caplog):
    write_distribution(
        tmp_path / "site",
        "oddplug",
        {"odd": "odd_module:not_a_backbone"},
        {"odd_module": GOOD_MODULE.format(name="OddFusion")},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        arch = plugins.discover()["odd"]
    finally:
        sys.modules.pop("odd_module", None)
    assert arch.cls is None
    assert "not a subclass of fusionlab.models.Backbone" in arch.error
    assert len(plugin_warnings(caplog)) == 1


def test_empty_group(monkeypatch, fresh_scan, capsys):
    monkeypatch.setattr(plugins, "_entry_points", lambda: [])
    assert plugins.discover() == {}
    assert main(["plugins"]) == 0
    assert "no architecture is installed" in capsys.readouterr().out
    with pytest.raises(KeyError, match="installed: none"):
        plugins.get_architecture("early_fusion")
