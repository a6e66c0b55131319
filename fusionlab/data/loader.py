"""The training iterable: one DataLoader pass per epoch, exact stream positions, equal steps on every rank.

Position of a batch. Every training batch carries, in `Batch.stats` under "position/...", the
position of the rank's stream once that batch is trained: the epoch, the batches trained in the
epoch, the batches taken from each worker's stream, and the stream of the batch. The DataModule
records the position of the batch that reaches the training step, not of the batch that
Lightning's fetcher has already pulled ahead, and stores it in checkpoints. A resumed run rebuilds
the epoch's streams and skips exactly the trained batches.

Equal steps on every rank. Streams that are read once per epoch (no resampling) give ranks
different numbers of batches. Each rank then asks all ranks at every batch whether any of them
still has data (one all-reduce of one integer), and a rank that has run out yields padding batches
that carry no loss until every rank has, so that no rank waits forever in a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader

from fusionlab.batch import Batch
from fusionlab.data.streams import STREAM_BATCHES_KEY, STREAM_KEY, BatchStream, RowStream

log = logging.getLogger(__name__)

POSITION_PREFIX = "position/"


@dataclass
class StreamPosition:
    """Position of one rank's training stream after a batch.

    `streams[w]` counts the batches taken from worker stream w in this epoch and `last` is the
    stream of the most recent one (-1 before the first). `batches` counts every batch of the epoch,
    padding batches included, so it is the rank's training step within the epoch.
    """

    epoch: int
    batches: int = 0
    streams: list[int] = field(default_factory=list)
    last: int = -1

    def to_stats(self) -> dict[str, int]:
        stats = {"position/epoch": self.epoch, "position/batches": self.batches, "position/last": self.last}
        stats |= {f"position/streams/{w}": n for w, n in enumerate(self.streams)}
        return stats

    @classmethod
    def pop_from(cls, stats: dict[str, int]) -> StreamPosition | None:
        """Remove the "position/..." keys from `stats` and return the position they encode, if any."""
        keys = [key for key in stats if key.startswith(POSITION_PREFIX)]
        values = {key: int(stats.pop(key)) for key in keys}
        if "position/epoch" not in values:
            return None
        n_streams = sum(key.startswith("position/streams/") for key in values)
        return cls(
            epoch=values["position/epoch"],
            batches=values["position/batches"],
            streams=[values[f"position/streams/{w}"] for w in range(n_streams)],
            last=values["position/last"],
        )

    def as_dict(self) -> dict:
        """Plain ints and lists, so that checkpoints load with torch.load(weights_only=True)."""
        return {"epoch": self.epoch, "batches": self.batches, "streams": list(self.streams), "last": self.last}

    @classmethod
    def from_dict(cls, state: dict) -> StreamPosition:
        return cls(int(state["epoch"]), int(state["batches"]), [int(n) for n in state["streams"]], int(state["last"]))


class TrainLoader:
    """Training batches of one rank, epoch after epoch, as Lightning iterates them.

    Args:
        rows: the rank's packed-row streams.
        num_workers: DataLoader worker processes; each runs one stream.
        rank, world_size: this rank and the number of ranks.
        batches_per_epoch: stop each epoch after this many batches (and report it as the length);
            None runs each epoch to the end of its streams.
        sync_ranks: pad with no-loss batches until every rank has run out (finite epochs on
            several ranks); needs an initialised torch.distributed process group.
        padding_batch: builds a batch that carries no loss.
        current_epoch: the trainer's epoch, or None without a trainer (then each pass counts one).
        resume_position: returns the position to resume from for an epoch, or None to start it.
    """

    def __init__(
        self,
        rows: RowStream,
        *,
        num_workers: int,
        rank: int,
        world_size: int,
        batches_per_epoch: int | None,
        sync_ranks: bool,
        padding_batch: Callable[[], Batch],
        current_epoch: Callable[[], int | None],
        resume_position: Callable[[int], StreamPosition | None],
    ) -> None:
        self.rows = rows
        self.num_workers = num_workers
        self.n_streams = max(1, num_workers)
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.sync_ranks = sync_ranks
        self.padding_batch = padding_batch
        self.current_epoch = current_epoch
        self.resume_position = resume_position
        # Position after the last batch handed out. Lightning's fetcher pulls one batch ahead of
        # the training step, so this is never the position to resume from.
        self.position: StreamPosition | None = None
        self._passes = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            # Lightning reads a TypeError as "length unknown" and ends the epoch at StopIteration.
            raise TypeError("the epoch length is unknown: set batches_per_epoch to fix it")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.current_epoch()
        if epoch is None:
            epoch = self._passes
        self._passes += 1
        position = self.position = self._start(epoch)
        dataset = BatchStream(
            self.rows, rank=self.rank, world_size=self.world_size, epoch=epoch,
            skip=list(position.streams), rotation=(position.last + 1) % self.n_streams, tag_positions=True,
        )
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        start = position.batches
        yield from self._batches(iter(loader), position)
        if position.batches == start == 0:
            raise RuntimeError(
                f"training epoch {epoch} produced no batch on rank {self.rank}: every sample of the training "
                "sources was skipped (see the warnings above) or the sources hold fewer rows than one batch "
                "with drop_last; check the shards"
            )

    def _start(self, epoch: int) -> StreamPosition:
        position = self.resume_position(epoch)
        if position is None:
            return StreamPosition(epoch, 0, [0] * self.n_streams)
        log.info(
            "resuming training epoch %d of rank %d after %d batches (batches per worker stream: %s)",
            epoch, self.rank, position.batches, position.streams,
        )
        return StreamPosition.from_dict(position.as_dict())

    def _batches(self, batches: Iterator[Batch], position: StreamPosition) -> Iterator[Batch]:
        while self.batches_per_epoch is None or position.batches < self.batches_per_epoch:
            batch = next(batches, None)
            if self.sync_ranks and not _any_rank(batch is not None):
                return
            if batch is None:
                if not self.sync_ranks:
                    return
                batch = self.padding_batch()  # this rank ran out first: keep step with the others
            else:
                stream = batch.stats.pop(STREAM_KEY)
                position.streams[stream] = batch.stats.pop(STREAM_BATCHES_KEY)
                position.last = stream
            position.batches += 1
            batch.stats.update(position.to_stats())
            yield batch


def _any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (one all-reduce of one integer)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
