"""CIDEr-D against hand-computed values, scene digit parsing, the question set and evaluate()."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fusionlab.data.tokenizer import ByteTokenizer
from fusionlab.evaluation.cider import cider_d, tokenize
from fusionlab.evaluation.evaluate import evaluate
from fusionlab.evaluation.samples import ImageSample, read_caption_shards
from fusionlab.evaluation.scene_tasks import (
    build_qa_set,
    caption_digits,
    digit_accuracy,
    normalize_answer,
    qa_accuracy,
    scene_digits,
    scene_questions,
)
from fusionlab.models import EarlyFusion

LOG2 = math.log(2.0)


def test_cider_perfect_and_partial_by_hand():
    # Two images sharing no word, so every n-gram has df 1 and weight log(2) - log(1).
    score, per_image = cider_d({"a": "x", "b": "c d"}, {"a": ["x y"], "b": ["c d"]})

    # a: unigram cosine log2^2 / (log2 * sqrt(2) log2) = 1/sqrt(2); no bigram in the candidate;
    # length penalty exp(-(1 - 2)^2 / 72); mean over 4 orders, times 10.
    expected_a = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    # b: unigram and bigram cosines 1, trigrams and 4-grams empty.
    expected_b = 10 * 2 / 4
    assert per_image["a"] == pytest.approx(expected_a)
    assert per_image["b"] == pytest.approx(expected_b)
    assert score == pytest.approx((expected_a + expected_b) / 2)


def test_cider_clips_repeated_words():
    _, per_image = cider_d({"a": "x x", "b": "q"}, {"a": ["x y"], "b": ["q"]})
    # candidate vector 2 log2, reference log2 per word: min(2 log2, log2) log2 / (2 log2 * sqrt(2) log2)
    unigram = 1 / (2 * math.sqrt(2))
    # bigram ("x", "x") is not in the reference: 0. Both sentences have 2 words: no length penalty.
    assert per_image["a"] == pytest.approx(10 * unigram / 4)


def test_cider_shared_ngrams_weigh_zero_and_refs_average():
    # "the" occurs in both images' references: df 2, weight log2 - log2 = 0.
    _, per_image = cider_d({"a": "the", "b": "the"}, {"a": ["the"], "b": ["the"]})
    assert per_image == {"a": 0.0, "b": 0.0}
    # Two references: the score is the mean of the per-reference scores (one perfect, one 0).
    _, per_image = cider_d({"a": "x", "b": "z"}, {"a": ["x", "y"], "b": ["z"]})
    assert per_image["a"] == pytest.approx(10 * (1 / 4 + 0) / 2)


def test_cider_tokenizer_and_errors():
    assert tokenize("A 7, in the Top-left.") == ["a", "7", "in", "the", "top", "left"]
    with pytest.raises(ValueError, match="same image ids"):
        cider_d({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="no reference"):
        cider_d({"a": "x"}, {"a": []})


SCENE = {"grid": 2, "image_size": 32, "digits": [
    {"digit": 7, "row": 0, "col": 0}, {"digit": 3, "row": 1, "col": 1},
]}


def test_caption_digits_parses_phrasings():
    assert caption_digits("A 7 in the top left and a 3 in the bottom right.") == {(7, "top left"), (3, "bottom right")}
    assert caption_digits("Two digits: a large red seven in the top left.") == {(7, "top left")}
    assert caption_digits("a 3 and a 5 in the top left") == {(5, "top left")}
    assert caption_digits("a blue 4 (small) in the center") == {(4, "center")}
    assert caption_digits("the 7 is left of the 3.") == set()


def test_digit_accuracy_exact_match():
    assert scene_digits(SCENE) == {(7, "top left"), (3, "bottom right")}
    captions = [
        "A 7 in the top left and a 3 in the bottom right.",
        "A 7 in the top left.",
        "A 7 in the top left, a 3 in the bottom right and a 1 in the top right.",
    ]
    assert digit_accuracy(captions, [SCENE] * 3) == pytest.approx(1 / 3)


def test_scene_questions_answers():
    questions = scene_questions("k", SCENE, random.Random(0))
    assert [q.kind for q in questions] == ["count", "cell", "presence"]
    assert questions[0].answer == "2"
    cell_question = questions[1]
    cell = cell_question.question.removeprefix("Which digit is in the ").removesuffix("?")
    assert cell_question.answer == {"top left": "7", "bottom right": "3"}.get(cell, "none")
    digit = int(questions[2].question.removeprefix("Is there a ").removesuffix("?"))
    assert questions[2].answer == ("yes" if digit in (7, 3) else "no")


def test_qa_set_is_seeded_and_balanced():
    scenes = {f"k{i}": SCENE for i in range(40)}
    first, second = build_qa_set(scenes, seed=1), build_qa_set(scenes, seed=1)
    assert first == second
    assert len(first) == 120
    presence = [q.answer for q in first if q.kind == "presence"]
    assert 10 <= presence.count("yes") <= 30


def test_qa_accuracy_normalises():
    assert normalize_answer(" Yes.") == "yes"
    assert normalize_answer("seven") == "7"
    questions = build_qa_set({"k": SCENE}, seed=0)
    answers = [q.answer for q in questions]
    scores = qa_accuracy([answers[0] + ".", "wrong", answers[2].upper()], questions)
    assert scores["all"] == pytest.approx(2 / 3)
    assert scores["count"] == 1.0
    assert scores["cell"] == 0.0
    assert scores["presence"] == 1.0


def test_evaluate_on_sample_shards(sample_dir):
    samples = read_caption_shards(str(sample_dir / "caption/val-*.tar"), 16, limit=4)
    assert len(samples) == 4
    assert all(sample.scene and sample.reference for sample in samples)
    # Every reference caption of the simple variant states its scene exactly.
    assert digit_accuracy([s.reference for s in samples], [s.scene for s in samples]) == 1.0

    torch.manual_seed(0)
    backbone = EarlyFusion(image_size=16, patch_size=4, d_model=32, n_layers=1, n_heads=2, ffn_multiple_of=32)
    scores = evaluate(backbone, samples, ByteTokenizer(), max_new_tokens=8, batch_size=4)
    assert set(scores) >= {"cider", "digit_accuracy", "qa_accuracy", "qa_accuracy/count"}
    assert all(0.0 <= value <= 10.0 for value in scores.values())
    assert backbone.training, "evaluate must restore the training mode"


def test_evaluate_reference_captions_score_high():
    samples = [ImageSample(f"k{i}", torch.zeros(3, 16, 16, dtype=torch.uint8), caption) for i, caption in
               enumerate(["A 1 in the top left.", "A 2 in the bottom right.", "A 3 in the top right."])]
    score, _ = cider_d({s.key: s.reference for s in samples}, {s.key: [s.reference] for s in samples})
    _, per_image = cider_d({s.key: "nothing here" for s in samples}, {s.key: [s.reference] for s in samples})
    assert score > 1.0
    assert max(per_image.values()) == 0.0
