"""The documented profiling command writes a TensorBoard trace."""

from conftest import tiny_recipe, write_recipe
from fusionlab.training.cli import run_lightning_cli


def test_profiler_writes_trace(sample_dir, tmp_path):
    config = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(sample_dir, tmp_path, trainer={"max_steps": 6, "val_check_interval": 6}))
    out = tmp_path / "profile"
    run_lightning_cli([
        "fit", "--config", str(config),
        "--trainer.profiler", "fusionlab.training.profiling.TensorBoardProfiler",
        "--trainer.profiler.dirpath", str(out),
        "--trainer.profiler.wait", "1", "--trainer.profiler.active", "2",
    ])
    traces = list(out.rglob("*.pt.trace.json"))
    assert traces, f"no trace under {out}: {list(out.rglob('*'))}"
    assert traces[0].stat().st_size > 1000
