"""Sources and the Lightning DataModule: shard patterns in, packed Batches out.

A Source names shards of one data type and a mixture weight. FusionDataModule resolves the shard
lists and builds the loaders. An empty source is left out with a warning and the weights of the
others renormalised, and all sources empty is an error at start-up. The loaders:

- training: a TrainLoader (loader.py) per rank over RowStreams (streams.py), which mix the sources
  per sample by weight, resampled with replacement or read once per epoch, with every rank running
  the same number of steps and exact positions for resuming;
- validation: every validation sample read once, in order, with no shuffle and no resampling,
  the readers' shares disjoint (see streams.split_shards).

Batches are collated in the DataLoader workers, so each batch comes from one worker and carries
that worker's counters (skipped samples by reason, token counts by type) in Batch.stats.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
from braceexpand import braceexpand
from torch import distributed as dist
from torch.utils.data import DataLoader

from fusionlab.batch import DATA_TYPES, Batch
from fusionlab.data.formats import tar_samples
from fusionlab.data.loader import StreamPosition, TrainLoader
from fusionlab.data.packing import padding_batch
from fusionlab.data.streams import BatchStream, ResolvedSource, RowStream, StreamSettings, rank_info
from fusionlab.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")  # opened by webdataset's gopen, never globbed


@dataclass
class Source:
    """One data source: shards of one type, drawn with relative probability `weight` in training.

    `urls` is a path, a directory of .tar files, a brace pattern ("shards/{000..099}.tar"), a glob,
    several of these joined by "::", or a webdataset URL such as "pipe:cat shard.tar".
    """

    urls: str
    type: Literal["caption", "interleaved", "text", "qa"]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in DATA_TYPES:
            raise ValueError(f"source {self.urls!r} has unknown type {self.type!r}: use one of {DATA_TYPES}")
        if self.weight <= 0:
            raise ValueError(f"source {self.urls!r} has weight {self.weight}: weights must be > 0 (remove the source to leave it out)")


def expand_shards(urls: str) -> list[str]:
    """Expand a Source's `urls` into shard urls; a local pattern that matches nothing raises FileNotFoundError."""
    shards: list[str] = []
    for part in urls.split("::"):
        for item in braceexpand(part):
            if _REMOTE.match(item) and not item.startswith("file:"):
                shards.append(item)
                continue
            path = item.removeprefix("file:")
            if path.startswith("//"):
                path = path[2:]  # file:///abs/path
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
            elif os.path.isdir(path):
                matches = sorted(glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*.tar.gz")))
            else:
                matches = [path] if os.path.isfile(path) else []
            if not matches:
                raise FileNotFoundError(
                    f"no shard matches {item!r} (from source urls {urls!r}): check the path, brace range or glob"
                )
            shards += matches
    return shards


class FusionDataModule(L.LightningDataModule):
    """Caption, interleaved and text shards as packed Batches (see fusionlab.batch).

    Args:
        train: training sources, mixed by weight.
        val: validation sources, each read once in order; None or [] for no validation.
        tokenizer: "byte", or the path of a Hugging Face tokenizers .json file.
        image_size: side of the square images, in pixels.
        patch_size: side of a square patch, in pixels; an image takes (image_size // patch_size)**2 positions.
        context: positions per packed row (the sequence length T).
        batch_size: rows per batch (B).
        num_workers: DataLoader worker processes per rank.
        seed: seed of the shard order and draws, shuffle buffers and the mixture.
        shuffle_buffer: raw samples held per source for shuffling in training; 0 or 1 turns it off.
        resample: draw training shards with replacement, forever. The epoch length then comes from
            batches_per_epoch, or the run is one endless epoch bounded by max_steps. False reads
            each training sample exactly once per epoch, over all ranks and workers together
            (ranks whose share runs out first train on no-loss padding batches until all are done).
        batches_per_epoch: with resample, end each training epoch after this many batches; every
            epoch then draws a new stream, and resuming replays at most one epoch of data loading.
        drop_last: drop the last, partial batch of each worker's stream in training.
        max_image_pixels: largest width * height accepted, checked in the image header before decoding.
        strict: raise on the first bad sample or damaged shard instead of skipping and counting it.
        random_crop: random resized crop (40-100 % of the area) of training images; off by default.
        hflip: horizontal flip of half the training images; off by default because a flip
            falsifies captions that name left and right.

    Checkpoints store where each rank's training stream stands after the last trained batch, and
    a run resumed from one continues with exactly the batches an uninterrupted run would train,
    provided the sources, seed, batch geometry, rank count and worker count are unchanged.
    """

    def __init__(
        self,
        train: list[Source],
        val: list[Source] | None = None,
        *,
        tokenizer: str = "byte",
        image_size: int,
        patch_size: int,
        context: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resample: bool = True,
        batches_per_epoch: int | None = None,
        drop_last: bool = False,
        max_image_pixels: int = 64 * 2**20,
        strict: bool = False,
        random_crop: bool = False,
        hflip: bool = False,
    ) -> None:
        super().__init__()
        # NOTE: no save_hyperparameters(): Source objects in a checkpoint would fail the
        # weights_only=True loading that Lightning uses on resume; the CLI saves config.yaml instead.
        self.train_sources = [_as_source(source) for source in train]
        self.val_sources = [_as_source(source) for source in val or []]
        if not self.train_sources:
            raise ValueError("train needs at least one Source")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if batches_per_epoch is not None and (batches_per_epoch < 1 or not resample):
            raise ValueError(
                f"batches_per_epoch={batches_per_epoch} needs resample=True and a value of at least 1: "
                "without resampling an epoch is one pass over the training samples"
            )

        self._tokenizer = load_tokenizer(tokenizer)
        self.image_size = image_size
        self.patch_size = patch_size
        self.context = context
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.batches_per_epoch = batches_per_epoch
        self.drop_last = drop_last
        self.max_image_pixels = max_image_pixels
        self.strict = strict
        self.random_crop = random_crop
        self.hflip = hflip

        self._resolved: dict[str, list[ResolvedSource]] = {}
        # The position after the batch that reached the training step last, and the one to resume from.
        self._trained_position: StreamPosition | None = None
        self._resume_position: StreamPosition | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_streams(self) -> int:
        """Worker streams per rank: 0 and 1 workers both read one stream, the same one."""
        return max(1, self.num_workers)

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard lists of the sources that `stage` needs."""
        if stage in (None, "fit"):
            self._resolve("train")
        if stage in (None, "fit", "validate") and self.val_sources:
            self._resolve("val")

    def train_dataloader(self) -> TrainLoader:
        sources = self._resolve("train")
        rank, world_size = self._rank_and_world_size()
        sync_ranks = not self.resample and world_size > 1
        if sync_ranks and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"resample=False on {world_size} ranks needs torch.distributed to be initialised, because the "
                "ranks agree at every step on whether any of them still has data; run under a Lightning "
                "strategy such as ddp, or set resample=True"
            )
        return TrainLoader(
            RowStream(sources, self._settings(), train=True, resample=self.resample),
            num_workers=self.num_workers,
            rank=rank,
            world_size=world_size,
            batches_per_epoch=self.batches_per_epoch,
            sync_ranks=sync_ranks,
            padding_batch=functools.partial(
                padding_batch, self.batch_size, self.context, self._tokenizer, self.image_size
            ),
            current_epoch=self._current_epoch,
            resume_position=self._resume_position_for,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        # NOTE: ranks may get different numbers of validation batches (each sample is read once), so
        # metrics must be reduced once per epoch and every rank must log the same metric names.
        rank, world_size = self._rank_and_world_size()
        rows = RowStream(self._resolve("val"), self._settings(), train=False, resample=False)
        return DataLoader(
            BatchStream(rows, rank=rank, world_size=world_size, epoch=0),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader | list:
        """The validation sources, read once: `fusionlab test` reports the same per-type losses."""
        return self.val_dataloader()

    # ----------------------------------------------------------------------------------------
    # resume: the position of the batch being trained, gathered from every rank into checkpoints

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for the batch that goes to the training step next, after its
        # fetcher has already pulled the following batch: the right moment to note the position.
        if isinstance(batch, Batch):
            position = StreamPosition.pop_from(batch.stats)
            if position is not None:
                self._trained_position = position
        return batch

    def state_dict(self) -> dict[str, Any]:
        # Lightning calls this on every rank while it builds a checkpoint, then writes only rank
        # 0's checkpoint: the positions of all ranks are gathered into it here.
        # NOTE: the gather is a collective, so every rank must save together, as ModelCheckpoint
        # and Trainer.save_checkpoint do. A checkpoint saved by one rank alone would wait forever.
        position = self._trained_position.as_dict() if self._trained_position is not None else None
        _, world_size = self._rank_and_world_size()
        return {
            "seed": self.seed,
            "world_size": world_size,
            "n_streams": self.n_streams,
            "positions": _gather_objects(position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world_size = self._rank_and_world_size()
        saved = (state.get("world_size"), state.get("n_streams"), state.get("seed"))
        if saved != (world_size, self.n_streams, self.seed):
            log.warning(
                "the checkpoint's data position was saved with %s ranks, %s worker streams per rank and seed %s, "
                "but this run has %d ranks, %d worker streams and seed %d: the training stream restarts at "
                "the beginning of the current epoch instead of where the checkpoint stopped",
                *saved, world_size, self.n_streams, self.seed,
            )
            return
        position = state["positions"][rank]
        self._resume_position = StreamPosition.from_dict(position) if position is not None else None
        self._trained_position = self._resume_position

    def _resume_position_for(self, epoch: int) -> StreamPosition | None:
        position = self._resume_position
        return position if position is not None and position.epoch == epoch else None

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank_info()

    def _settings(self) -> StreamSettings:
        return StreamSettings(
            tokenizer=self._tokenizer,
            image_size=self.image_size,
            tokens_per_image=self.tokens_per_image,
            context=self.context,
            batch_size=self.batch_size,
            max_pixels=self.max_image_pixels,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            strict=self.strict,
            random_crop=self.random_crop,
            hflip=self.hflip,
            drop_last=self.drop_last,
        )

    def _resolve(self, role: str) -> list[ResolvedSource]:
        if role not in self._resolved:
            sources = self.train_sources if role == "train" else self.val_sources
            self._resolved[role] = _resolve_sources(sources, role)
        return self._resolved[role]


def _gather_objects(value: Any) -> list[Any]:
    """Return [value of rank 0, value of rank 1, ...], gathered from every rank when several run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _as_source(source: Source | dict) -> Source:
    return source if isinstance(source, Source) else Source(**source)


def _resolve_sources(sources: list[Source], role: str) -> list[ResolvedSource]:
    """Expand each source's shards, leaving out (with one warning each) sources that contain no sample."""
    resolved = []
    for source in sources:
        shards = expand_shards(source.urls)
        if not _has_samples(shards):
            log.warning(
                "%s source %r (%s) has no sample in its %d shard(s): it is left out and the weights of the "
                "other sources are renormalised",
                role, source.urls, source.type, len(shards),
            )
            continue
        resolved.append(ResolvedSource(source.urls, source.type, source.weight, shards))
    if not resolved:
        raise ValueError(f"every {role} source is empty: {[source.urls for source in sources]}; check the shards")
    total = sum(source.weight for source in resolved)
    described = [f"{source.type} {source.urls!r} ({len(source.shards)} shards)" for source in resolved]
    if role == "train":
        described = [f"{text} p={source.weight / total:.3f}" for text, source in zip(described, resolved)]
    log.info("%s sources: %s", role, ", ".join(described))
    return resolved


def _has_samples(shards: list[str]) -> bool:
    # Reads shards in order up to the first sample: one tar header for any non-empty source. Damage
    # is ignored here; it is counted when the shard is read for training.
    samples = tar_samples(shards, handler=lambda error: True)
    try:
        return next(samples, None) is not None
    finally:
        samples.close()
