"""Per-reader streams: shards -> documents -> packed rows -> batches, deterministic and skippable.

A reader is one DataLoader worker of one rank; reader = rank * n_workers + worker. Its stream is a
pure function of (seed, epoch, reader), so a resumed run can rebuild it and skip what was trained:

    per source: shard order shuffled by (seed, epoch, source), the same on every reader
        -> this reader's shards: every n-th whole shard, plus every n-th sample of the shards
           left over when the shard count is not a multiple of the reader count (epochs), or
           shards drawn with replacement by (seed, epoch, reader, source) (resampling)
        -> raw samples (formats.tar_samples; only allow-listed members are read)
        -> seeded shuffle buffer over raw samples (cheap: bytes, not pixels)
        -> Documents (formats.decode_samples; losses go to one SkipCounter)
    mix the sources: each document comes from source i with probability weight_i / sum(weights)
        -> Packer rows of `context` positions
        -> batches of `batch_size` rows, collated in the worker, tagged with their position

Without resampling the readers' shares are disjoint and cover every sample once per epoch.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice

import webdataset as wds
from torch import distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from fusionlab.batch import Batch
from fusionlab.data.errors import SkipCounter
from fusionlab.data.formats import Document, SampleDecoder, decode_samples, tar_samples
from fusionlab.data.packing import Packer, Row, collate_rows
from fusionlab.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Batch.stats keys that tag a training batch with the stream it came from (the worker's logical
# stream index) and how many batches that stream has produced so far, this one included.
STREAM_KEY = "position/stream"
STREAM_BATCHES_KEY = "position/stream_batches"


@dataclass
class ResolvedSource:
    urls: str
    type: str
    weight: float
    shards: list[str]


@dataclass
class StreamSettings:
    tokenizer: Tokenizer
    image_size: int
    tokens_per_image: int
    context: int
    batch_size: int
    max_pixels: int
    shuffle_buffer: int
    seed: int
    strict: bool
    random_crop: bool
    hflip: bool
    drop_last: bool = False


def split_shards(shards: list[str], reader: int, n_readers: int) -> tuple[list[str], list[str]]:
    """Return (the whole shards of `reader`, the shards that every reader shares sample by sample).

    Whole shards go round-robin while every reader can get one. The remaining
    len(shards) % n_readers shards are read by every reader, each keeping every n_readers-th
    sample, so that no reader gets a whole shard more than another.
    """
    whole = len(shards) - len(shards) % n_readers
    return shards[reader:whole:n_readers], shards[whole:]


class RowStream:
    """Packed Rows of one reader from a list of sources.

    With `train` the sources are mixed by weight and shuffled with RNGs seeded by (seed, epoch,
    reader); with `resample` shards are drawn with replacement forever. Without `train` every
    sample is read once, in order.
    """

    def __init__(self, sources: list[ResolvedSource], settings: StreamSettings, *, train: bool, resample: bool) -> None:
        self.sources = sources
        self.settings = settings
        self.train = train
        self.resample = resample and train

    def rows(self, reader: int, n_readers: int, epoch: int) -> Iterator[Row]:
        s = self.settings
        counter = SkipCounter(strict=s.strict)
        streams = [
            self._documents(i, source, reader, n_readers, counter, epoch) for i, source in enumerate(self.sources)
        ]
        if self.train:
            rng = random.Random(f"mix/{s.seed}/{epoch}/{reader}")
            documents = mix(streams, [source.weight for source in self.sources], rng)
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
        self, index: int, source: ResolvedSource, reader: int, n_readers: int, counter: SkipCounter, epoch: int
    ) -> Iterator[Document]:
        s = self.settings
        rng = random.Random(f"source/{s.seed}/{epoch}/{reader}/{index}")
        augment = self.train and (s.random_crop or s.hflip)
        decoder = SampleDecoder(
            source.type, s.image_size, s.max_pixels,
            random_crop=augment and s.random_crop, hflip=augment and s.hflip, seed=rng.getrandbits(32),
        )
        if self.resample:
            yield from self._resampled(source, rng, decoder, counter)
            return

        shards = list(source.shards)
        if self.train:
            # The same order on every reader, so that the readers' shares stay disjoint.
            random.Random(f"shards/{s.seed}/{epoch}/{index}").shuffle(shards)
        own, shared = split_shards(shards, reader, n_readers)
        samples = tar_samples(own, counter.handler)
        if shared:
            samples = chain(samples, islice(tar_samples(shared, counter.handler), reader, None, n_readers))
        yield from decode_samples(self._shuffled(samples, rng), decoder, counter)

    def _resampled(
        self, source: ResolvedSource, rng: random.Random, decoder: SampleDecoder, counter: SkipCounter
    ) -> Iterator[Document]:
        # Passes of len(shards) draws with replacement. Each reader draws with its own RNG, so
        # readers need no shard of their own and any shard count works.
        shards = source.shards
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


def mix(streams: list[Iterator[Document]], weights: list[float], rng: random.Random) -> Iterator[Document]:
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


class BatchStream(IterableDataset):
    """Batches of one epoch for every DataLoader worker of one rank, collated in the worker.

    DataLoader worker process p runs logical stream (p + rotation) % n_workers, and stream w skips
    its first `skip[w]` batches. A resumed run uses both to continue exactly where an uninterrupted
    run would be. The DataLoader hands out batches round-robin over its worker processes, so the
    rotation makes the first batch come from the stream after the one of the last trained batch.
    """

    def __init__(
        self,
        rows: RowStream,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        skip: list[int] | None = None,
        rotation: int = 0,
        tag_positions: bool = False,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.skip = skip
        self.rotation = rotation
        self.tag_positions = tag_positions

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        n_workers, process = (info.num_workers, info.id) if info is not None else (1, 0)
        stream = (process + self.rotation) % n_workers
        reader = self.rank * n_workers + stream
        skip = self.skip[stream] if self.skip else 0
        s = self.rows.settings

        rows = self.rows.rows(reader, self.world_size * n_workers, self.epoch)
        for index, chunk in enumerate(_chunks(rows, s.batch_size)):
            if len(chunk) < s.batch_size and s.drop_last:
                return
            if index < skip:
                # Trained before the checkpoint this run resumed from. Their samples were still read
                # and decoded, because whether a sample is usable is known only once decoded.
                # TODO(resume): resuming costs data loading up to one epoch (the whole run when
                # resampling without batches_per_epoch); store per-source reader state to seek instead.
                continue
            batch = collate_rows(chunk)
            if self.tag_positions:
                batch.stats[STREAM_KEY] = stream
                batch.stats[STREAM_BATCHES_KEY] = index + 1
            yield batch


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def rank_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else from RANK and WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
