"""A torch.profiler set up for TensorBoard, selectable from any recipe.

    fusionlab fit --config recipes/quickstart.yaml --trainer.max_steps 12 \\
        --trainer.profiler fusionlab.training.profiling.TensorBoardProfiler \\
        --trainer.profiler.dirpath runs/profile
    tensorboard --logdir runs/profile      # the PyTorch Profiler tab (torch-tb-profiler plugin)

The trace files (`*.pt.trace.json`) also open in Perfetto or chrome://tracing.
"""

from __future__ import annotations

import torch
from lightning.pytorch.profilers import PyTorchProfiler


class TensorBoardProfiler(PyTorchProfiler):
    """Profile a few training steps with torch.profiler and write TensorBoard traces.

    Args:
        dirpath: folder for the traces.
        wait: steps skipped before profiling starts (the first steps include start-up costs).
        warmup: steps profiled but discarded, so the profiler's own start-up is not measured.
        active: steps recorded.
        record_shapes: record operator input shapes.
        profile_memory: record tensor memory allocation and release.
        with_stack: record Python call stacks (large traces).
    """

    def __init__(
        self,
        dirpath: str = "runs/profile",
        wait: int = 2,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = True,
        profile_memory: bool = True,
        with_stack: bool = False,
    ):
        super().__init__(
            dirpath=dirpath,
            filename="profile",
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(dirpath),
            record_shapes=record_shapes,
            profile_memory=profile_memory,
            with_stack=with_stack,
        )
