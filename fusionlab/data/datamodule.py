"""Sources, mixture weights, splitting across ranks and workers: shards in, packed Batches out.

Training stream, per rank and DataLoader worker (a "reader"):

    per source: shard urls (resampled with replacement, or this reader's share)
        -> raw samples (formats.tar_samples; only allow-listed members are read)
        -> seeded shuffle buffer over raw samples (cheap: bytes, not pixels)
        -> Documents (formats.decode_samples; losses go to one SkipCounter)
    mix the sources: each document comes from source i with probability weight_i / sum(weights)
        -> Packer rows of `context` positions -> DataLoader batches of `batch_size` rows

Batching happens in the DataLoader (collate_fn=packing.collate_rows), so every batch comes from a
single worker and carries that worker's counters in Batch.stats.

Validation reads every validation source once, in order, with no shuffle and no resampling. Each
reader takes every n-th shard when there are at least as many shards as readers, and otherwise
every n-th sample of every shard, so that together the readers see each sample exactly once.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Literal

import lightning as L
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset

from fusionlab.batch import DATA_TYPES
from fusionlab.data.errors import SkipCounter
from fusionlab.data.formats import Document, SampleDecoder, decode_samples, tar_samples
from fusionlab.data.packing import Packer, Row, collate_rows
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
    type: Literal["caption", "interleaved", "text"]
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


@dataclass
class _ResolvedSource:
    urls: str
    type: str
    weight: float
    shards: list[str]


@dataclass
class _Settings:
    tokenizer: Tokenizer
    image_size: int
    tokens_per_image: int
    context: int
    max_pixels: int
    shuffle_buffer: int
    seed: int
    strict: bool
    random_crop: bool
    hflip: bool


def _reader_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) from torch.distributed and the DataLoader worker."""
    return wds.utils.pytorch_worker_info()


def _assign(shards: list[str], reader: int, n_readers: int) -> tuple[list[str], bool]:
    """This reader's shards, and whether it must also keep only every n-th sample of them."""
    if len(shards) >= n_readers:
        return shards[reader::n_readers], False
    return shards, n_readers > 1


class RowStream(IterableDataset):
    """Packed Rows from a list of sources, for one reader (rank x DataLoader worker).

    With `train` the sources are mixed by weight with a seeded RNG and shuffled; with `resample`
    shards are drawn with replacement forever. Without `train` every sample is read once, in order.
    """

    def __init__(self, sources: list[_ResolvedSource], settings: _Settings, *, train: bool, resample: bool) -> None:
        super().__init__()
        self.sources = sources
        self.settings = settings
        self.train = train
        self.resample = resample and train
        self._epoch = 0  # counts __iter__ calls; DataLoader workers must be persistent to carry it
        # TODO(resume): report the position of the batch being trained (per reader: shard draws,
        # samples consumed, shuffle buffer and RNG states) through state_dict/load_state_dict, so that
        # a resumed run sees the same samples in the same order; today a resume restarts the stream.

    def __iter__(self) -> Iterator[Row]:
        rank, world_size, worker, n_workers = _reader_info()
        reader, n_readers = rank * n_workers + worker, world_size * n_workers
        s = self.settings
        epoch = self._epoch
        self._epoch += 1  # a new shuffle and mixture order for each pass over finite sources
        counter = SkipCounter(strict=s.strict)
        streams = [
            self._documents(i, source, reader, n_readers, counter, epoch) for i, source in enumerate(self.sources)
        ]
        if self.train:
            rng = random.Random(f"mix/{s.seed}/{epoch}/{reader}")
            documents = _mix(streams, [source.weight for source in self.sources], rng)
        else:
            documents = chain.from_iterable(streams)

        packer = Packer(s.context, s.tokens_per_image, s.tokenizer, image_size=s.image_size)
        for document in documents:
            packer.add_stats(counter.drain())
            yield from packer.add(document)
        if self.resample:
            raise RuntimeError(
                f"every training source stopped producing usable samples ({[source.urls for source in self.sources]}); "
                "see the warnings above for the reasons they were skipped"
            )
        packer.add_stats(counter.drain())
        yield from packer.flush()

    def _documents(
        self, index: int, source: _ResolvedSource, reader: int, n_readers: int, counter: SkipCounter, epoch: int
    ) -> Iterator[Document]:
        s = self.settings
        rng = random.Random(f"source/{s.seed}/{epoch}/{reader}/{index}")
        augment = self.train and (s.random_crop or s.hflip)
        decoder = SampleDecoder(
            source.type, s.image_size, s.max_pixels,
            random_crop=augment and s.random_crop, hflip=augment and s.hflip, seed=rng.getrandbits(32),
        )
        shards, split_samples = _assign(source.shards, reader, n_readers)
        if not self.resample:
            samples = tar_samples(shards, counter.handler)
            if split_samples:
                samples = islice(samples, reader, None, n_readers)
            yield from decode_samples(self._shuffled(samples, rng), decoder, counter)
            return

        # Resampling: passes of len(shards) draws with replacement. With fewer shards than readers,
        # every reader draws from all of them, each with its own RNG.
        while True:
            draws = [rng.choice(shards) for _ in shards]
            produced = 0
            for document in decode_samples(self._shuffled(tar_samples(draws, counter.handler), rng), decoder, counter):
                produced += 1
                yield document
            if produced == 0:
                log.warning(
                    "source %r (%s) produced no usable sample in %d shard draws: it is left out of the "
                    "mixture from now on and the weights of the other sources are renormalised",
                    source.urls, source.type, len(draws),
                )
                return

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        size = self.settings.shuffle_buffer
        if not self.train or size <= 1:
            return samples
        return wds.filters.shuffle(bufsize=size, initial=size, rng=rng)(samples)


def _mix(streams: list[Iterator[Document]], weights: list[float], rng: random.Random) -> Iterator[Document]:
    """Draw each document from stream i with probability weights[i] / sum of the live streams' weights."""
    live = list(range(len(streams)))
    while live:
        (index,) = rng.choices(live, weights=[weights[i] for i in live])
        try:
            document = next(streams[index])
        except StopIteration:
            live.remove(index)
            continue
        yield document


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
        seed: seed of the shard draws, shuffle buffers and the mixture.
        shuffle_buffer: raw samples held per source for shuffling in training; 0 or 1 turns it off.
        resample: draw training shards with replacement, forever (the epoch length then comes from
            the trainer, for example limit_train_batches); False reads each training sample once per epoch.
        max_image_pixels: largest width * height accepted, checked in the image header before decoding.
        strict: raise on the first bad sample or damaged shard instead of skipping and counting it.
        random_crop: random resized crop (40-100 % of the area) of training images; off by default.
        hflip: horizontal flip of half the training images; off by default because a flip
            falsifies captions that name left and right.
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
        self._tokenizer = load_tokenizer(tokenizer)
        self.image_size = image_size
        self.patch_size = patch_size
        self.context = context
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.max_image_pixels = max_image_pixels
        self.strict = strict
        self.random_crop = random_crop
        self.hflip = hflip
        self._resolved: dict[str, list[_ResolvedSource]] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard lists of the sources that `stage` needs."""
        if stage in (None, "fit"):
            self._resolve("train")
        if stage in (None, "fit", "validate") and self.val_sources:
            self._resolve("val")

    def train_dataloader(self) -> DataLoader:
        sources = self._resolve("train")
        world_size = self.trainer.world_size if self.trainer is not None else _reader_info()[1]
        if not self.resample and world_size > 1:
            raise ValueError(
                f"resample=False with {world_size} ranks: ranks would read different numbers of rows and "
                "the run would hang at the end of an epoch; set resample=True and bound the epoch with "
                "limit_train_batches or max_steps"
            )
        return self._loader(RowStream(sources, self._settings(), train=True, resample=self.resample))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        # NOTE: ranks may get different numbers of validation batches (each sample is read once), so
        # metrics must be reduced once per epoch and every rank must log the same metric names.
        return self._loader(RowStream(self._resolve("val"), self._settings(), train=False, resample=False))

    def _loader(self, dataset: RowStream) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate_rows,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _settings(self) -> _Settings:
        return _Settings(
            tokenizer=self._tokenizer,
            image_size=self.image_size,
            tokens_per_image=self.tokens_per_image,
            context=self.context,
            max_pixels=self.max_image_pixels,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            strict=self.strict,
            random_crop=self.random_crop,
            hflip=self.hflip,
        )

    def _resolve(self, role: str) -> list[_ResolvedSource]:
        if role not in self._resolved:
            sources = self.train_sources if role == "train" else self.val_sources
            self._resolved[role] = _resolve_sources(sources, role)
        return self._resolved[role]


def _as_source(source: Source | dict) -> Source:
    return source if isinstance(source, Source) else Source(**source)


def _resolve_sources(sources: list[Source], role: str) -> list[_ResolvedSource]:
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
        resolved.append(_ResolvedSource(source.urls, source.type, source.weight, shards))
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
