"""Digit scenes for the bundled sample set: layout, rendering, captions and edits.

A scene places real handwritten digit scans (scikit-learn's 8x8 `load_digits`) in the cells of a
square grid on a black canvas. Everything about a scene lives in its `Scene` description, so the
pixels can be rendered again from the JSON stored next to each image, and every caption is written
from the same description, so its text depends on the pixels.

Two variants:
- rich: 3x3 grid, 1-4 digits, several colours and sizes, varied phrasing, relations between digits.
  Its many combinations are meant to keep caption loss falling with model size and tokens where the
  simple variant saturates. NOTE: that scaling behaviour has not been measured yet.
- simple: 2x2 grid, 1-3 digits, white, one size, one fixed template; the quickest variant for tests.

Nothing here flips or crops a scene, and readers of these shards must not either, because a flip or
a crop would make "left of" and the cell names false.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Variant = Literal["rich", "simple"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")

# Saturated colours on black, chosen to differ clearly in hue even at the 10-pixel size.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (70, 100, 255),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 210, 220),
    "orange": (255, 140, 0),
}

# Side of the upscaled scan as a fraction of the cell side. The rest of the cell leaves room for jitter.
RICH_SIZES = {"small": 0.5, "medium": 0.7, "large": 0.9}
SIMPLE_SIZES = {"medium": 0.75}

ROW_NAMES = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COL_NAMES = {2: ("left", "right"), 3: ("left", "middle", "right")}


@dataclass(frozen=True)
class SceneConfig:
    """Layout and vocabulary of one variant."""

    variant: Variant
    image_size: int
    grid: int
    min_digits: int
    max_digits: int
    colours: tuple[str, ...]
    sizes: dict[str, float]

    @property
    def cell_size(self) -> int:
        return self.image_size // self.grid


def scene_config(variant: Variant = "rich", image_size: int | None = None) -> SceneConfig:
    """Build the config of `variant`, with `image_size` defaulting to 64 (rich) or 48 (simple) pixels."""
    if variant == "rich":
        config = SceneConfig("rich", image_size or 64, 3, 1, 4, tuple(COLOURS), RICH_SIZES)
    elif variant == "simple":
        config = SceneConfig("simple", image_size or 48, 2, 1, 3, ("white",), SIMPLE_SIZES)
    else:
        raise ValueError(f"unknown scene variant {variant!r}: use 'rich' or 'simple'")

    # The smallest size class must stay at least as large as the 8x8 scan, or strokes vanish.
    min_cell = int(np.ceil(8 / min(config.sizes.values())))
    if config.cell_size < min_cell:
        raise ValueError(
            f"image_size={config.image_size} gives {config.cell_size}-pixel cells in the {config.grid}x"
            f"{config.grid} grid of the {variant} variant; use image_size >= {min_cell * config.grid}"
        )
    return config


def cell_name(row: int, col: int, grid: int) -> str:
    """Name a grid cell: "top left", "center", "bottom middle", ..."""
    if grid == 3 and (row, col) == (1, 1):
        return "center"
    return f"{ROW_NAMES[grid][row]} {COL_NAMES[grid][col]}"


@dataclass(frozen=True)
class PlacedDigit:
    """One digit scan in a scene, whose upscaled scan has its top-left pixel at (x, y)."""

    digit: int
    scan: int  # row of sklearn's load_digits() data
    row: int
    col: int
    colour: str
    size: str
    size_px: int
    x: int
    y: int


@dataclass(frozen=True)
class Scene:
    image_size: int
    grid: int
    digits: tuple[PlacedDigit, ...]

    def cell(self, digit: PlacedDigit) -> str:
        return cell_name(digit.row, digit.col, self.grid)

    def find(self, digit: int) -> PlacedDigit:
        return next(d for d in self.digits if d.digit == digit)

    def to_dict(self) -> dict:
        """Return the JSON form. `from_dict` ignores its human-readable `cell_name` and `rgb` fields."""
        digits = [
            dataclasses.asdict(d) | {"cell_name": self.cell(d), "rgb": list(COLOURS[d.colour])}
            for d in self.digits
        ]
        return {"image_size": self.image_size, "grid": self.grid, "digits": digits}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        fields = [f.name for f in dataclasses.fields(PlacedDigit)]
        digits = tuple(PlacedDigit(**{name: d[name] for name in fields}) for d in data["digits"])
        return cls(int(data["image_size"]), int(data["grid"]), digits)


class ScanPool:
    """Draw scans of a requested digit class from one split's scans.

    Each class cycles through a fresh shuffle of its scans, so every scan is used once before any
    is used again and repetition stays as even as the counts allow.
    """

    def __init__(self, scan_ids: np.ndarray, targets: np.ndarray, rng: np.random.Generator):
        self.rng = rng
        self.by_class = {c: scan_ids[targets[scan_ids] == c] for c in range(10)}
        empty = [c for c, ids in self.by_class.items() if len(ids) == 0]
        if empty:
            raise ValueError(f"no scans of digits {empty} in this split: give each split every digit")
        self.queues: dict[int, list[int]] = {c: [] for c in range(10)}

    def draw(self, digit: int) -> int:
        queue = self.queues[digit]
        if not queue:
            queue.extend(int(i) for i in self.rng.permutation(self.by_class[digit]))
        return queue.pop()


class DigitRenderer:
    """Render scenes to RGB arrays, caching each scan upscaled to each size it is used at."""

    def __init__(self, scans: np.ndarray):
        # load_digits() stores intensities 0..16, so scale them to 8-bit once.
        self.scans = np.rint(scans.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
        self._alpha: dict[tuple[int, int], np.ndarray] = {}

    def alpha(self, scan: int, size_px: int) -> np.ndarray:
        key = (scan, size_px)
        if key not in self._alpha:
            upscaled = Image.fromarray(self.scans[scan]).resize((size_px, size_px), Image.Resampling.BILINEAR)
            self._alpha[key] = np.asarray(upscaled, dtype=np.float32)[..., None] / 255.0
        return self._alpha[key]

    def render(self, scene: Scene) -> np.ndarray:
        """Return the scene as a uint8 array of shape (image_size, image_size, 3)."""
        canvas = np.zeros((scene.image_size, scene.image_size, 3), dtype=np.float32)
        for d in scene.digits:
            ink = self.alpha(d.scan, d.size_px) * np.asarray(COLOURS[d.colour], dtype=np.float32)
            region = canvas[d.y : d.y + d.size_px, d.x : d.x + d.size_px]
            np.maximum(region, ink, out=region)
        return np.rint(canvas).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Sampling and editing scenes


def place_digit(
    digit: int, row: int, col: int, config: SceneConfig, pool: ScanPool, rng: np.random.Generator
) -> PlacedDigit:
    """Place a fresh scan of `digit` in cell (row, col) with a random colour, size and jitter."""
    colour = str(rng.choice(config.colours))
    size = str(rng.choice(list(config.sizes)))
    size_px = int(config.sizes[size] * config.cell_size)
    x, y = _jitter(row, col, size_px, config, rng)
    return PlacedDigit(digit, pool.draw(digit), row, col, colour, size, size_px, x, y)


def _jitter(
    row: int, col: int, size_px: int, config: SceneConfig, rng: np.random.Generator
) -> tuple[int, int]:
    slack = config.cell_size - size_px
    x = col * config.cell_size + int(rng.integers(0, slack + 1))
    y = row * config.cell_size + int(rng.integers(0, slack + 1))
    return x, y


def sample_scene(config: SceneConfig, pool: ScanPool, rng: np.random.Generator) -> Scene:
    """Draw a scene: a digit count, distinct digit classes (so "the 3" names one digit) and cells."""
    n = int(rng.integers(config.min_digits, config.max_digits + 1))
    classes = rng.choice(10, size=n, replace=False)
    cells = rng.choice(config.grid**2, size=n, replace=False)
    digits = tuple(
        place_digit(int(c), int(cell) // config.grid, int(cell) % config.grid, config, pool, rng)
        for c, cell in zip(classes, cells)
    )
    return Scene(config.image_size, config.grid, digits)


def _empty_cells(scene: Scene) -> list[tuple[int, int]]:
    occupied = {(d.row, d.col) for d in scene.digits}
    return [(r, c) for r in range(scene.grid) for c in range(scene.grid) if (r, c) not in occupied]


def edit_scene(
    scene: Scene, config: SceneConfig, pool: ScanPool, rng: np.random.Generator
) -> tuple[Scene, list[dict]]:
    """Derive the next picture of a document: apply 1-2 changes, each to a different digit.

    Returns the new scene and one record per change, e.g. {"op": "move", "digit": 5, "from": "top left",
    "to": "center"}. A moved or recoloured digit keeps its scan, so the same handwriting carries over.
    """
    changes: list[dict] = []
    touched: set[int] = set()
    for _ in range(int(rng.integers(1, 3))):
        ops = _possible_edits(scene, config, touched)
        if not ops:
            break
        scene, change = _apply_edit(str(rng.choice(ops)), scene, config, pool, rng, touched)
        touched.add(change["digit"])
        changes.append(change)
    return scene, changes


def _possible_edits(scene: Scene, config: SceneConfig, touched: set[int]) -> list[str]:
    free = [d for d in scene.digits if d.digit not in touched]
    ops = []
    if free and _empty_cells(scene):
        ops.append("move")
    if len(scene.digits) < config.max_digits and _empty_cells(scene):
        ops.append("add")
    if len(free) > 0 and len(scene.digits) > config.min_digits:
        ops.append("remove")
    if free and len(config.colours) > 1:
        ops.append("recolour")
    if free and len(config.sizes) > 1:
        ops.append("resize")
    return ops


def _apply_edit(
    op: str, scene: Scene, config: SceneConfig, pool: ScanPool, rng: np.random.Generator, touched: set[int]
) -> tuple[Scene, dict]:
    digits = list(scene.digits)
    if op == "add":
        unused = sorted(set(range(10)) - {d.digit for d in digits})
        row, col = _choice(_empty_cells(scene), rng)
        new = place_digit(int(rng.choice(unused)), row, col, config, pool, rng)
        return Scene(scene.image_size, scene.grid, (*digits, new)), _change("add", new, scene)

    free = [d for d in digits if d.digit not in touched]
    old = _choice(free, rng)
    i = digits.index(old)
    if op == "remove":
        del digits[i]
        return Scene(scene.image_size, scene.grid, tuple(digits)), _change("remove", old, scene)
    if op == "move":
        row, col = _choice(_empty_cells(scene), rng)
        x, y = _jitter(row, col, old.size_px, config, rng)
        digits[i] = dataclasses.replace(old, row=row, col=col, x=x, y=y)
    elif op == "recolour":
        colour = str(rng.choice([c for c in config.colours if c != old.colour]))
        digits[i] = dataclasses.replace(old, colour=colour)
    elif op == "resize":
        size = str(rng.choice([s for s in config.sizes if s != old.size]))
        size_px = int(config.sizes[size] * config.cell_size)
        x, y = _jitter(old.row, old.col, size_px, config, rng)
        digits[i] = dataclasses.replace(old, size=size, size_px=size_px, x=x, y=y)
    else:
        raise ValueError(f"unknown scene edit {op!r}")
    new_scene = Scene(scene.image_size, scene.grid, tuple(digits))
    return new_scene, _change(op, digits[i], new_scene, before=old, before_scene=scene)


def _change(op: str, digit: PlacedDigit, scene: Scene, before=None, before_scene=None) -> dict:
    record = {
        "op": op,
        "digit": digit.digit,
        "cell": scene.cell(digit),
        "colour": digit.colour,
        "size": digit.size,
    }
    if op == "move":
        record["from"] = before_scene.cell(before)
        record["to"] = scene.cell(digit)
    elif op == "recolour":
        record["from"] = before.colour
        record["to"] = digit.colour
    elif op == "resize":
        record["from"] = before.size
        record["to"] = digit.size
    return record


def _choice(items: list, rng: np.random.Generator):
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------------------------------------
# Text about scenes


def article(word: str) -> str:
    """Return "a" or "an" for the words these captions use ("an 8", "an eight", "a one", "an orange")."""
    return "an" if word[0] in "aeio8" and word != "one" else "a"


def join_phrases(phrases: list[str]) -> str:
    """Join as English lists: "x", "x and y", "x, y and z"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def count_phrase(n: int, noun: str = "digit") -> str:
    return f"{DIGIT_WORDS[n]} {noun}" + ("" if n == 1 else "s")


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Wording:
    """Choices that stay fixed within one caption or document, so its sentences read alike."""

    words: bool  # "seven" rather than "7"
    form: int  # which digit phrase template (see digit_phrase)
    colour_and_size: bool

    @classmethod
    def draw(cls, config: SceneConfig, rng: np.random.Generator) -> Wording:
        if config.variant == "simple":
            return cls(words=False, form=0, colour_and_size=False)
        return cls(words=bool(rng.random() < 0.3), form=int(rng.integers(3)), colour_and_size=True)

    def name(self, digit: int) -> str:
        return DIGIT_WORDS[digit] if self.words else str(digit)


def digit_phrase(d: PlacedDigit, scene: Scene, wording: Wording) -> str:
    """Describe one placed digit, e.g. "a large red 7 in the top left"."""
    name, cell = wording.name(d.digit), scene.cell(d)
    if not wording.colour_and_size:
        return f"{article(name)} {name} in the {cell}"
    if wording.form == 0:
        return f"{article(d.size)} {d.size} {d.colour} {name} in the {cell}"
    if wording.form == 1:
        return f"{article(d.colour)} {d.colour} {name} ({d.size}) in the {cell}"
    return f"{article(d.size)} {d.size} {name} in {d.colour} in the {cell}"


def relation(a: PlacedDigit, b: PlacedDigit, wording: Wording) -> str:
    """State where `a` is relative to `b`: by column when they differ, else by row."""
    if a.col != b.col:
        where = "left of" if a.col < b.col else "right of"
    else:
        where = "above" if a.row < b.row else "below"
    return f"the {wording.name(a.digit)} is {where} the {wording.name(b.digit)}"


def mention_order(scene: Scene, rng: np.random.Generator, config: SceneConfig) -> list[PlacedDigit]:
    """Order the digits for a caption: reading order, largest first, or random (rich only)."""
    reading = sorted(scene.digits, key=lambda d: (d.row, d.col))
    if config.variant == "simple":
        return reading
    mode = int(rng.integers(3))
    if mode == 0:
        return reading
    if mode == 1:
        return sorted(reading, key=lambda d: -d.size_px)
    return [reading[i] for i in rng.permutation(len(reading))]


def caption_scene(scene: Scene, config: SceneConfig, rng: np.random.Generator) -> str:
    """Write a caption naming every digit and its cell (and, in the rich variant, colour and size)."""
    wording = Wording.draw(config, rng)
    phrases = [digit_phrase(d, scene, wording) for d in mention_order(scene, rng, config)]
    if config.variant == "simple":
        return _capitalize(join_phrases(phrases)) + "."

    n = len(scene.digits)
    body = join_phrases(phrases)
    opener = int(rng.integers(4))
    if opener == 0:
        text = f"{_capitalize(count_phrase(n))}: {body}."
    elif opener == 1:
        text = f"A picture of {count_phrase(n, 'handwritten digit')}. There is {body}."
    elif opener == 2:
        text = f"Handwritten digits on black: {body}."
    else:
        text = f"{_capitalize(body)}."
    return text + _relation_sentences(scene, wording, rng)


def _relation_sentences(scene: Scene, wording: Wording, rng: np.random.Generator) -> str:
    n = len(scene.digits)
    if n < 2:
        return ""
    text = ""
    for _ in range(int(rng.integers(0, min(2, n - 1) + 1))):
        i, j = rng.choice(n, size=2, replace=False)
        text += " " + _capitalize(relation(scene.digits[i], scene.digits[j], wording)) + "."
    return text


def change_clause(change: dict, wording: Wording) -> str:
    """Describe one change record from `edit_scene`, in the past tense."""
    name = wording.name(change["digit"])
    op = change["op"]
    if op == "move":
        return f"the {name} moved from the {change['from']} to the {change['to']}"
    if op == "add":
        detail = f"{change['size']} {change['colour']} " if wording.colour_and_size else ""
        noun = detail + name
        return f"{article(noun)} {noun} appeared in the {change['cell']}"
    if op == "remove":
        return f"the {name} in the {change['cell']} is gone"
    if op == "recolour":
        return f"the {name} turned from {change['from']} to {change['to']}"
    if op == "resize":
        return f"the {name} changed from {change['from']} to {change['to']}"
    raise ValueError(f"unknown scene edit {op!r}")


def count_comparison(n_new: int, n_old: int) -> str:
    diff = n_new - n_old
    if diff == 0:
        return "has as many digits as"
    more = "more" if diff > 0 else "fewer"
    return f"has {count_phrase(abs(diff))} {more} than"


def document_items(
    scenes: list[Scene], changes: list[list[dict]], config: SceneConfig, rng: np.random.Generator
) -> list[str | int]:
    """Lay out an interleaved document as texts and image indices, e.g. [text, 0, text, 1, text].

    `changes[i]` lists the edits that turned scene i-1 into scene i (`changes[0]` is unused). Each
    picture gets one text: the first picture's describes it, and later ones compare it with the one
    before. In the rich variant that text sometimes comes before its picture ("The second picture,
    below, ...").
    """
    wording = Wording.draw(config, rng)
    if config.variant == "simple":
        items: list[str | int] = []
        for i, scene in enumerate(scenes):
            if i == 0:
                phrases = _scene_phrases(scene, wording)
            else:
                phrases = [change_clause(c, wording) for c in changes[i]]
            items += [i, f"Picture {i + 1}: {join_phrases(phrases)}."]
        return items

    items = _intro(len(scenes), rng)
    for i, scene in enumerate(scenes):
        before = bool(rng.random() < 0.25)
        text = _picture_text(i, scenes, changes, wording, before)
        items += [text, i] if before else [i, text]
    if rng.random() < 0.3:
        items.append(_outro(scenes[-1], wording))
    return items


def _scene_phrases(scene: Scene, wording: Wording) -> list[str]:
    return [digit_phrase(d, scene, wording) for d in sorted(scene.digits, key=lambda d: (d.row, d.col))]


def _intro(n_pictures: int, rng: np.random.Generator) -> list[str | int]:
    choice = int(rng.integers(3))
    if choice == 0:
        return [f"Here are {count_phrase(n_pictures, 'picture')} of handwritten digits."]
    if choice == 1:
        pictures = _capitalize(count_phrase(n_pictures, "picture"))
        return [f"{pictures} follow, each a small change of the one before."]
    return []


def _picture_text(
    i: int, scenes: list[Scene], changes: list[list[dict]], wording: Wording, before: bool
) -> str:
    subject = f"The {ORDINALS[i]} picture" + (", below," if before else "")
    if i == 0:
        return f"{subject} shows {join_phrases(_scene_phrases(scenes[0], wording))}."
    comparison = count_comparison(len(scenes[i].digits), len(scenes[i - 1].digits))
    clauses = join_phrases([change_clause(c, wording) for c in changes[i]])
    return f"{subject} {comparison} the {ORDINALS[i - 1]}: {clauses}."


def _outro(scene: Scene, wording: Wording) -> str:
    names = [f"the {wording.name(d.digit)}" for d in sorted(scene.digits, key=lambda d: (d.row, d.col))]
    verb = "is" if len(names) == 1 else "are"
    return f"In the end there {verb} {count_phrase(len(names))}: {join_phrases(names)}."
