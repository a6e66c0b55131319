"""Launch a planned sweep: locally one run after another, or on SLURM as job arrays through submitit.

Every run keeps markers in its log folder (LOG_DIR/markers/), which are the ground truth for
`fusionlab sweep status` because a run killed by scancel or a time limit leaves nothing for
submitit to read (and clusters without accounting have no sacct):

    started.json    written by execute_run when an attempt begins: host, pid, attempt, SLURM task
    heartbeat.json  rewritten during training by fusionlab.training.markers.RunMarkers: time, step
    stopped.json    the attempt ended early: reason failed, cancelled or requeued, the error, the log
    finished.json   the run reached its last step and wrote what it owes (summary or trunk checkpoints)
    events.jsonl    every marker above but heartbeats, appended, as the run's history

A run's state combines them with the process table (local runs) or squeue (SLURM tasks):
planned, queued, running, finished, failed, cancelled, requeued, interrupted (started, then
vanished without a marker: killed, out of memory, node lost), blocked (a branch whose trunk
has not reached its start step).

Time limits: submitit asks SLURM for a signal (USR2) `signal_delay_s` before the limit; RunTask is
checkpointable, so submitit requeues the array task, and the new attempt resumes from the run's
last periodic checkpoint with `--ckpt_path last`. Lightning's own SLURM auto-requeue is not used:
submitit already owns the signal and the resubmission of the pickled task, and two handlers
requeueing the same job would race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionlab.scaling.sweep import SpecError, iter_runs, load_manifest

log = logging.getLogger(__name__)

STARTED, HEARTBEAT, STOPPED, FINISHED = "started", "heartbeat", "stopped", "finished"
SUBMISSIONS_FILE = "submissions.json"
ACTIVE_STATES = ("queued", "running", "requeued")

# Set by RunTask.checkpoint when submitit is about to requeue this process's task.
_requeue_requested = False
_squeue_failures = 0


# ------------------------------------------------------------------------------------ markers


def write_marker(directory: str | Path, name: str, *, history: bool = True, **fields: Any) -> dict:
    """Write markers/NAME.json atomically and append it to markers/events.jsonl; return the record.

    Heartbeats, and records written with history=False, are not appended.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"time": time.time(), **fields}
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, directory / f"{name}.json")
    if history and name != HEARTBEAT:  # heartbeats would flood the history
        with (directory / "events.jsonl").open("a") as events:
            events.write(json.dumps({"marker": name, **record}) + "\n")
    return record


def read_marker(directory: str | Path, name: str) -> dict | None:
    """Return markers/NAME.json, or None when it is missing or half-written."""
    try:
        record = json.loads((Path(directory) / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def stop_reason(exception: BaseException) -> str:
    """Classify why an attempt ended: requeued (by submitit), cancelled (a signal) or failed."""
    if _requeue_requested:
        return "requeued"
    # Lightning raises SIGTERMException (a SystemExit) after SIGTERM, which is how scancel stops a task.
    if isinstance(exception, KeyboardInterrupt) or type(exception).__name__ == "SIGTERMException":
        return "cancelled"
    return "failed"


def rank() -> int:
    """Return the rank of this process under SLURM, torchrun or Lightning's launcher.

    Rank 0 writes the markers.
    """
    for name in ("SLURM_PROCID", "RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


# --------------------------------------------------------------------------- one run, in-process


def run_paths(sweep_dir: Path, run: Mapping[str, Any]) -> dict[str, Path]:
    log_dir = sweep_dir / run["log_dir"]
    return {
        "recipe": sweep_dir / run["recipe"],
        "log_dir": log_dir,
        "markers": log_dir / "markers",
        "last": log_dir / "checkpoints" / "last.ckpt",
        "summary": log_dir / "summary.json",
        "local_log": sweep_dir / "logs" / f"{run['id']}.log",
    }


def fit_arguments(sweep_dir: Path, run: Mapping[str, Any]) -> list[str]:
    """`fusionlab fit` arguments of a run: resume from its own last checkpoint, or a branch's start."""
    paths = run_paths(sweep_dir, run)
    argv = ["fit", "--config", str(paths["recipe"])]
    if paths["last"].exists():
        return argv + ["--ckpt_path", "last"]
    if run["kind"] == "branch":
        start = sweep_dir / run["start_checkpoint"]
        if not start.exists():
            raise FileNotFoundError(
                f"branch {run['id']} starts from {start}, which trunk {run['trunk']} has not written yet; "
                "run the trunk first (`fusionlab sweep run` orders trunks before branches)"
            )
        return argv + ["--ckpt_path", str(start)]
    return argv


def check_outputs(sweep_dir: Path, run: Mapping[str, Any]) -> str | None:
    """Return what a run that returned normally failed to produce, or None when all is there."""
    paths = run_paths(sweep_dir, run)
    if run["kind"] == "trunk":
        missing = [step for step in run["branch_steps"]
                   if not (paths["log_dir"] / "checkpoints" / f"branch-step={step}.ckpt").exists()]
        return f"trunk checkpoints for steps {missing} are missing" if missing else None
    try:
        summary = json.loads(paths["summary"].read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"no readable {paths['summary']} ({error})"
    if summary.get("steps") != run["steps"]:
        return f"the summary reports {summary.get('steps')} steps, the plan {run['steps']}"
    if not summary.get("val_loss"):
        return "the summary has no validation loss; check the recipe's validation sources"
    return None


def execute_run(sweep_dir: str | Path, run_id: str, log_path: str | None = None) -> str:
    """Train one run of a sweep in this process, writing its markers; return "finished" or "skipped".

    Raises whatever training raised, after recording it in markers/stopped.json.
    """
    sweep_dir = Path(sweep_dir).resolve()
    manifest = load_manifest(sweep_dir)
    run = iter_runs(manifest, [run_id])[0]
    paths = run_paths(sweep_dir, run)
    writer = rank() == 0
    if read_marker(paths["markers"], FINISHED):
        log.info("run %s is finished; nothing to do", run_id)
        return "skipped"

    previous = read_marker(paths["markers"], STARTED) or {}
    argv, missing_start = None, None
    try:
        argv = fit_arguments(sweep_dir, run)
    except FileNotFoundError as error:
        missing_start = error  # recorded below like any failure of the attempt
    if writer:
        write_marker(
            paths["markers"], STARTED,
            attempt=int(previous.get("attempt", 0)) + 1, host=socket.gethostname(), pid=os.getpid(),
            slurm_job=_slurm_task_id(), log=log_path, command=_command_line(argv),
        )
    try:
        if missing_start is not None:
            raise missing_start
        # imported here: a signal may arrive while torch and Lightning load, and must be recorded
        from fusionlab.training.cli import run_lightning_cli

        run_lightning_cli(argv)
        # rank 0 writes the summary, so only rank 0 can check for it
        problem = check_outputs(sweep_dir, run) if writer else None
        if problem:
            raise RuntimeError(f"run {run_id} ended without its results: {problem}")
    except BaseException as error:
        if writer:
            _record_stop(paths["markers"], error, log_path)
        raise
    if writer:
        write_marker(paths["markers"], FINISHED, log=log_path, steps=run["steps"])
    return "finished"


def _record_stop(directory: Path, error: BaseException, log_path: str | None) -> None:
    started = read_marker(directory, STARTED) or {}
    stopped = read_marker(directory, STOPPED)
    if stopped and stopped.get("time", 0) >= started.get("time", 0):
        # RunMarkers already recorded this attempt's end from inside the trainer: add the log
        fields = {k: v for k, v in stopped.items() if k != "time"}
        fields["log"] = log_path
        if _requeue_requested:
            fields["reason"] = "requeued"
        write_marker(directory, STOPPED, history=False, **fields)
        return
    write_marker(
        directory, STOPPED, reason=stop_reason(error), error=f"{type(error).__name__}: {error}",
        traceback="".join(traceback.format_exception(error)[-6:]), log=log_path,
    )


def _slurm_task_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _command_line(argv: Sequence[str] | None) -> str | None:
    return None if argv is None else "fusionlab " + shlex.join(argv)


# -------------------------------------------------------------------------------------- state


@dataclass
class RunState:
    """State of one run, from its markers and the scheduler."""

    id: str
    kind: str
    architecture: str
    state: str
    step: int | None = None
    steps: int = 0
    attempts: int = 0
    job: str | None = None
    log: str | None = None
    detail: str = ""
    val_loss: float | None = None


def load_submissions(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / SUBMISSIONS_FILE
    return json.loads(path.read_text()) if path.exists() else []


def query_squeue(timeout_s: float = 30.0) -> dict[str, str] | None:
    """Return {job id: state} for every pending or running job (array tasks one by one), or None.

    None means that squeue is missing, failed or did not return within timeout_s.
    """
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i|%T"],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        global _squeue_failures
        _squeue_failures += 1
        if _squeue_failures == 1 or _squeue_failures % 100 == 0:  # a polling loop would repeat it
            log.warning("squeue failed (%s, %d times so far); SLURM states come from the run markers alone",
                        error, _squeue_failures)
        return None
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state
    return states


def run_states(
    sweep_dir: str | Path,
    squeue: Mapping[str, str] | None = None,
    now: float | None = None,
) -> list[RunState]:
    """Return the state of every run of a sweep, in manifest order.

    `squeue` maps SLURM job ids to states (see query_squeue); without it, SLURM tasks are judged
    by the age of their heartbeat.
    """
    sweep_dir = Path(sweep_dir).resolve()
    manifest = load_manifest(sweep_dir)
    now = time.time() if now is None else now
    jobs = _latest_jobs(load_submissions(sweep_dir))
    heartbeat_s = float(manifest.get("heartbeat_every_s", 30.0))
    states = {}
    for run in manifest["runs"]:
        states[run["id"]] = _run_state(sweep_dir, run, jobs.get(run["id"]), squeue, now, heartbeat_s)
    for run in manifest["runs"]:
        state = states[run["id"]]
        if run["kind"] == "branch" and state.state == "planned":
            trunk = states[run["trunk"]]
            if trunk.state != "finished" and not (sweep_dir / run["start_checkpoint"]).exists():
                state.detail = f"waits for trunk {trunk.id} ({trunk.state})"
                if trunk.state in ("failed", "cancelled"):
                    state.state = "blocked"
    return list(states.values())


def _latest_jobs(submissions: Iterable[Mapping]) -> dict[str, str]:
    jobs: dict[str, str] = {}
    for submission in submissions:
        jobs.update(submission.get("tasks", {}))
    return jobs


def _run_state(sweep_dir, run, job, squeue, now, heartbeat_s) -> RunState:
    paths = run_paths(sweep_dir, run)
    started = read_marker(paths["markers"], STARTED)
    heartbeat = read_marker(paths["markers"], HEARTBEAT)
    stopped = read_marker(paths["markers"], STOPPED)
    state = RunState(
        run["id"], run["kind"], run["architecture"], "planned", steps=run["steps"],
        attempts=int((started or {}).get("attempt", 0)), job=job,
        step=(heartbeat or {}).get("step"),
    )
    if started:
        state.log = started.get("log")
    if read_marker(paths["markers"], FINISHED):
        state.state, state.step = "finished", run["steps"]
        state.val_loss = _mean_val_loss(paths["summary"])
        return state

    queued = squeue.get(job) if (squeue is not None and job) else None
    if queued is not None:
        state.state = "running" if queued in ("RUNNING", "COMPLETING", "CONFIGURING") else "queued"
        state.detail = f"SLURM {queued}"
        return state
    if stopped and stopped.get("time", 0) >= (started or {}).get("time", 0):
        state.state = stopped.get("reason", "failed")
        state.detail = stopped.get("error", "")
        state.step = stopped.get("step", state.step)  # newer than the last heartbeat
        state.log = stopped.get("log") or state.log
        if state.state == "requeued" and squeue is not None:
            state.state = "interrupted"
            state.detail = (
                "a requeue was requested, but the task is no longer queued; the next launch resumes it"
            )
        return state
    if started is None:
        return state
    if _alive(started, heartbeat, squeue, now, heartbeat_s):
        state.state = "running"
    else:
        state.state = "interrupted"
        state.detail = "started but stopped without a marker; the next launch resumes it"
    return state


def _alive(started, heartbeat, squeue, now, heartbeat_s) -> bool:
    job = started.get("slurm_job")
    if job is None and started.get("host") == socket.gethostname():
        return _pid_runs(int(started.get("pid", 0)))
    if job is not None and squeue is not None:
        return job in squeue
    # no process table or scheduler to ask: trust a recent sign of life
    last = max(started.get("time", 0), (heartbeat or {}).get("time", 0))
    return now - last < 3 * heartbeat_s + 60


def _pid_runs(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # a finished run's pid may be reused: check that it is still a fusionlab process
        return b"fusionlab" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _mean_val_loss(summary: Path) -> float | None:
    try:
        return json.loads(summary.read_text()).get("val_loss", {}).get("mean")
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------- local launcher


@dataclass
class LocalResult:
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def runs_to_launch(
    sweep_dir: Path, ids: Iterable[str] | None, retry_failed: bool, squeue: Mapping[str, str] | None = None
) -> tuple[list[dict], dict[str, RunState]]:
    """Return the runs that still need training (in launch order) and every run's state."""
    manifest = load_manifest(sweep_dir)
    states = {s.id: s for s in run_states(sweep_dir, squeue)}
    todo = []
    for run in iter_runs(manifest, ids):
        state = states[run["id"]].state
        if state == "finished" or state in ACTIVE_STATES:
            continue
        if state == "failed" and not retry_failed:
            continue
        todo.append(run)
    return todo, states


@contextlib.contextmanager
def _exclusive(sweep_dir: Path):
    """Hold DIR/.launch.lock, so that two local launchers never train the same run twice."""
    with (sweep_dir / ".launch.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(
                f"another `fusionlab sweep run` is launching runs of {sweep_dir}; wait for it"
            ) from None
        yield


def run_local(
    sweep_dir: str | Path,
    ids: Iterable[str] | None = None,
    *,
    retry_failed: bool = True,
    run_timeout_s: float | None = None,
    echo: Callable[[str], None] = print,
) -> LocalResult:
    """Train the unfinished runs one after another, each in a child process with its own log.

    Finished runs are skipped, interrupted ones resume from their last checkpoint, and a failed
    run is reported with its log and does not stop the others. A branch whose trunk did not
    write its start checkpoint is reported as blocked.
    """
    sweep_dir = Path(sweep_dir).resolve()
    manifest = load_manifest(sweep_dir)
    result = LocalResult()
    with _exclusive(sweep_dir):
        todo, states = runs_to_launch(sweep_dir, ids, retry_failed)
        selected = [run["id"] for run in iter_runs(manifest, ids)]
        launching = {run["id"] for run in todo}
        result.skipped = [run_id for run_id in selected if run_id not in launching]
        if result.skipped:
            echo(f"skipping {len(result.skipped)} runs that are finished, active or failed "
                 "(see `fusionlab sweep status`)")
        for index, run in enumerate(todo, start=1):
            prefix = f"[{index}/{len(todo)}] {run['id']}"
            if run["kind"] == "branch" and not (sweep_dir / run["start_checkpoint"]).exists():
                echo(f"{prefix}: blocked, trunk {run['trunk']} has not written {run['start_checkpoint']}")
                result.blocked.append(run["id"])
                continue
            ok = _run_child(sweep_dir, manifest, run, run_timeout_s, prefix, echo)
            (result.finished if ok else result.failed).append(run["id"])
    return result


def _run_child(sweep_dir, manifest, run, timeout_s, prefix, echo) -> bool:
    paths = run_paths(sweep_dir, run)
    paths["local_log"].parent.mkdir(parents=True, exist_ok=True)
    if paths["last"].exists():
        action = "resuming"
    elif run["kind"] == "branch":
        action = "branching"
    else:
        action = "starting"
    echo(f"{prefix}: {action} ({run['steps']} steps), log {paths['local_log']}")

    command = [
        sys.executable, "-m", "fusionlab.scaling.launch", str(sweep_dir), run["id"], str(paths["local_log"]),
    ]
    began = time.monotonic()
    with paths["local_log"].open("a") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=manifest["workdir"])
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            echo(f"{prefix}: timed out after {timeout_s:g} s; stopping it (it resumes on the next launch)")
            code = _stop_child(child)
        except KeyboardInterrupt:
            # the child got the same SIGINT from the terminal; give it time to write its markers
            _stop_child(child, signal.SIGINT)
            raise

    seconds = time.monotonic() - began
    if code == 0 and read_marker(paths["markers"], FINISHED):
        echo(f"{prefix}: finished in {seconds:.0f} s")
        return True
    started = read_marker(paths["markers"], STARTED) or {}
    stopped = read_marker(paths["markers"], STOPPED)
    if stopped is None or stopped.get("time", 0) < started.get("time", 0):
        # killed before it could write a marker (SIGKILL, out of memory): the next launch resumes it
        echo(f"{prefix}: interrupted after {seconds:.0f} s (exit {code}), no error recorded; "
             f"log {paths['local_log']}")
        return False
    echo(f"{prefix}: {stopped.get('reason', 'failed')} after {seconds:.0f} s (exit {code}): "
         f"{stopped.get('error', '')}; log {paths['local_log']}")
    return False


def _stop_child(child: subprocess.Popen, first: int = signal.SIGTERM, grace_s: float = 60.0) -> int:
    """Stop a child run: `first` (Lightning stops at the next step and records it), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(first)
    try:
        return child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


# ------------------------------------------------------------------------------- SLURM launcher


@dataclass
class SlurmOptions:
    """Job-script settings for a cluster: the spec's `slurm` section, overridden on the command line.

    Args:
        partition: SLURM partition (None: the cluster's default).
        time_min: time limit of one attempt, in minutes; longer runs are requeued and resume.
        cpus_per_task: CPU cores per process.
        gpus_per_task: GPUs per process (None: none requested).
        mem_gb: memory per node, in GB (None: the partition's default).
        nodes: nodes per run (trainer.num_nodes).
        tasks_per_node: processes per node; set it to trainer.devices for multi-GPU runs, which
            Lightning then takes from SLURM.
        container: container image to run in (Apptainer .sif path, or an enroot/pyxis image).
        container_runtime: "apptainer" (wraps the Python command) or "enroot" (srun --container-image,
            which needs the pyxis plugin).
        sbatch: extra sbatch options, {name: value} without the leading dashes (value true for a flag).
        setup: shell lines run in the job script before the run (module load, source venv, ...).
        array_parallelism: runs of one array that may run at the same time.
        signal_delay_s: seconds before the time limit at which SLURM signals the task to requeue.
        max_requeues: how many times a run may be requeued after reaching the time limit.
        job_name: SLURM job name (default: sweep-STUDY).
        python: Python command on the compute nodes (default: this interpreter).
    """

    partition: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    gpus_per_task: int | None = None
    mem_gb: float | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    container: str | None = None
    container_runtime: str = "apptainer"
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    array_parallelism: int = 64
    signal_delay_s: int = 90
    max_requeues: int = 3
    job_name: str | None = None
    python: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SlurmOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise SpecError(f"unknown slurm options {unknown}; allowed: {sorted(known)}")
        options = cls(**values)
        if options.container_runtime not in ("apptainer", "enroot"):
            raise SpecError(
                f"slurm container_runtime = {options.container_runtime!r}; use 'apptainer' or 'enroot'"
            )
        if options.time_min < 1:
            raise SpecError(
                f"slurm time_min = {options.time_min}; SLURM time limits are whole minutes, at least 1"
            )
        return options

    def executor_parameters(self, study: str, sweep_dir: Path, workdir: Path) -> dict[str, Any]:
        """Parameters of submitit's SlurmExecutor.update_parameters (sbatch names)."""
        params: dict[str, Any] = {
            "job_name": self.job_name or f"sweep-{study}",
            "time": self.time_min,
            "cpus_per_task": self.cpus_per_task,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
            "additional_parameters": dict(self.sbatch),
            "setup": [f"cd {shlex.quote(str(workdir))}", *self.setup],
        }
        if self.partition:
            params["partition"] = self.partition
        if self.gpus_per_task:
            params["gpus_per_task"] = self.gpus_per_task
        if self.mem_gb:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        if self.container and self.container_runtime == "enroot":
            mounts = ",".join(f"{p}:{p}" for p in sorted({str(sweep_dir), str(workdir)}))
            params["srun_args"] = [
                f"--container-image={self.container}",
                f"--container-mounts={mounts}",
                f"--container-workdir={workdir}",
            ]
        return params

    def python_command(self, sweep_dir: Path, workdir: Path) -> str:
        python = self.python or (shlex.quote(sys.executable) if not self.container else "python")
        if self.container and self.container_runtime == "apptainer":
            binds = ",".join(sorted({str(sweep_dir), str(workdir)}))
            gpu = "--nv " if self.gpus_per_task else ""
            return f"apptainer exec {gpu}--bind {binds} {shlex.quote(self.container)} {python}"
        return python


class RunTask:
    """The callable submitit runs for one array task: one run of the sweep, resumable.

    submitit calls `checkpoint` when SLURM signals the coming time limit (or a preemption) and
    requeues the task with the returned submission: the same run, which then resumes from its
    last checkpoint.
    """

    def __init__(self, sweep_dir: str, run_id: str, workdir: str) -> None:
        self.sweep_dir = sweep_dir
        self.run_id = run_id
        self.workdir = workdir

    def __call__(self) -> str:
        import submitit

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        os.chdir(self.workdir)
        environment = submitit.JobEnvironment()
        log_path = f"{environment.paths.stdout} and {environment.paths.stderr}"
        return execute_run(self.sweep_dir, self.run_id, log_path)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        global _requeue_requested
        _requeue_requested = True
        log.warning("run %s: SLURM time limit or preemption; requeueing the task", self.run_id)
        return submitit.helpers.DelayedSubmission(RunTask(self.sweep_dir, self.run_id, self.workdir))


def submit_slurm(
    sweep_dir: str | Path,
    options: SlurmOptions,
    ids: Iterable[str] | None = None,
    *,
    retry_failed: bool = True,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Submit the unfinished runs as SLURM job arrays through submitit; return the submissions.

    Trunks and separate runs form one array, and cooldown branches a second one. The second array
    starts after the first has ended, and after any trunk still queued from an earlier submission.
    With `dry_run`, the job scripts are written under DIR/slurm/dry-run/ and nothing is submitted.
    """
    sweep_dir = Path(sweep_dir).resolve()
    manifest = load_manifest(sweep_dir)
    squeue = None if dry_run else query_squeue()
    todo, states = runs_to_launch(sweep_dir, ids, retry_failed, squeue)
    if not todo:
        echo("nothing to submit: every selected run is finished, active or failed")
        return []
    first = [run for run in todo if run["kind"] != "branch"]
    branches = [run for run in todo if run["kind"] == "branch"]
    active_trunks = {
        s.job.split("_")[0]
        for s in states.values()
        if s.kind == "trunk" and s.state in ACTIVE_STATES and s.job
    }
    workdir = Path(manifest["workdir"])
    if dry_run:
        shutil.rmtree(sweep_dir / "slurm" / "dry-run", ignore_errors=True)
    submissions = []
    if first:
        submissions.append(_submit_array(sweep_dir, manifest, options, first, None, dry_run, workdir, echo))
    if branches:
        waits_for = sorted(active_trunks | ({submissions[0]["job_id"]} if submissions and any(
            run["kind"] == "trunk" for run in first) else set()))
        dependency = f"afterany:{':'.join(waits_for)}" if waits_for else None
        submissions.append(
            _submit_array(sweep_dir, manifest, options, branches, dependency, dry_run, workdir, echo)
        )
    if not dry_run:
        previous = load_submissions(sweep_dir)
        _write_json(sweep_dir / SUBMISSIONS_FILE, previous + submissions)
    return submissions


def _submit_array(sweep_dir, manifest, options, runs, dependency, dry_run, workdir, echo) -> dict:
    import submitit

    folder = sweep_dir / "slurm"
    params = options.executor_parameters(manifest["study"], sweep_dir, workdir)
    if dependency:
        params["dependency"] = dependency
    python = options.python_command(sweep_dir, workdir)
    tasks = [RunTask(str(sweep_dir), run["id"], str(workdir)) for run in runs]
    if dry_run:
        return _write_dry_run(folder, params, python, runs, echo)

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues, python=python)
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    job_id = jobs[0].job_id.split("_")[0]
    echo(f"submitted {len(jobs)} runs as SLURM job {job_id}" + (f" ({dependency})" if dependency else ""))
    return {
        "time": time.time(),
        "launcher": "slurm",
        "job_id": job_id,
        "dependency": dependency,
        "tasks": {run["id"]: job.job_id for run, job in zip(runs, jobs, strict=True)},
        "folder": str(folder),
    }


def _script_only_executor(folder: Path, python: str):
    """Return a submitit SlurmExecutor that only builds job scripts, on a machine without SLURM."""
    import submitit

    class ScriptOnlyExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1  # skip the check for srun: nothing is submitted

    return ScriptOnlyExecutor(folder=folder, python=python)


def _write_dry_run(folder: Path, params: dict, python: str, runs: Sequence[dict], echo) -> dict:
    out = folder / "dry-run"
    out.mkdir(parents=True, exist_ok=True)
    index = len(list(out.glob("array-*.sh")))  # the folder is emptied at the start of each dry run
    executor = _script_only_executor(folder, python)
    executor.update_parameters(**params)
    # NOTE: _make_submission_file_text and _submitit_command_str are submitit internals (checked
    # with submitit 1.5); they produce the exact script that submit() would hand to sbatch.
    executor.parameters["map_count"] = len(runs)
    script = executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
    path = out / f"array-{index}.sh"
    path.write_text(script)
    tasks = {run["id"]: f"ARRAY{index}_{i}" for i, run in enumerate(runs)}
    _write_json(out / f"array-{index}.json", {"script": str(path), "tasks": tasks})
    echo(f"dry run: wrote {path} for {len(runs)} runs (task index -> run in {path.with_suffix('.json')})")
    return {"launcher": "slurm-dry-run", "job_id": f"ARRAY{index}", "tasks": tasks, "script": str(path)}


def _write_json(path: Path, document: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def wait_for_runs(
    sweep_dir: str | Path,
    ids: Iterable[str],
    timeout_s: float,
    poll_s: float = 5.0,
    squeue: Callable[[], Mapping[str, str] | None] = query_squeue,
) -> list[RunState]:
    """Poll until none of the given runs is queued, running or requeued, for at most timeout_s.

    Raises TimeoutError naming the runs still active when the time is up.
    """
    ids = set(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        states = [s for s in run_states(sweep_dir, squeue()) if s.id in ids]
        active = [s for s in states if s.state in ACTIVE_STATES]
        if not active:
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout_s:g} s, runs {[s.id for s in active]} are still "
                f"{sorted({s.state for s in active})}; `fusionlab sweep status {sweep_dir}` shows them"
            )
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Train one run as the local launcher starts it.

    Command line: `python -m fusionlab.scaling.launch SWEEP_DIR RUN_ID [LOG]`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3):
        print("usage: python -m fusionlab.scaling.launch SWEEP_DIR RUN_ID [LOG]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        execute_run(argv[0], argv[1], argv[2] if len(argv) == 3 else None)
    except SpecError as error:
        print(f"fusionlab sweep: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as error:
        # Lightning's SIGTERMException carries no code: a stopped run must not exit with 0
        return error.code if isinstance(error.code, int) and error.code != 0 else 1
    except Exception:  # noqa: BLE001 - recorded in the run's markers; the launcher reports the log
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

