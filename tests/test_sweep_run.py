"""Local sweeps end to end: trunk and branches, an interrupted run resumed, a failing run, the fit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import yaml

from conftest import tiny_recipe, write_recipe
from fusionlab.cli import main as fusionlab_main
from fusionlab.scaling import launch, sweep

TESTS = Path(__file__).parent


class KillOnFirstAttempt(L.Callback):
    """SIGKILL the training process at `step` of an attempt that started from step 0.

    Stands for a crash that leaves no marker (out of memory, a lost node); a resumed attempt starts
    past step 0 and is spared.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.start_step == 0 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _sweep_spec(tmp_path: Path, sample_dir: Path, **changes) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(sample_dir, tmp_path / "unused", trainer={"limit_val_batches": 2, "num_sanity_val_steps": 0},
                         model={"shuffled_image_eval": False})
    del recipe["trainer"]["logger"]
    write_recipe(tmp_path / "base.yaml", recipe)
    spec = {
        "study": "local",
        "architectures": {"early": {"recipe": "base.yaml", "widths": {16: {"lr": 3e-3}, 32: {"lr": 3e-3}}}},
        "budgets": {"steps": [5, 8, 12]},
        "schedule": {"warmup": [{"warmup_steps": 2}], "branch_cooldowns": True},
        "checkpoint_every_steps": 1,
        "heartbeat_every_s": 1,
    }
    spec.update(changes)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "spec.yaml"


def _markers(sweep_dir: Path, run_id: str) -> Path:
    run = sweep.iter_runs(sweep.load_manifest(sweep_dir), [run_id])[0]
    return sweep_dir / run["log_dir"] / "markers"


def test_local_sweep_resumes_skips_and_fits(tmp_path, sample_dir, monkeypatch, capsys):
    # the child processes import KillOnFirstAttempt from this file
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    kill = {"class_path": "test_sweep_run.KillOnFirstAttempt", "init_args": {"step": 3}}
    spec = _sweep_spec(tmp_path, sample_dir, architectures={"early": {
        "recipe": "base.yaml",
        "widths": {16: {"lr": 3e-3, "set": {"trainer.callbacks": [kill]}}, 32: {"lr": 3e-3}},
    }})
    sweep_dir = tmp_path / "sweep"
    assert fusionlab_main(["sweep", "plan", str(spec), "--out", str(sweep_dir), "--workdir", str(tmp_path)]) == 0

    # first launch: the width-16 trunk dies at step 3, so its branches cannot start
    assert fusionlab_main(["sweep", "run", str(sweep_dir)]) == 1
    printed = capsys.readouterr().out
    assert "early_w16_trunk: interrupted" in printed
    assert "early_w16_s5: blocked" in printed
    states = {s.id: s.state for s in launch.run_states(sweep_dir)}
    assert states["early_w16_trunk"] == "interrupted"
    assert states["early_w32_trunk"] == "finished"
    assert states["early_w32_s12"] == "finished"

    # second launch: the trunk resumes from its last checkpoint, then its branches run
    assert fusionlab_main(["sweep", "run", str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    assert "early_w16_trunk: resuming" in printed
    assert "skipping 4 runs" in printed
    started = launch.read_marker(_markers(sweep_dir, "early_w16_trunk"), "started")
    assert started["attempt"] == 2
    assert started["command"].endswith("--ckpt_path last")
    heartbeat = launch.read_marker(_markers(sweep_dir, "early_w16_trunk"), "heartbeat")
    assert 0 < heartbeat["attempt_start_step"] <= 3  # resumed, not started over
    assert heartbeat["step"] == 10  # stopped at the last branch point, ceil(0.8 * 12)

    states = launch.run_states(sweep_dir)
    assert {s.state for s in states} == {"finished"}
    for state in states:
        if state.kind == "branch":
            summary = json.loads((sweep_dir / "runs" / "early" / state.id / "summary.json").read_text())
            assert summary["steps"] == state.steps
            assert summary["val_loss"]["mean"] == state.val_loss
    branch = launch.read_marker(_markers(sweep_dir, "early_w16_s12"), "started")
    assert branch["command"].endswith("early_w16_trunk/checkpoints/branch-step=10.ckpt")

    # third launch: everything is finished, nothing runs again
    assert fusionlab_main(["sweep", "run", str(sweep_dir)]) == 0
    assert "0 finished, 0 failed, 0 blocked, 8 skipped" in capsys.readouterr().out
    assert launch.read_marker(_markers(sweep_dir, "early_w16_s12"), "started")["attempt"] == 1

    # status points at the fit, which reads the branches' summaries
    assert fusionlab_main(["sweep", "status", str(sweep_dir)]) == 0
    assert f"fit: fusionlab scaling fit {sweep_dir / 'runs' / 'early'}" in capsys.readouterr().out
    fits = tmp_path / "fit"
    code = fusionlab_main(["scaling", "fit", str(sweep_dir / "runs" / "early"), "--out", str(fits),
                           "--bootstrap", "0", "--no-held-out", "--no-plots"])
    assert code == 0
    fit = json.loads((fits / "fit.json").read_text())
    assert fit["fits"]["mean"]["n_runs"] == 6

    # a branch ends exactly where a separate run of its budget with the same warmup ends
    separate_spec = _sweep_spec(tmp_path / "separate", sample_dir,
                                architectures={"early": {"recipe": "base.yaml", "widths": {32: {"lr": 3e-3}}}},
                                budgets={"steps": [12]}, schedule={"warmup": [{"warmup_steps": 2}]})
    separate_dir = tmp_path / "separate" / "sweep"
    plan_separate = ["sweep", "plan", str(separate_spec), "--out", str(separate_dir), "--workdir", str(tmp_path)]
    assert fusionlab_main(plan_separate) == 0
    assert fusionlab_main(["sweep", "run", str(separate_dir)]) == 0
    branched = json.loads((sweep_dir / "runs" / "early" / "early_w32_s12" / "summary.json").read_text())
    separate = json.loads((separate_dir / "runs" / "early" / "early_w32_s12" / "summary.json").read_text())
    assert branched["tokens"] == separate["tokens"]
    assert branched["val_loss"] == separate["val_loss"]


def test_failing_run_is_reported_and_others_finish(tmp_path, sample_dir, capsys):
    missing = {"data.train": [{"urls": str(tmp_path / "nothing-*.tar"), "type": "text"}]}
    spec = _sweep_spec(
        tmp_path, sample_dir,
        architectures={
            "early": {"recipe": "base.yaml", "widths": {16: {"lr": 3e-3, "set": missing}, 32: {"lr": 3e-3}}},
        },
        budgets={"steps": [4]}, schedule={"warmup": [{"warmup_steps": 1}]},
    )
    sweep_dir = tmp_path / "sweep"
    assert fusionlab_main(["sweep", "plan", str(spec), "--out", str(sweep_dir), "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()

    assert fusionlab_main(["sweep", "run", str(sweep_dir)]) == 1
    printed = capsys.readouterr().out
    log_path = sweep_dir / "logs" / "early_w16_s4.log"
    assert "early_w16_s4: failed" in printed
    assert str(log_path) in printed
    assert "1 finished, 1 failed" in printed
    assert "nothing-*.tar" in log_path.read_text()

    states = {s.id: s for s in launch.run_states(sweep_dir)}
    assert states["early_w16_s4"].state == "failed"
    assert states["early_w16_s4"].log == str(log_path)
    assert "nothing-*.tar" in states["early_w16_s4"].detail
    assert states["early_w32_s4"].state == "finished"

    assert fusionlab_main(["sweep", "status", str(sweep_dir)]) == 0
    assert f"log {log_path}" in capsys.readouterr().out
    # a retry runs the failed run only; --skip-failed runs nothing
    result = launch.run_local(sweep_dir, retry_failed=False, echo=lambda _: None)
    assert result.finished == []
    assert result.failed == []
    assert sorted(result.skipped) == ["early_w16_s4", "early_w32_s4"]


def test_launch_module_exit_status(tmp_path, capsys):
    assert launch.main([]) == 2
    assert launch.main([str(tmp_path), "run"]) == 1
    assert "manifest.json not found" in capsys.readouterr().err
