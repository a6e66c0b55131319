"""Questions about sample-set scenes, and the prompt template of question-answering samples.

Each scene gets three questions with short canonical answers: how many digits there are, which
digit is in a given cell (or "none"), and whether a given digit is present ("yes" or "no"). The
sample set writes them as question-answering shards in LLaVA's conversation layout, and the
evaluation asks them of held-out scenes with the same template, so fine-tuning and scoring agree.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from fusionlab.data.scenes import cell_name

# The image comes first; each question turn is formatted as qa_prompt(question), and each answer
# follows it after a space.
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Question:
    key: str  # image key
    kind: str  # "count", "cell" or "presence"
    question: str
    answer: str


QUESTION_KINDS = ("count", "cell", "presence")


def qa_prompt(question: str) -> str:
    """Format the text that follows the image in a question-answering prompt and sample."""
    return f" Question: {question} Answer:"


def scene_digits(scene: Mapping) -> set[tuple[int, str]]:
    """Return the (digit, cell name) pairs of a scene dict."""
    grid = int(scene["grid"])
    return {(int(d["digit"]), cell_name(int(d["row"]), int(d["col"]), grid)) for d in scene["digits"]}


def scene_questions(key: str, scene: Mapping, rng: random.Random) -> list[Question]:
    """Write one question of each kind about a scene, with its canonical answer."""
    grid = int(scene["grid"])
    by_cell = {cell: digit for digit, cell in scene_digits(scene)}
    n = len(scene["digits"])
    questions = [Question(key, "count", "How many digits are there?", str(n))]

    row, col = rng.randrange(grid), rng.randrange(grid)
    cell = cell_name(row, col, grid)
    at_cell = str(by_cell[cell]) if cell in by_cell else "none"
    questions.append(Question(key, "cell", f"Which digit is in the {cell}?", at_cell))

    present = {digit for digit, _ in scene_digits(scene)}
    # Ask about a present digit half of the time, so "yes" and "no" are equally likely answers.
    if rng.random() < 0.5:
        digit = rng.choice(sorted(present))
    else:
        digit = rng.choice([d for d in range(10) if d not in present])
    questions.append(Question(key, "presence", f"Is there a {digit}?", "yes" if digit in present else "no"))
    return questions


def build_qa_set(scenes: Mapping[str, Mapping], seed: int = 0) -> list[Question]:
    """Build the question set of scenes {image key: scene}: three questions per scene, seeded."""
    rng = random.Random(seed)
    questions = []
    for key in sorted(scenes):
        questions += scene_questions(key, scenes[key], rng)
    return questions


def conversation(questions: list[Question]) -> list[dict[str, str]]:
    """Write questions about one image as LLaVA conversation turns, the image marked in the first."""
    turns = []
    for i, q in enumerate(questions):
        prefix = IMAGE_PLACEHOLDER + "\n" if i == 0 else ""
        turns += [{"from": "human", "value": prefix + q.question}, {"from": "gpt", "value": q.answer}]
    return turns
