"""Cached decoding must reproduce full recomputation, for every built-in backbone."""

from __future__ import annotations

import pytest
import torch

from fusionlab.data.tokenizer import ByteTokenizer
from fusionlab.models import EarlyFusion, LateFusion
from fusionlab.models.generation import (
    CachedStepper,
    FullStepper,
    build_prompts,
    caption_images,
    generate,
    next_token,
)

TINY = dict(image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=2, ffn_multiple_of=32)
BACKBONES = {
    "early": lambda: EarlyFusion(**TINY),
    "early_moe": lambda: EarlyFusion(**TINY, moe={"n_experts": 4, "top_k": 2}),
    "early_moe_modality": lambda: EarlyFusion(**TINY, moe={"n_experts": 4, "routing": "modality"}),
    "late": lambda: LateFusion(**TINY, encoder_width=16, encoder_layers=1, encoder_heads=2),
}


def _backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    backbone = BACKBONES[name]().eval()
    # Wider weights than the training init, so logits differ clearly between tokens and a wrong
    # cache shows up in the argmax too.
    with torch.no_grad():
        for p in backbone.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return backbone


def _prompts(tokenizer, n_images: int = 3):
    images = torch.randint(0, 256, (n_images, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # Different lengths, so rows are left-padded; text before and after an image.
    return [[images[0]], [images[1], "Question: how many digits?"], ["see ", images[2], " now"]]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_cached_greedy_equals_uncached(name):
    tokenizer = ByteTokenizer()
    backbone = _backbone(name)
    prompt = build_prompts(_prompts(tokenizer), tokenizer, backbone.tokens_per_image)

    cached = generate(backbone, prompt, 10, eos_id=tokenizer.eos_id, use_cache=True)
    uncached = generate(backbone, prompt, 10, eos_id=tokenizer.eos_id, use_cache=False)

    assert cached == uncached
    assert sum(len(row) for row in cached) > 0
    assert len({tuple(row) for row in cached}) > 1, "rows with different images gave the same tokens"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_cached_logits_match_forward(name):
    tokenizer = ByteTokenizer()
    backbone = _backbone(name)
    prompt = build_prompts(_prompts(tokenizer), tokenizer, backbone.tokens_per_image)
    cached = CachedStepper(backbone, prompt, max_new_tokens=6)
    full = FullStepper(backbone, prompt, max_new_tokens=6)

    with torch.no_grad():
        torch.testing.assert_close(cached.prefill(), full.prefill(), atol=1e-4, rtol=1e-4)
        forced = torch.randint(0, 256, (6, prompt.tokens.shape[0]), generator=torch.Generator().manual_seed(2))
        for tokens in forced:
            torch.testing.assert_close(cached.step(tokens), full.step(tokens), atol=1e-4, rtol=1e-4)
    assert cached.cache.length == prompt.tokens.shape[1] + 6


def test_sampled_decoding_cached_equals_uncached():
    tokenizer = ByteTokenizer()
    backbone = _backbone("early_moe")
    prompt = build_prompts(_prompts(tokenizer), tokenizer, backbone.tokens_per_image)
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        runs.append(generate(backbone, prompt, 8, eos_id=tokenizer.eos_id, temperature=1.0, top_k=20,
                             generator=generator, use_cache=use_cache))
    assert runs[0] == runs[1]


def test_left_padding_isolated():
    tokenizer = ByteTokenizer()
    backbone = _backbone("early")
    prompts = _prompts(tokenizer)
    alone = generate(backbone, build_prompts(prompts[:1], tokenizer, 16), 8, eos_id=tokenizer.eos_id)
    batched = generate(backbone, build_prompts(prompts, tokenizer, 16), 8, eos_id=tokenizer.eos_id)
    assert alone[0] == batched[0]


def test_flex_prefill_matches_sdpa():
    tokenizer = ByteTokenizer()
    sdpa = _backbone("early")
    flex = EarlyFusion(**TINY, attention="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    prompt = build_prompts(_prompts(tokenizer), tokenizer, sdpa.tokens_per_image)
    expected = generate(sdpa, prompt, 6, eos_id=tokenizer.eos_id, use_cache=False)
    assert generate(flex, prompt, 6, eos_id=tokenizer.eos_id, use_cache=True) == expected


def test_build_prompts_layout():
    tokenizer = ByteTokenizer()
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    batch = build_prompts([[image], ["ab"]], tokenizer, tokens_per_image=4)

    assert batch.tokens.shape == (2, 7)
    expected_row0 = [tokenizer.bos_id, tokenizer.boi_id] + [tokenizer.image_id] * 4 + [tokenizer.eoi_id]
    assert batch.tokens[0].tolist() == expected_row0
    assert batch.tokens[1].tolist() == [tokenizer.pad_id] * 4 + [tokenizer.bos_id, ord("a"), ord("b")]
    assert batch.document[1].tolist() == [-1] * 4 + [0] * 3
    assert batch.positions[1, 4:].tolist() == [0, 1, 2]
    assert batch.image_index[0].tolist() == [-1, -1, 0, 0, 0, 0, -1]
    assert batch.images.shape == (1, 3, 16, 16)


def test_generation_stops_at_eos_and_bans_ids():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert next_token(logits).tolist() == [1]
    tokenizer = ByteTokenizer()
    backbone = _backbone("early")
    captions = caption_images(backbone, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), tokenizer, max_new_tokens=5)
    assert len(captions) == 2
    for caption in captions:
        assert "<|image|>" not in caption
        assert "<|pad|>" not in caption


def test_cache_overflow_raises():
    tokenizer = ByteTokenizer()
    backbone = _backbone("early")
    prompt = build_prompts([["abc"]], tokenizer, 16)
    stepper = CachedStepper(backbone, prompt, max_new_tokens=1)
    with torch.no_grad():
        stepper.prefill()
        stepper.step(torch.tensor([1]))
        with pytest.raises(ValueError, match="KV cache overflow"):
            stepper.step(torch.tensor([1]))
