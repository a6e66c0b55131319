"""Tasks scored against the scene stored with each sample-set image: digit accuracy and questions.

A scene (the "scene" field of a caption sample's json member) lists its digits with their grid
cell. A caption is digit-exact when the (digit, cell) pairs it states are exactly the scene's.
The question-answering set asks, per scene, how many digits there are, which digit is in a cell
(or "none"), and whether a given digit is present, with short canonical answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from fusionlab.data.questions import (  # noqa: F401  (re-exported: the question set is part of the tasks)
    QUESTION_KINDS,
    Question,
    build_qa_set,
    qa_prompt,
    scene_digits,
    scene_questions,
)
from fusionlab.data.scenes import DIGIT_WORDS, cell_name

_DIGIT = r"(?:[0-9]|" + "|".join(DIGIT_WORDS) + r")"
_CELLS = sorted(
    {cell_name(r, c, g) for g in (2, 3) for r in range(g) for c in range(g)}, key=len, reverse=True
)
# A digit, then anything without another digit or a sentence break, then "in the <cell>". The
# lookahead keeps "a 3 and a 5 in the top left" from pairing the 3 with the 5's cell.
_DIGIT_IN_CELL = re.compile(
    rf"\b(?P<digit>{_DIGIT})\b(?:(?!\b{_DIGIT}\b)[^.;:])*?\bin the (?P<cell>{'|'.join(_CELLS)})\b"
)


def caption_digits(caption: str) -> set[tuple[int, str]]:
    """Return the (digit, cell name) pairs a caption states, as in "a 7 in the top left"."""
    pairs = set()
    for match in _DIGIT_IN_CELL.finditer(caption.lower()):
        word = match["digit"]
        digit = int(word) if word.isdigit() else DIGIT_WORDS.index(word)
        pairs.add((digit, match["cell"]))
    return pairs


def digit_accuracy(captions: Sequence[str], scenes: Sequence[Mapping]) -> float:
    """Fraction of captions whose (digit, cell) pairs equal their scene's exactly."""
    if len(captions) != len(scenes) or not captions:
        raise ValueError(f"digit_accuracy needs as many captions as scenes (>0), got {len(captions)} and {len(scenes)}")
    hits = sum(caption_digits(caption) == scene_digits(scene) for caption, scene in zip(captions, scenes))
    return hits / len(captions)


# --------------------------------------------------------------------------------------------
# question answering


def normalize_answer(text: str) -> str:
    """Lower-case, keep the first word and strip punctuation, so " Yes." matches "yes"."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if not words:
        return ""
    word = words[0]
    return str(DIGIT_WORDS.index(word)) if word in DIGIT_WORDS else word


def qa_accuracy(predictions: Sequence[str], questions: Sequence[Question]) -> dict[str, float]:
    """Exact-match accuracy after `normalize_answer`, overall ("all") and per question kind."""
    if len(predictions) != len(questions) or not questions:
        raise ValueError(f"qa_accuracy needs one prediction per question (>0), got {len(predictions)} and {len(questions)}")
    hits: dict[str, list[bool]] = {"all": []}
    for prediction, question in zip(predictions, questions):
        correct = normalize_answer(prediction) == question.answer
        hits["all"].append(correct)
        hits.setdefault(question.kind, []).append(correct)
    return {kind: sum(values) / len(values) for kind, values in hits.items()}

