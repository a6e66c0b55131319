"""Supervised fine-tuning on the scene question set, with the loss on answer tokens only.

A question-answering example is laid out as `<bos> <boi> image <eoi> " Question: ... Answer:"
" <answer>" <eos>`, one example per row, right-padded. Targets are set only where the next token is
an answer token or the closing `<eos>`, so the model learns to answer and not to ask.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionlab.batch import DATA_TYPES, IGNORE_INDEX, Batch
from fusionlab.data.tokenizer import Tokenizer
from fusionlab.evaluation.samples import ImageSample
from fusionlab.evaluation.scene_tasks import Question, build_qa_set, qa_prompt
from fusionlab.models.base import Backbone

log = logging.getLogger(__name__)


def qa_batch(
    questions: Sequence[Question], images: dict[str, Tensor], tokenizer: Tokenizer, tokens_per_image: int
) -> Batch:
    """Lay out question-answer examples as a right-padded Batch with targets on the answers only."""
    rows = []
    for q in questions:
        prompt = [tokenizer.bos_id, tokenizer.boi_id] + [tokenizer.image_id] * tokens_per_image + [tokenizer.eoi_id]
        prompt += tokenizer.encode(qa_prompt(q.question))
        answer = tokenizer.encode(" " + q.answer) + [tokenizer.eos_id]
        rows.append((prompt, answer, images[q.key]))

    T = max(len(prompt) + len(answer) for prompt, answer, _ in rows)
    B = len(rows)
    full = lambda value: torch.full((B, T), value, dtype=torch.long)  # noqa: E731
    batch = Batch(
        tokens=full(tokenizer.pad_id), images=torch.stack([image for _, _, image in rows]),
        image_index=full(-1), patch_index=full(-1), document=full(-1), positions=full(0),
        targets=full(IGNORE_INDEX), source=full(-1),
    )
    source = DATA_TYPES.index("caption")
    for b, (prompt, answer, _) in enumerate(rows):
        ids = prompt + answer
        n = len(ids)
        batch.tokens[b, :n] = torch.tensor(ids)
        batch.image_index[b, 2 : 2 + tokens_per_image] = b
        batch.patch_index[b, 2 : 2 + tokens_per_image] = torch.arange(tokens_per_image)
        batch.document[b, :n] = 0
        batch.positions[b, :n] = torch.arange(n)
        batch.source[b, :n] = source
        # position i predicts token i + 1: the answer tokens and <eos> follow positions len(prompt) - 1 ...
        batch.targets[b, len(prompt) - 1 : n - 1] = torch.tensor(answer)
    return batch


def finetune_qa(
    backbone: Backbone,
    samples: list[ImageSample],
    tokenizer: Tokenizer,
    *,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Fine-tune the backbone in place on the question set of the samples' scenes; return the step losses.

    AdamW at a constant learning rate, each batch drawn at random from the question set.
    """
    with_scene = [s for s in samples if s.scene is not None]
    if not with_scene:
        raise ValueError("finetune_qa needs samples with scenes (caption shards of `fusionlab data sample`)")
    questions = build_qa_set({s.key: s.scene for s in with_scene}, seed)
    images = {s.key: s.image for s in with_scene}
    device = next(backbone.parameters()).device
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    losses = []
    backbone.train()
    for _ in range(steps):
        batch = qa_batch(rng.sample(questions, min(batch_size, len(questions))), images, tokenizer,
                         backbone.tokens_per_image).to(device)
        output = backbone(batch)
        loss = F.cross_entropy(output.logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        loss = loss + output.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    backbone.eval()
    log.info("fine-tuned %d steps on %d questions: loss %.3f -> %.3f", steps, len(questions), losses[0], losses[-1])
    return losses
