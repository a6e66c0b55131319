"""Fixed-length packing of documents into rows, with document and image boundaries kept.

Token layout of a document: `<bos>`, then per segment either the encoded text or
`<boi>`, tokens_per_image x `<image>`, `<eoi>`, then `<eos>`. A text token is one unit and an image
(`<boi>` + patches + `<eoi>`) is one atomic unit: a document longer than the context is cut only
between units, so no row ever contains part of an image. Each piece of a cut document is packed as a
document of its own, with positions restarting at 0.

Targets are the next token of the same document or piece, so `targets[i] == tokens[i + 1]` wherever
a target is set. They are IGNORE_INDEX at image positions, where the next position is an image
position (the step from `<boi>` into the patches), at the last position of a document or piece,
and at padding. In a document with `Answer` segments (question answering), targets are set only
where the next token is part of an answer or is the `<eos>` that follows the last answer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX, Batch
from fusionlab.data.formats import Answer, Document
from fusionlab.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One packed row of `context` positions; `image_index` indexes this row's own `images`."""

    tokens: Tensor  # [T]
    image_index: Tensor  # [T], -1 for text
    patch_index: Tensor  # [T], -1 for text
    document: Tensor  # [T], -1 for padding
    positions: Tensor  # [T]
    targets: Tensor  # [T]
    source: Tensor  # [T], -1 for padding
    images: Tensor  # [n_images, 3, S, S] uint8
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class _Piece:
    """A document, or a piece of one, as flat per-position lists."""

    tokens: list[int]
    image_slot: list[int]  # index into `images`, -1 for text
    patch: list[int]
    targets: list[int]
    images: list[Tensor]
    source: int

    def __len__(self) -> int:
        return len(self.tokens)


class _OpenRow:
    def __init__(self, context: int) -> None:
        self.context = context
        self.columns: dict[str, list[int]] = {name: [] for name in ("tokens", "image_index", "patch_index",
                                                                  "document", "positions", "targets", "source")}
        self.images: list[Tensor] = []
        self.n_documents = 0

    @property
    def free(self) -> int:
        return self.context - len(self.columns["tokens"])

    def add(self, piece: _Piece) -> None:
        c = self.columns
        c["tokens"] += piece.tokens
        c["image_index"] += [slot + len(self.images) if slot >= 0 else -1 for slot in piece.image_slot]
        c["patch_index"] += piece.patch
        c["document"] += [self.n_documents] * len(piece)
        c["positions"] += range(len(piece))
        c["targets"] += piece.targets
        c["source"] += [piece.source] * len(piece)
        self.images += piece.images
        self.n_documents += 1


class Packer:
    """Pack Documents into Rows of exactly `context` positions.

    Placement is greedy first-fit over `open_rows` open rows, in document order: a piece goes into
    the first open row with room for it, otherwise into a new row. When all open rows are taken, the
    fullest is emitted first. Rows are emitted as soon as they are full, and `flush` emits the rest.
    Every emitted row carries stats: "positions", "padding", "documents", "images", the
    non-padding positions per data type ("tokens/caption", "tokens/interleaved", ...) and
    the image positions ("tokens/image") where non-zero, plus "images_dropped" and any counts given
    to `add_stats` since the previous row.
    """

    def __init__(
        self,
        context: int,
        tokens_per_image: int,
        tokenizer: Tokenizer,
        *,
        open_rows: int = 4,
        image_size: int | None = None,
    ) -> None:
        if context < 2:
            raise ValueError(f"context={context} is too short: a document needs at least <bos> and <eos>")
        if open_rows < 1:
            raise ValueError(f"open_rows={open_rows} must be at least 1")
        self.context = context
        self.tokens_per_image = tokens_per_image
        self.tokenizer = tokenizer
        self.open_rows = open_rows
        self.image_size = image_size
        self._open: list[_OpenRow] = []
        self._pending: Counter[str] = Counter()
        if tokens_per_image + 2 > context:
            log.warning(
                "an image takes %d positions (<boi> + %d patches + <eoi>) but context=%d: every image "
                "will be dropped; raise the context or the patch size",
                tokens_per_image + 2, tokens_per_image, context,
            )

    def add_stats(self, stats: dict[str, int]) -> None:
        """Add counts (for example skipped samples) to the stats of the next emitted row."""
        self._pending.update(stats)

    def add(self, document: Document) -> list[Row]:
        """Pack one document and return the rows that this filled."""
        emitted: list[Row] = []
        for piece in self._split(self._layout(document)):
            emitted += self._place(piece)
        return emitted

    def flush(self) -> list[Row]:
        """Emit every open row, padded."""
        rows = [self._finish(row) for row in self._open]
        self._open = []
        return rows

    def pack(self, documents: Iterable[Document]) -> Iterator[Row]:
        """Pack a stream of documents, flushing at its end."""
        for document in documents:
            yield from self.add(document)
        yield from self.flush()

    def _layout(self, document: Document) -> tuple[_Piece, list[bool]]:
        """Lay out a whole document; returns it with the positions before which a cut is allowed."""
        tok = self.tokenizer
        tokens, slots, patches, cuts = [tok.bos_id], [-1], [-1], [True]
        # learned[i]: whether token i may be a target. A document with answers learns only the answers
        # and the closing <eos>, so fine-tuning teaches answering, not asking.
        answer_only = any(isinstance(segment, Answer) for segment in document.segments)
        learned = [not answer_only]
        images: list[Tensor] = []
        image_length = self.tokens_per_image + 2
        for segment in document.segments:
            if isinstance(segment, (str, Answer)):
                ids = tok.encode(segment if isinstance(segment, str) else segment.text)
                tokens += ids
                slots += [-1] * len(ids)
                patches += [-1] * len(ids)
                cuts += [True] * len(ids)
                learned += [isinstance(segment, Answer) or not answer_only] * len(ids)
            elif image_length > self.context:
                self._pending["images_dropped"] += 1
            else:
                tokens += [tok.boi_id] + [tok.image_id] * self.tokens_per_image + [tok.eoi_id]
                slots += [-1] + [len(images)] * self.tokens_per_image + [-1]
                patches += [-1, *range(self.tokens_per_image), -1]
                cuts += [True] + [False] * (image_length - 1)
                learned += [not answer_only] * image_length  # <boi> is a target of plain documents
                images.append(segment)
        tokens.append(tok.eos_id)
        slots.append(-1)
        patches.append(-1)
        cuts.append(True)
        learned.append(not answer_only or isinstance(document.segments[-1], Answer))

        targets = [IGNORE_INDEX] * len(tokens)
        for i in range(len(tokens) - 1):
            if slots[i] < 0 and slots[i + 1] < 0 and learned[i + 1]:
                targets[i] = tokens[i + 1]
        source = DATA_TYPES.index(document.data_type)
        return _Piece(tokens, slots, patches, targets, images, source), cuts

    def _split(self, laid_out: tuple[_Piece, list[bool]]) -> list[_Piece]:
        whole, cuts = laid_out
        if len(whole) <= self.context:
            return [whole]
        pieces = []
        start = 0
        while start < len(whole):
            end = min(start + self.context, len(whole))
            while end < len(whole) and not cuts[end]:
                end -= 1  # back off to the start of the image that would be cut
            pieces.append(_slice(whole, start, end))
            start = end
        return pieces

    def _place(self, piece: _Piece) -> list[Row]:
        emitted: list[Row] = []
        target = next((row for row in self._open if row.free >= len(piece)), None)
        if target is None:
            if len(self._open) == self.open_rows:
                fullest = min(self._open, key=lambda row: row.free)
                self._open.remove(fullest)
                emitted.append(self._finish(fullest))
            target = _OpenRow(self.context)
            self._open.append(target)
        target.add(piece)
        if target.free == 0:
            self._open.remove(target)
            emitted.append(self._finish(target))
        return emitted

    def _finish(self, row: _OpenRow) -> Row:
        padding = row.free
        pad_values = {"tokens": self.tokenizer.pad_id, "positions": 0, "targets": IGNORE_INDEX}
        tensors = {
            name: torch.tensor(values + [pad_values.get(name, -1)] * padding, dtype=torch.long)
            for name, values in row.columns.items()
        }
        if row.images:
            images = torch.stack(row.images)
        else:
            size = self.image_size or 0
            images = torch.zeros(0, 3, size, size, dtype=torch.uint8)
        stats = Counter(positions=self.context, padding=padding, documents=row.n_documents, images=len(row.images))
        stats.update(_token_counts(tensors["source"], tensors["image_index"]))
        stats.update(self._pending)
        self._pending.clear()
        return Row(**tensors, images=images, stats=dict(stats))


def _token_counts(source: Tensor, image_index: Tensor) -> dict[str, int]:
    """Non-padding positions per data type ("tokens/caption", ...) and image positions ("tokens/image")."""
    counts = {f"tokens/{name}": int((source == i).sum()) for i, name in enumerate(DATA_TYPES)}
    counts["tokens/image"] = int((image_index >= 0).sum())
    return {key: n for key, n in counts.items() if n}


def padding_batch(batch_size: int, context: int, tokenizer: Tokenizer, image_size: int) -> Batch:
    """Build a batch of `batch_size` padding rows: no document, no image, no target, so no loss."""
    shape = (batch_size, context)
    return Batch(
        tokens=torch.full(shape, tokenizer.pad_id, dtype=torch.long),
        images=torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8),
        image_index=torch.full(shape, -1, dtype=torch.long),
        patch_index=torch.full(shape, -1, dtype=torch.long),
        document=torch.full(shape, -1, dtype=torch.long),
        positions=torch.zeros(shape, dtype=torch.long),
        targets=torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        source=torch.full(shape, -1, dtype=torch.long),
        stats={"positions": batch_size * context, "padding": batch_size * context, "padding_batches": 1},
    )


def _slice(piece: _Piece, start: int, end: int) -> _Piece:
    slots = piece.image_slot[start:end]
    used = [slot for slot in slots if slot >= 0]
    first = used[0] if used else 0
    return _Piece(
        tokens=piece.tokens[start:end],
        image_slot=[slot - first if slot >= 0 else -1 for slot in slots],
        patch=piece.patch[start:end],
        targets=piece.targets[start : end - 1] + [IGNORE_INDEX],  # the next token is in the next piece
        images=piece.images[first : used[-1] + 1] if used else [],
        source=piece.source,
    )


def collate_rows(rows: list[Row]) -> Batch:
    """Stack rows into a Batch: images concatenated in row order, image_index re-based to match."""
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    image_index = []
    offset = 0
    for row in rows:
        image_index.append(torch.where(row.image_index >= 0, row.image_index + offset, row.image_index))
        offset += row.images.shape[0]
    with_images = [row.images for row in rows if row.images.shape[0] > 0]
    images = torch.cat(with_images) if with_images else rows[0].images
    stats: Counter[str] = Counter()
    for row in rows:
        stats.update(row.stats)
    return Batch(
        tokens=torch.stack([row.tokens for row in rows]),
        images=images,
        image_index=torch.stack(image_index),
        patch_index=torch.stack([row.patch_index for row in rows]),
        document=torch.stack([row.document for row in rows]),
        positions=torch.stack([row.positions for row in rows]),
        targets=torch.stack([row.targets for row in rows]),
        source=torch.stack([row.source for row in rows]),
        stats=dict(stats),
    )
