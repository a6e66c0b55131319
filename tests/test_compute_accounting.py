"""Parameter counts against the paper's published sizes, and the 6ND rule against a FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fusionlab.models import EarlyFusion
from fusionlab.models.late_fusion import LateFusion
from helpers import make_batch

PAPER_VOCAB = 50432

# (d_model, n_heads, head_dim, published parameters)
EARLY_SIZES = [
    (800, 8, 100, 275e6),
    (1088, 17, 64, 464e6),
    (1632, 17, 96, 932e6),
    (2208, 23, 96, 1.63e9),
    (2624, 41, 64, 2.28e9),
    (3232, 101, 32, 3.35e9),
]
# (encoder_width, encoder_heads, d_model, n_heads, head_dim, published parameters)
LATE_SIZES = [
    (384, 6, 768, 12, 64, 289e6),
    (512, 8, 1024, 16, 64, 494e6),
    (768, 12, 1536, 24, 64, 1.0e9),
    (1024, 16, 2048, 32, 64, 1.75e9),
    (1184, 37, 2464, 28, 88, 2.43e9),
    (1536, 24, 3072, 48, 64, 3.71e9),
]


@pytest.mark.parametrize("d_model, n_heads, head_dim, published", EARLY_SIZES)
def test_early_fusion_matches_paper_size(d_model, n_heads, head_dim, published):
    with torch.device("meta"):
        model = EarlyFusion(
            vocab_size=PAPER_VOCAB, image_size=224, patch_size=14,
            d_model=d_model, n_layers=24, n_heads=n_heads, head_dim=head_dim,
        )
    counts = model.parameter_counts()
    assert counts.N_v == 0
    assert abs(counts.N / published - 1) <= 0.02, f"{counts.N / 1e6:.1f}M vs {published / 1e6:.0f}M"


@pytest.mark.parametrize("encoder_width, encoder_heads, d_model, n_heads, head_dim, published", LATE_SIZES)
def test_late_fusion_matches_paper_size(encoder_width, encoder_heads, d_model, n_heads, head_dim, published):
    with torch.device("meta"):
        model = LateFusion(
            vocab_size=PAPER_VOCAB, image_size=224, patch_size=14,
            d_model=d_model, n_layers=24, n_heads=n_heads, head_dim=head_dim,
            encoder_width=encoder_width, encoder_layers=24, encoder_heads=encoder_heads,
        )
    counts = model.parameter_counts()
    assert counts.N_v > 0
    assert counts.active == counts.N + counts.N_v
    assert abs(counts.total / published - 1) <= 0.02, f"{counts.total / 1e6:.1f}M vs {published / 1e6:.0f}M"


def _matmul_flops(model, batch) -> int:
    """Forward plus backward FLOPs of the parameter matmuls (attention scores left out)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).logits.float().pow(2).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))


def test_six_nd_matches_flop_counter_for_text():
    torch.manual_seed(0)
    model = EarlyFusion(image_size=8, patch_size=4, d_model=64, n_layers=2, n_heads=4, ffn_multiple_of=64)
    batch = make_batch([[[("text", 64)]], [[("text", 64)]]], context=64, tokens_per_image=4, image_size=8)
    D = 128
    # The 6ND rule counts the input embedding and the image stem too; a text batch never runs
    # the stem and an embedding lookup is no matmul, so leave both out of this comparison.
    N_matmul = model.parameter_counts().N - model.decoder.embed.weight.numel() - sum(
        p.numel() for p in model.patch_embed.parameters()
    )
    measured = _matmul_flops(model, batch)
    assert abs(measured / (6 * N_matmul * D) - 1) <= 0.10


def test_six_nd_matches_flop_counter_for_vision_encoder():
    torch.manual_seed(0)
    model = LateFusion(
        image_size=32, patch_size=4, d_model=64, n_layers=1, n_heads=4, ffn_multiple_of=64,
        encoder_width=64, encoder_layers=2, encoder_heads=4,
    )
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_images(images).pow(2).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    measured = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "convolution", "convolution_backward"))
    D_v = 4 * model.tokens_per_image
    N_v = model.parameter_counts().N_v
    connector = sum(p.numel() for p in model.connector.parameters())
    expected = 6 * (N_v + connector) * D_v
    assert abs(measured / expected - 1) <= 0.10, f"measured {measured:.3g} vs 6ND {expected:.3g}"


def test_flops_per_step_uses_both_terms():
    model = LateFusion(image_size=16, patch_size=4, d_model=32, n_layers=1, n_heads=2, ffn_multiple_of=32,
                       encoder_width=32, encoder_layers=1, encoder_heads=2)
    counts = model.parameter_counts()
    assert model.flops_per_step(1000, 200) == 6.0 * (counts.N * 1000 + counts.N_v * 200)
