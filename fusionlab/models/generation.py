"""Autoregressive decoding for every built-in backbone: greedy or sampled, with a key/value cache.

A prompt is laid out as the packer lays out a document (`<bos>`, then text ids or `<boi>`,
tokens_per_image x `<image>`, `<eoi>`) but without `<eos>`. Prompts of different lengths are
left-padded into one Batch, so every row's next position is the last column. Images are embedded
(early fusion: patch projection, late fusion: vision encoder) once, in the prefill, and each
decoding step then runs the decoder on one new position per row against the cached keys and values.

`use_cache=False` recomputes the whole sequence with `backbone(batch)` at each step. It works for
any Backbone (plugins too) and is the reference that the cached path must match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX, Batch
from fusionlab.models.base import Backbone, attention_mask, layer_context
from fusionlab.models.layers import LayerContext

if TYPE_CHECKING:
    from fusionlab.data.tokenizer import Tokenizer

Segment = str | Tensor  # text, or a uint8 image [3, S, S]


def build_prompts(
    prompts: Sequence[Sequence[Segment]],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    data_type: str = "caption",
) -> Batch:
    """Lay out prompts (lists of text and uint8 image segments) as one left-padded Batch.

    Each row is `<bos>` followed by its segments. Padding comes first, with document -1, so every
    row ends at the last column and its next token goes to the same column in every row.
    """
    if not prompts:
        raise ValueError("build_prompts needs at least one prompt")
    rows, images = [], []
    for prompt in prompts:
        tokens, image_index, patch_index = [tokenizer.bos_id], [-1], [-1]
        for segment in prompt:
            if isinstance(segment, str):
                ids = tokenizer.encode(segment)
                tokens += ids
                image_index += [-1] * len(ids)
                patch_index += [-1] * len(ids)
                continue
            if segment.dtype != torch.uint8 or segment.dim() != 3:
                raise ValueError(
                    f"image segments must be uint8 tensors [3, S, S], got {segment.dtype} of shape "
                    f"{tuple(segment.shape)}"
                )
            tokens += [tokenizer.boi_id] + [tokenizer.image_id] * tokens_per_image + [tokenizer.eoi_id]
            image_index += [-1] + [len(images)] * tokens_per_image + [-1]
            patch_index += [-1, *range(tokens_per_image), -1]
            images.append(segment)
        rows.append((tokens, image_index, patch_index))

    T = max(len(tokens) for tokens, _, _ in rows)
    B = len(rows)
    batch = _padding_rows(B, T, tokenizer.pad_id)
    source_id = DATA_TYPES.index(data_type)
    for b, (tokens, image_index, patch_index) in enumerate(rows):
        start = T - len(tokens)
        batch.tokens[b, start:] = torch.tensor(tokens)
        batch.image_index[b, start:] = torch.tensor(image_index)
        batch.patch_index[b, start:] = torch.tensor(patch_index)
        batch.document[b, start:] = 0
        batch.positions[b, start:] = torch.arange(len(tokens))
        batch.source[b, start:] = source_id
    if images:
        batch.images = torch.stack(images)
    return batch


def _padding_rows(B: int, T: int, pad_id: int) -> Batch:
    full = lambda value: torch.full((B, T), value, dtype=torch.long)  # noqa: E731
    return Batch(
        tokens=full(pad_id),
        images=torch.zeros(0, 3, 0, 0, dtype=torch.uint8),
        image_index=full(-1),
        patch_index=full(-1),
        document=full(-1),
        positions=full(0),
        targets=full(IGNORE_INDEX),
        source=full(-1),
    )


def supports_cache(backbone: Backbone) -> bool:
    """True when the backbone has the `embed(batch)` and `decoder` that cached decoding uses."""
    return callable(getattr(backbone, "embed", None)) and hasattr(getattr(backbone, "decoder", None), "new_cache")


class CachedStepper:
    """Prefill a prompt once, then compute next-token logits one position at a time from a KV cache."""

    def __init__(self, backbone: Backbone, prompt: Batch, max_new_tokens: int):
        if not supports_cache(backbone):
            raise TypeError(
                f"{type(backbone).__name__} has no embed(batch) method and Decoder, which KV-cached "
                "decoding needs: decode with use_cache=False"
            )
        self.backbone = backbone
        self.prompt = prompt
        B, T = prompt.tokens.shape
        self.cache = backbone.decoder.new_cache(B, T + max_new_tokens)
        # Key columns that are real positions: the prompt's non-padding ones, then every new token.
        self.valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=prompt.tokens.device)
        self.valid[:, :T] = ~prompt.padding_mask
        self.next_position = prompt.positions[:, -1] + 1  # (B,)

    def prefill(self) -> Tensor:
        """Run the decoder over the whole prompt, filling the cache. Return the last logits (B, V)."""
        prompt, backbone = self.prompt, self.backbone
        x = backbone.embed(prompt)
        mask = attention_mask(prompt, getattr(backbone, "attention", "auto"))
        hidden = backbone.decoder(x, prompt.positions, mask, layer_context(prompt), self.cache)
        return backbone.decoder.head(hidden[:, -1])

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row (B,) and return the logits (B, V) for the position after it."""
        decoder = self.backbone.decoder
        B = tokens.shape[0]
        x = decoder.embed(tokens[:, None])  # (B, 1, D)
        # NOTE: decoding steps use the dense SDPA mask even for attention "flex": a one-query step
        # gains nothing from a block mask.
        mask = self.valid[:, None, None, : self.cache.length + 1]  # (B, 1, 1, cached + 1)
        no_image = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        context = LayerContext(image_mask=no_image, valid_mask=~no_image)
        hidden = decoder(x, self.next_position[:, None], mask, context, self.cache)
        self.next_position = self.next_position + 1
        return decoder.head(hidden[:, -1])


class FullStepper:
    """Recompute the whole sequence with `backbone(batch)` at every step (no cache)."""

    def __init__(self, backbone: Backbone, prompt: Batch, max_new_tokens: int):
        self.backbone = backbone
        self.batch = prompt

    def prefill(self) -> Tensor:
        return self.backbone(self.batch).logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        b = self.batch
        column = lambda value: torch.full_like(tokens, value)[:, None]  # noqa: E731
        self.batch = Batch(
            tokens=torch.cat([b.tokens, tokens[:, None]], 1),
            images=b.images,
            image_index=torch.cat([b.image_index, column(-1)], 1),
            patch_index=torch.cat([b.patch_index, column(-1)], 1),
            document=torch.cat([b.document, b.document[:, -1:]], 1),
            positions=torch.cat([b.positions, b.positions[:, -1:] + 1], 1),
            targets=torch.cat([b.targets, column(IGNORE_INDEX)], 1),
            source=torch.cat([b.source, b.source[:, -1:]], 1),
        )
        return self.backbone(self.batch).logits[:, -1]


def next_token(
    logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Pick one token per row from logits (B, V): argmax at temperature 0, else a softmax sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompt: Batch,
    max_new_tokens: int,
    *,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt row until `eos_id` or `max_new_tokens`; return the new ids per row, without eos.

    Args:
        backbone: a backbone in eval mode, on the prompt's device.
        prompt: a left-padded Batch, as `build_prompts` makes.
        max_new_tokens: generated tokens per row at most.
        eos_id: the token that ends a row.
        temperature: 0 for greedy decoding, else the softmax temperature of sampling.
        top_k: sample among the k most likely tokens only (temperature > 0).
        banned_ids: ids never generated, for example the image placeholder and padding.
        generator: random generator of sampling, for reproducible samples.
        use_cache: decode from a KV cache (built-in backbones), or recompute every step.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stepper_cls = CachedStepper if use_cache else FullStepper
    stepper = stepper_cls(backbone, prompt, max_new_tokens)
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=prompt.tokens.device)

    B = prompt.tokens.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.tokens.device)
    generated = []
    logits = stepper.prefill()
    for step in range(max_new_tokens):
        if banned.numel():
            logits = logits.index_fill(-1, banned, float("-inf"))
        token = next_token(logits, temperature, top_k, generator)
        token = torch.where(finished, eos_id, token)
        generated.append(token)
        finished |= token == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = stepper.step(token)

    ids = torch.stack(generated, dim=1).tolist()  # (B, steps)
    return [row[: row.index(eos_id)] if eos_id in row else row for row in ids]


def complete(
    backbone: Backbone,
    prompts: Sequence[Sequence[Segment]],
    tokenizer: Tokenizer,
    max_new_tokens: int = 64,
    **options,
) -> list[str]:
    """Generate and decode a text continuation of each prompt (lists of text and image segments).

    `options` go to `generate` (temperature, top_k, generator, use_cache). The special ids other
    than eos are banned, so outputs are plain text.
    """
    device = next(backbone.parameters()).device
    batch = build_prompts(prompts, tokenizer, backbone.tokens_per_image).to(device)
    banned = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id, tokenizer.boi_id, tokenizer.eoi_id)
    ids = generate(backbone, batch, max_new_tokens, eos_id=tokenizer.eos_id, banned_ids=banned, **options)
    return [tokenizer.decode(row) for row in ids]


def caption_images(
    backbone: Backbone, images: Tensor, tokenizer: Tokenizer, max_new_tokens: int = 64, **options
) -> list[str]:
    """Caption uint8 images (n, 3, S, S): prompt `<bos> <boi> image <eoi>`, as caption samples start."""
    return complete(backbone, [[image] for image in images], tokenizer, max_new_tokens, **options)
