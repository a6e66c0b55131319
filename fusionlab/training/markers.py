"""Callbacks that sweeps add to their runs: progress markers, and trunk checkpoints for branches.

`fusionlab sweep plan` puts them into each resolved recipe (trainer.callbacks); the marker files
and their meaning are described in fusionlab/scaling/launch.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from fusionlab.scaling.launch import HEARTBEAT, STOPPED, stop_reason, write_marker

log = logging.getLogger(__name__)


class RunMarkers(L.Callback):
    """Write the run's heartbeat (time and step) during training, and why training stopped early.

    Args:
        directory: the run's marker folder.
        heartbeat_every_s: seconds between heartbeats. Without a scheduler to ask, `fusionlab sweep
            status` considers a run dead once its heartbeat is older than three intervals plus 60 s.
    """

    def __init__(self, directory: str, heartbeat_every_s: float = 30.0) -> None:
        self.directory = Path(directory)
        self.heartbeat_every_s = heartbeat_every_s
        self._last_beat = float("-inf")
        self._start_step = 0

    def _beat(self, trainer: L.Trainer, force: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        now = time.monotonic()
        if force or now - self._last_beat >= self.heartbeat_every_s:
            write_marker(
                self.directory, HEARTBEAT, step=trainer.global_step, max_steps=trainer.max_steps,
                attempt_start_step=self._start_step,
            )
            self._last_beat = now

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # above 0 when this attempt resumed from a checkpoint
        self._beat(trainer, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._beat(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._beat(trainer, force=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            write_marker(
                self.directory, STOPPED, reason=stop_reason(exception), step=trainer.global_step,
                error=f"{type(exception).__name__}: {exception}",
            )


class CheckpointAtSteps(L.Callback):
    """Save a checkpoint when training reaches each of `steps` (optimiser steps), once.

    A trunk of a branched sweep saves one at the step where each cooldown branch starts, and with
    `stop_after_last` stops training after the last one. The file is DIRPATH/branch-step=S.ckpt;
    a checkpoint already there is kept, so a resumed trunk does not rewrite it.
    """

    def __init__(self, steps: list[int], dirpath: str, stop_after_last: bool = False) -> None:
        if not steps:
            raise ValueError("CheckpointAtSteps needs at least one step")
        self.steps = sorted(set(steps))
        self.dirpath = Path(dirpath)
        self.stop_after_last = stop_after_last
        self._pending: set[int] = set(self.steps)

    def path(self, step: int) -> Path:
        return self.dirpath / f"branch-step={step}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Decided once per attempt, so that every rank takes the same decisions below.
        self._pending = {step for step in self.steps if not self.path(step).exists()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step in self._pending:
            # every rank calls save_checkpoint: it synchronises the ranks and gathers sharded state
            trainer.save_checkpoint(self.path(step))
            self._pending.discard(step)
            log.info("saved the branch checkpoint %s", self.path(step))
        if self.stop_after_last and step >= self.steps[-1]:
            trainer.should_stop = True
