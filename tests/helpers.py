"""Small hand-built batches for model tests, independent of the data pipeline."""

from __future__ import annotations

import torch

from fusionlab.batch import IGNORE_INDEX, Batch

IMAGE_ID = 260  # any id below vocab_size works for the placeholder in model tests


def make_batch(
    rows: list[list[tuple[str, int]]],
    context: int,
    tokens_per_image: int,
    image_size: int,
    vocab_size: int = 264,
    seed: int = 0,
) -> Batch:
    """Build a Batch from rows of documents.

    Each row is a list of documents; a document is a list of segments ("text", n) for n random
    text tokens or ("image", 1) for one image. Rows are padded to `context`.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(rows)
    tokens = torch.zeros(B, context, dtype=torch.long)
    image_index = torch.full((B, context), -1)
    patch_index = torch.full((B, context), -1)
    document = torch.full((B, context), -1)
    positions = torch.zeros(B, context, dtype=torch.long)
    targets = torch.full((B, context), IGNORE_INDEX)
    source = torch.full((B, context), -1)
    n_images = 0
    for b, row in enumerate(rows):
        t = 0
        for d, doc in enumerate(row):
            start = t
            for kind, n in doc:
                if kind == "text":
                    tokens[b, t : t + n] = torch.randint(0, 256, (n,), generator=g)
                    t += n
                else:
                    tokens[b, t : t + tokens_per_image] = IMAGE_ID
                    image_index[b, t : t + tokens_per_image] = n_images
                    patch_index[b, t : t + tokens_per_image] = torch.arange(tokens_per_image)
                    n_images += 1
                    t += tokens_per_image
            document[b, start:t] = d
            positions[b, start:t] = torch.arange(t - start)
            source[b, start:t] = d % 3
            for i in range(start, t - 1):
                if image_index[b, i] < 0 and image_index[b, i + 1] < 0:
                    targets[b, i] = tokens[b, i + 1]
        assert t <= context, "rows longer than the context"
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    return Batch(tokens, images, image_index, patch_index, document, positions, targets, source)
