"""The shared backbone test battery, importable by plugin packages for their own tests.

Every architecture, built-in or plugin, must pass `check_backbone(cls)`: it is constructed from
vocab_size, image_size and patch_size alone (its other defaults must describe a small model) and
must map a packed batch to finite logits of the right shape, give every parameter a gradient,
survive a state-dict round trip exactly and accept an image size other than its default.
"""

from __future__ import annotations

import io

import torch

from fusionlab.batch import IGNORE_INDEX, Batch

VOCAB_SIZE = 264
IMAGE_ID = 260


def tiny_batch(tokens_per_image: int, image_size: int, seed: int = 0) -> Batch:
    """Two rows: text, an image, text; then two short documents, the second with two images."""
    g = torch.Generator().manual_seed(seed)
    P = tokens_per_image
    layouts = [[[6, "img", 6]], [[4], [3, "img", 2, "img", 3]]]
    T = max(sum(sum(P if s == "img" else s for s in doc) for doc in row) for row in layouts)
    B = len(layouts)
    tokens = torch.randint(0, 256, (B, T), generator=g)
    image_index = torch.full((B, T), -1)
    patch_index = torch.full((B, T), -1)
    document = torch.full((B, T), -1)
    positions = torch.zeros(B, T, dtype=torch.long)
    source = torch.full((B, T), -1)
    n_images = 0
    for b, row in enumerate(layouts):
        t = 0
        for d, doc in enumerate(row):
            start = t
            for segment in doc:
                if segment == "img":
                    tokens[b, t : t + P] = IMAGE_ID
                    image_index[b, t : t + P] = n_images
                    patch_index[b, t : t + P] = torch.arange(P)
                    n_images += 1
                    t += P
                else:
                    t += segment
            document[b, start:t] = d
            positions[b, start:t] = torch.arange(t - start)
            source[b, start:t] = 1 if "img" in doc else 2
    targets = torch.where((image_index < 0) & (document >= 0), tokens.roll(-1, dims=1), IGNORE_INDEX)
    targets[:, -1] = IGNORE_INDEX
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    return Batch(tokens, images, image_index, patch_index, document, positions, targets, source)


def check_backbone(cls: type, image_size: int = 16, patch_size: int = 4, **kwargs) -> None:
    """Run every check of the battery on `cls`; raise AssertionError naming the failed check."""
    torch.manual_seed(0)
    model = cls(vocab_size=VOCAB_SIZE, image_size=image_size, patch_size=patch_size, **kwargs)
    batch = tiny_batch(model.tokens_per_image, image_size)

    out = model(batch)
    B, T = batch.tokens.shape
    assert out.logits.shape == (B, T, VOCAB_SIZE), f"logits shape {tuple(out.logits.shape)}"
    assert torch.isfinite(out.logits).all(), "non-finite logits"
    assert torch.isfinite(out.aux_loss).all(), "non-finite auxiliary loss"

    # A random weighting of the logits reaches every parameter.
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(1))
    ((out.logits * weights).sum() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing[:5]}"

    _check_round_trip(cls, model, batch, image_size, patch_size, kwargs)

    other_size = image_size + 2 * patch_size
    other = cls(vocab_size=VOCAB_SIZE, image_size=other_size, patch_size=patch_size, **kwargs)
    other_batch = tiny_batch(other.tokens_per_image, other_size)
    assert other.tokens_per_image == (other_size // patch_size) ** 2
    assert torch.isfinite(other(other_batch).logits).all(), f"image size {other_size} failed"

    counts = model.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    assert counts.total == total, f"parameter_counts().total {counts.total} != {total}"
    assert counts.active == counts.N + counts.N_v, "active must equal N + N_v"


def _check_round_trip(cls: type, model, batch: Batch, image_size: int, patch_size: int, kwargs: dict) -> None:
    model.eval()
    with torch.no_grad():
        expected = model(batch).logits
    buffer = io.BytesIO()
    torch.save({"init_args": model.init_arguments(), "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)  # a different initialisation, overwritten by the loaded weights
    restored = cls(**saved["init_args"])
    restored.load_state_dict(saved["state_dict"])
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(batch).logits, expected), "checkpoint round trip changed outputs"
