"""Downstream scores of a backbone on held-out caption samples, and the callback that logs them.

Scores: "cider" (CIDEr-D of greedy captions against the reference caption), "digit_accuracy"
(captions whose digits and cells match the scene exactly) and "qa_accuracy" (exact-match answers
to the scene question set, also per question kind). The last two need the samples' scenes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from fusionlab.data.tokenizer import Tokenizer, load_tokenizer
from fusionlab.evaluation.cider import cider_d
from fusionlab.evaluation.samples import ImageSample, batched, read_caption_shards
from fusionlab.evaluation.scene_tasks import build_qa_set, digit_accuracy, qa_accuracy, qa_prompt
from fusionlab.models.base import Backbone
from fusionlab.models.generation import caption_images, complete

log = logging.getLogger(__name__)


def caption_samples(
    backbone: Backbone, samples: list[ImageSample], tokenizer: Tokenizer, max_new_tokens: int, batch_size: int
) -> list[str]:
    device = next(backbone.parameters()).device
    captions = []
    for chunk in batched(samples, batch_size):
        images = torch.stack([sample.image for sample in chunk]).to(device)
        captions += caption_images(backbone, images, tokenizer, max_new_tokens)
    return captions


def answer_questions(
    backbone: Backbone, samples: list[ImageSample], tokenizer: Tokenizer, batch_size: int, seed: int = 0,
    max_new_tokens: int = 8,
):
    """Build the question set of the samples' scenes and answer it greedily. Return questions and answers."""
    images = {sample.key: sample.image for sample in samples}
    questions = build_qa_set({sample.key: sample.scene for sample in samples}, seed)
    answers = []
    for chunk in batched(questions, batch_size):
        prompts = [[images[q.key], qa_prompt(q.question)] for q in chunk]
        answers += complete(backbone, prompts, tokenizer, max_new_tokens)
    return questions, answers


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    samples: list[ImageSample],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    qa: bool = True,
) -> dict[str, float]:
    """Caption the samples and answer their scene questions; return the scores (see the module doc)."""
    if not samples:
        raise ValueError("evaluate needs at least one sample")
    was_training = backbone.training
    backbone.eval()
    try:
        captions = caption_samples(backbone, samples, tokenizer, max_new_tokens, batch_size)
        references = {s.key: [s.reference] for s in samples if s.reference}
        scores: dict[str, float] = {}
        if len(references) == len(samples):
            scores["cider"], _ = cider_d({s.key: c for s, c in zip(samples, captions)}, references)
        with_scene = [(s, c) for s, c in zip(samples, captions) if s.scene is not None]
        if with_scene:
            scores["digit_accuracy"] = digit_accuracy([c for _, c in with_scene], [s.scene for s, _ in with_scene])
            if qa:
                questions, answers = answer_questions(backbone, [s for s, _ in with_scene], tokenizer, batch_size)
                for kind, value in qa_accuracy(answers, questions).items():
                    scores["qa_accuracy" if kind == "all" else f"qa_accuracy/{kind}"] = value
    finally:
        backbone.train(was_training)
    return scores


class DownstreamEvaluation(L.Callback):
    """Score the model on caption shards at the end of each validation epoch (rank 0 only).

    Logs "downstream/<score>" to the trainer's loggers and puts the last scores under
    "downstream" in summary.json.

    Args:
        shards: caption shards with references (and scenes, for digit accuracy and questions).
        tokenizer: a tokenizer spec ("byte" or a tokenizers .json file); by default the data
            module's tokenizer.
        limit: evaluate the first `limit` samples only; generation is the slow part.
        max_new_tokens: caption length at most, in tokens. With the byte tokenizer a token is a
            character, and the sample set's captions reach about 130 characters.
        batch_size: prompts decoded together.
        qa: also answer the scene questions (useful after question-answering fine-tuning).
    """

    def __init__(
        self,
        shards: str,
        tokenizer: str | None = None,
        limit: int | None = 64,
        max_new_tokens: int = 128,
        batch_size: int = 16,
        qa: bool = True,
    ):
        self.shards = shards
        self.tokenizer = tokenizer
        self.limit = limit
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.qa = qa
        self.scores: dict[str, float] = {}
        self._samples: list[ImageSample] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        backbone = pl_module.backbone
        if self._samples is None:
            image_size = backbone.init_arguments().get("image_size")
            if image_size is None:
                raise ValueError(f"{type(backbone).__name__} records no image_size, so shards cannot be resized for it")
            self._samples = read_caption_shards(self.shards, int(image_size), self.limit)
        start = time.perf_counter()
        if self.tokenizer is not None:
            tokenizer = load_tokenizer(self.tokenizer)
        elif getattr(trainer, "datamodule", None) is not None and hasattr(trainer.datamodule, "tokenizer"):
            tokenizer = trainer.datamodule.tokenizer
        else:
            raise ValueError("DownstreamEvaluation needs a tokenizer: set its tokenizer argument or train with FusionDataModule")
        self.scores = evaluate(
            backbone, self._samples, tokenizer,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, qa=self.qa,
        )
        log.info("downstream scores on %d samples in %.1f s: %s", len(self._samples),
                 time.perf_counter() - start, self.scores)
        for logger in trainer.loggers:
            logger.log_metrics({f"downstream/{k}": v for k, v in self.scores.items()}, step=trainer.global_step)

    def summary_section(self) -> dict[str, Any]:
        return {"downstream": dict(self.scores)} if self.scores else {}
