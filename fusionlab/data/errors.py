"""Skip policy for bad data: count each loss by reason, warn at a bounded rate, or raise in strict mode.

A loss is one sample that cannot be used, one image of an interleaved document that is dropped while
the rest of the document is kept, or the unreadable remainder of a damaged shard. Every loss goes
through one `SkipCounter`, which the data pipeline drains into `Batch.stats` as "skipped/<reason>".
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)


class SkipSample(Exception):
    """A sample, or one image of a document, that cannot be used; `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ShardReadError(Exception):
    """A tar shard that failed to open or read; `key` is the sample being read when it failed."""

    def __init__(self, url: str, key: str | None, cause: BaseException) -> None:
        where = f"at sample {key!r}" if key is not None else "before the first sample"
        super().__init__(f"shard {url!r} failed {where}: {type(cause).__name__}: {cause}")
        self.url = url
        self.key = key
        self.cause = cause


class StrictDataError(RuntimeError):
    """Raised in strict mode in place of skipping; the message names the shard, the key and the reason."""


class SkipCounter:
    """Counts losses per reason and logs them, or raises `StrictDataError` when `strict` is set.

    Warnings are rate-limited per reason: the first `warn_first` losses, then every `warn_every`-th.
    `drain()` returns the counts gathered since the previous drain, so that each loss reaches
    exactly one batch.
    """

    def __init__(self, strict: bool = False, warn_first: int = 5, warn_every: int = 100) -> None:
        self.strict = strict
        self.warn_first = warn_first
        self.warn_every = warn_every
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()

    def skip(self, shard: str, key: str | None, error: SkipSample) -> None:
        """Record one loss of `key` in `shard`, or raise in strict mode."""
        if self.strict:
            raise StrictDataError(
                f"shard {shard!r}, sample {key!r}: {error.reason}: {error.detail} "
                "(strict mode raises on bad data; set strict=False to skip and count such samples)"
            ) from error
        self.totals[error.reason] += 1
        self._pending[error.reason] += 1
        count = self.totals[error.reason]
        if count <= self.warn_first or count % self.warn_every == 0:
            log.warning(
                "skipped sample %r in shard %r: %s: %s (%d so far with this reason; "
                "warnings for it are limited to the first %d, then every %d-th)",
                key, shard, error.reason, error.detail, count, self.warn_first, self.warn_every,
            )

    def handler(self, exn: Exception) -> bool:
        """Handle a shard-level error in webdataset's `handler=` convention: True means continue."""
        if not isinstance(exn, ShardReadError):
            return False
        detail = f"{type(exn.cause).__name__}: {exn.cause}; the rest of this shard is lost"
        self.skip(exn.url, exn.key, SkipSample("damaged_shard", detail))
        return True

    def drain(self) -> dict[str, int]:
        """Return the losses counted since the last drain as {"skipped/<reason>": n} and reset them."""
        stats = {f"skipped/{reason}": n for reason, n in self._pending.items()}
        self._pending.clear()
        return stats
