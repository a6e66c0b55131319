"""ModelCheckpoint whose last.ckpt always contains the final step of a run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt written again at the end of training when stale.

    Lightning 2.6 skips the save at the end of training once any periodic last.ckpt exists. When
    `every_n_train_steps` does not divide `max_steps`, last.ckpt would then contain an earlier step
    than the final model, such as step 500 of a 600-step run.
    """

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step_saved = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and getattr(self, "_last_step_saved", None) != trainer.global_step:
            self._last_checkpoint_saved = False
        super().on_train_end(trainer, pl_module)
