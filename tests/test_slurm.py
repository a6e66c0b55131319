"""Sweeps on a real single-node SLURM cluster started on this machine: arrays, failures, scancel, time limits.

The cluster comes from the slurm-local tool (FUSIONLAB_SLURM_LOCAL, by default in the shared tools
folder next to the repository), which installs SLURM from Debian packages when missing. The tests
skip, saying why, only where SLURM cannot be installed. The daemons are stopped when the module's
tests end, also when one fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import yaml

from conftest import tiny_recipe, write_recipe
from fusionlab.cli import main as fusionlab_main
from fusionlab.scaling import launch, sweep

TESTS = Path(__file__).parent
SLURM_LOCAL = Path(os.environ.get("FUSIONLAB_SLURM_LOCAL", TESTS.parents[1] / "shared" / "tools" / "slurm-local"))


class SleepPerStep(L.Callback):
    """Make every training step last at least `seconds`, so that a tiny run outlives a SLURM signal."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        time.sleep(self.seconds)


def _run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _queued_jobs() -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of every pending or running job, array tasks one by one."""
    out = _run(["squeue", "--noheader", "--array", "--format=%i|%T|%r"]).stdout
    rows = (line.strip().split("|") for line in out.splitlines() if line.strip())
    return {job: (state, reason) for job, state, reason in rows}


def _cancel_all_jobs(timeout_s: float = 90) -> None:
    jobs = list(_queued_jobs())
    if jobs:
        _run(["scancel", *jobs])
    deadline = time.monotonic() + timeout_s
    while _queued_jobs() and time.monotonic() < deadline:
        time.sleep(2)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster; yields its slurm.conf and stops every daemon afterwards."""
    if not SLURM_LOCAL.is_file():
        pytest.skip(f"the slurm-local tool is missing at {SLURM_LOCAL}; set FUSIONLAB_SLURM_LOCAL to it")
    state = tmp_path_factory.mktemp("slurm")
    previous = os.environ.get("SLURM_CONF")
    try:
        started = _run([str(SLURM_LOCAL), "start", str(state)], timeout=600)
        if started.returncode != 0:
            if shutil.which("slurmctld") is None:
                pytest.skip(f"SLURM cannot be installed on this machine: {started.stderr.strip()[-400:]}")
            pytest.fail(f"slurm-local start failed: {started.stderr.strip()[-1000:]}")
        match = re.search(r"export SLURM_CONF=(\S+)", started.stdout)
        assert match, f"slurm-local printed no SLURM_CONF line: {started.stdout!r}"
        os.environ["SLURM_CONF"] = match.group(1)
        yield Path(match.group(1))
    finally:
        try:
            if "SLURM_CONF" in os.environ:
                _cancel_all_jobs()
        finally:
            _run([str(SLURM_LOCAL), "stop", str(state)])
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous


def _plan(
    tmp_path: Path, sample_dir: Path, widths: dict, budgets: list[int], callbacks: list | None = None,
    checkpoint_every_steps: int = 1,
) -> Path:
    recipe = tiny_recipe(sample_dir, tmp_path / "unused", trainer={"limit_val_batches": 2, "num_sanity_val_steps": 0},
                         model={"shuffled_image_eval": False})
    del recipe["trainer"]["logger"]
    if callbacks:
        recipe["trainer"]["callbacks"] = callbacks
    write_recipe(tmp_path / "base.yaml", recipe)
    spec = {
        "study": "slurm",
        "architectures": {"early": {"recipe": "base.yaml", "widths": widths}},
        "budgets": {"steps": budgets},
        "schedule": {"warmup": [{"warmup_steps": 1}]},
        "checkpoint_every_steps": checkpoint_every_steps,
        "heartbeat_every_s": 1,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep_dir = tmp_path / "sweep"
    command = ["sweep", "plan", str(tmp_path / "spec.yaml"), "--out", str(sweep_dir), "--workdir", str(tmp_path)]
    assert fusionlab_main(command) == 0
    return sweep_dir


def _markers(sweep_dir: Path, run_id: str) -> Path:
    run = sweep.iter_runs(sweep.load_manifest(sweep_dir), [run_id])[0]
    return sweep_dir / run["log_dir"] / "markers"


def _events(sweep_dir: Path, run_id: str) -> list[dict]:
    text = (_markers(sweep_dir, run_id) / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _state(sweep_dir: Path, run_id: str) -> launch.RunState:
    return {s.id: s for s in launch.run_states(sweep_dir, launch.query_squeue())}[run_id]


def test_array_runs_fit_and_failure_is_reported(slurm_cluster, tmp_path, sample_dir, capsys):
    broken = {"data.train": [{"urls": str(tmp_path / "missing-*.tar"), "type": "text"}]}
    sweep_dir = _plan(tmp_path, sample_dir, {16: {"lr": 3e-3}, 32: {"lr": 3e-3}, 48: {"lr": 3e-3, "set": broken}},
                      [4, 6, 8])
    good = [f"early_w{w}_s{s}" for w in (16, 32) for s in (4, 6, 8)]
    code = fusionlab_main(["sweep", "run", str(sweep_dir), "--launcher", "slurm", "--only", *good, "early_w48_s4",
                           "--time-min", "10", "--wait", "--wait-timeout", "240"])
    printed = capsys.readouterr().out
    assert code == 1, printed  # one run failed

    submissions = launch.load_submissions(sweep_dir)
    assert len(submissions) == 1  # one job array
    assert len(submissions[0]["tasks"]) == 7
    assert {task.split("_")[0] for task in submissions[0]["tasks"].values()} == {submissions[0]["job_id"]}

    states = {s.id: s for s in launch.run_states(sweep_dir, launch.query_squeue())}
    assert all(states[run_id].state == "finished" for run_id in good), {i: states[i].state for i in good}
    failed = states["early_w48_s4"]
    assert failed.state == "failed"
    assert "missing-*.tar" in failed.detail
    error_log = Path(failed.log.split(" and ")[-1])
    assert error_log.is_file()
    assert "missing-*.tar" in error_log.read_text()
    assert states["early_w48_s6"].state == "planned"

    fits = tmp_path / "fit"
    assert fusionlab_main(["scaling", "fit", str(sweep_dir / "runs" / "early"), "--out", str(fits),
                           "--bootstrap", "0", "--no-held-out", "--no-plots"]) == 0
    assert json.loads((fits / "fit.json").read_text())["fits"]["mean"]["n_runs"] == 6


def _release_requeued() -> None:
    """Start requeued tasks now: SLURM keeps a requeued job pending for about two minutes first."""
    for job, (state, reason) in _queued_jobs().items():
        if state == "PENDING" and reason == "BeginTime":
            _run(["scontrol", "update", f"JobId={job}", "StartTime=now"])


def _wait(condition, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _release_requeued()
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_cancelled_and_timed_out_tasks_resume(slurm_cluster, tmp_path, sample_dir, monkeypatch):
    # the tasks import SleepPerStep from this file
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    slow = {"class_path": "test_slurm.SleepPerStep", "init_args": {"seconds": 1.0}}
    sweep_dir = _plan(tmp_path, sample_dir, {16: {"lr": 3e-3}}, [20, 50], callbacks=[slow], checkpoint_every_steps=5)
    cancelled, timed_out = "early_w16_s20", "early_w16_s50"
    # slurmctld (22.05, measured here) checks time limits every 30 s and sends the signal at the
    # first check after end - signal_delay_s - 30 s. With a one-minute limit and a 5 s delay an
    # attempt lasts 25-55 s, less than the 50 x 1 s that the longer run needs.
    slurm = ["--launcher", "slurm", "--time-min", "1", "--signal-delay-s", "5", "--max-requeues", "8"]
    assert fusionlab_main(["sweep", "run", str(sweep_dir), *slurm]) == 0
    job = launch.load_submissions(sweep_dir)[0]["tasks"][cancelled]

    # scancel one task in the middle of training, after its first checkpoint
    def mid_training():
        heartbeat = launch.read_marker(_markers(sweep_dir, cancelled), "heartbeat")
        return heartbeat and heartbeat["step"] >= 6
    _wait(mid_training, 150, f"{cancelled} to reach step 6")
    assert _run(["scancel", job]).returncode == 0
    _wait(lambda: job not in _queued_jobs(), 90, f"task {job} to leave the queue")
    assert _state(sweep_dir, cancelled).state in ("cancelled", "interrupted")

    # resubmitting runs only the unfinished run; the other one is still queued or running
    assert fusionlab_main(["sweep", "run", str(sweep_dir), *slurm]) == 0
    resubmitted = launch.load_submissions(sweep_dir)[-1]["tasks"]
    assert list(resubmitted) == [cancelled]

    def both_done():
        states = [_state(sweep_dir, run_id) for run_id in (cancelled, timed_out)]
        return all(s.state in ("finished", "failed", "blocked") for s in states)
    _wait(both_done, 240, "both runs to finish", poll_s=2)

    for run_id in (cancelled, timed_out):
        state = _state(sweep_dir, run_id)
        assert state.state == "finished", (run_id, state)
        started = launch.read_marker(_markers(sweep_dir, run_id), "started")
        heartbeat = launch.read_marker(_markers(sweep_dir, run_id), "heartbeat")
        assert started["attempt"] >= 2, started
        assert started["command"].endswith("--ckpt_path last"), started
        assert heartbeat["attempt_start_step"] > 0, heartbeat  # resumed from a checkpoint, not from step 0
        summary = json.loads((sweep_dir / "runs" / "early" / run_id / "summary.json").read_text())
        assert summary["steps"] == state.steps

    reasons = [event.get("reason") for event in _events(sweep_dir, cancelled) if event["marker"] == "stopped"]
    assert reasons[:1] in (["cancelled"], []), reasons  # SIGTERM is recorded, a SIGKILL leaves nothing
    reasons = [event.get("reason") for event in _events(sweep_dir, timed_out) if event["marker"] == "stopped"]
    assert "requeued" in reasons, reasons

    # finished runs are never run again
    assert fusionlab_main(["sweep", "run", str(sweep_dir), *slurm]) == 0
    assert len(launch.load_submissions(sweep_dir)) == 2
