"""Helpers shared by the benchmarks: matmul peak, synthetic packed batches, timing."""

from __future__ import annotations

import time

import torch

from fusionlab.batch import IGNORE_INDEX, Batch

IMAGE_ID = 260


def matmul_flops_per_sec(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """Measured throughput of one square matmul size, the reference for model FLOP utilisation."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def packed_batch(batch_size: int, context: int, tokens_per_image: int, image_size: int, seed: int = 0) -> Batch:
    """Rows filled with caption-like documents: 1 image then 48 text tokens, packed end to end."""
    g = torch.Generator().manual_seed(seed)
    doc_len = tokens_per_image + 48
    tokens = torch.randint(0, 256, (batch_size, context), generator=g)
    image_index = torch.full((batch_size, context), -1)
    patch_index = torch.full((batch_size, context), -1)
    document = torch.full((batch_size, context), -1)
    positions = torch.zeros(batch_size, context, dtype=torch.long)
    n_images = 0
    for b in range(batch_size):
        for d, start in enumerate(range(0, context - doc_len + 1, doc_len)):
            image = slice(start, start + tokens_per_image)
            tokens[b, image] = IMAGE_ID
            image_index[b, image] = n_images
            patch_index[b, image] = torch.arange(tokens_per_image)
            n_images += 1
            document[b, start : start + doc_len] = d
            positions[b, start : start + doc_len] = torch.arange(doc_len)
    targets = torch.where((image_index < 0) & (document >= 0), tokens.roll(-1, 1), IGNORE_INDEX)
    targets[:, -1] = IGNORE_INDEX
    source = torch.where(document >= 0, 0, -1)
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    return Batch(tokens, images, image_index, patch_index, document, positions, targets, source)


class RepeatedBatches(torch.utils.data.IterableDataset):
    """The same batch forever, so data loading costs nothing in a model benchmark."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch
