"""The packed batch that every backbone reads.

A batch contains B rows of T positions. Documents are packed into rows; an image
occupies `tokens_per_image` consecutive positions (one per patch) and is never
split across rows. Per-position tensors:

- tokens [B, T]       text token ids; the tokenizer's image placeholder id at image positions
- image_index [B, T]  index into `images` of the image a position belongs to, -1 for text
- patch_index [B, T]  which patch of that image (0 .. tokens_per_image - 1), -1 for text
- document [B, T]     packed document id within the row (0, 1, ...), -1 for padding
- positions [B, T]    position ids, restarting at 0 for each document
- targets [B, T]      next-token targets, IGNORE_INDEX where no loss is taken
- source [B, T]       data type id (see DATA_TYPES), -1 for padding

`images` is a uint8 tensor [n_images, 3, H, W] holding every image of the batch in
sequence order (row by row); backbones normalise it themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

IGNORE_INDEX = -100
DATA_TYPES = ("caption", "interleaved", "text", "qa")
TENSOR_FIELDS = ("tokens", "images", "image_index", "patch_index", "document", "positions", "targets", "source")


@dataclass
class Batch:
    tokens: Tensor
    images: Tensor
    image_index: Tensor
    patch_index: Tensor
    document: Tensor
    positions: Tensor
    targets: Tensor
    source: Tensor
    # Counters gathered while this batch was built (skipped samples by reason, dropped
    # images); the training module sums and logs them. Plain str -> int.
    stats: dict[str, int] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            **{name: getattr(self, name).to(device, non_blocking=non_blocking) for name in TENSOR_FIELDS},
            stats=dict(self.stats),
        )

    @property
    def image_mask(self) -> Tensor:
        """Boolean [B, T], true at image positions."""
        return self.image_index >= 0

    @property
    def padding_mask(self) -> Tensor:
        """Boolean [B, T], true at padding positions."""
        return self.document < 0

    def with_images(self, images: Tensor) -> Batch:
        """Return a copy that carries other pixels, for example shuffled across samples."""
        return replace(self, images=images)
