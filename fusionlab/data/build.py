"""Write the bundled sample set: WebDataset shards built offline from real material in installed packages.

`fusionlab data sample --out DIR` writes four data types, each with a train and a val split:

- caption/{split}-NNNNNN.tar: digit scenes in the img2dataset layout (`{key}.png`, `{key}.txt`,
  `{key}.json`), with 9-digit keys `shard_id * 10**k + index` that skip a few indices, as
  img2dataset does for failed downloads;
- interleaved/{split}-NNNNNN.tar: documents of 2-4 related scenes in the OBELICS schema with the images
  inside the tar (`{key}.json` = {"texts": [...], "images": [...]}, images stored as `{key}.img0.png`, ...);
- text/{split}-NNNNNN.tar: passages of English prose (`{key}.txt`) from the Python documentation topics;
- qa/{split}-NNNNNN.tar: one question about a scene per sample in LLaVA's conversation layout
  (`{key}.png`, `{key}.json` = {"conversations": [...], "kind": ..., "scene": {...}}), for
  question-answering fine-tuning (see fusionlab.data.questions).

The sources are scikit-learn's 1,797 handwritten digit scans (`load_digits`) and the standard
library's `pydoc_data.topics`. Train and val draw from disjoint pools of scans and topics. The pools
are fixed, so they are the same for every seed. `manifest.json` records counts, shard patterns, the
pools and how often each source was repeated.

Shards are reproducible: the same arguments and seed give byte-identical tars, given the same
versions of Python (its `pydoc_data` text), scikit-learn, Pillow and zlib.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from fusionlab.batch import DATA_TYPES
from fusionlab.data.questions import conversation, scene_questions
from fusionlab.data.scenes import (
    DigitRenderer,
    Scene,
    SceneConfig,
    ScanPool,
    Variant,
    caption_scene,
    document_items,
    edit_scene,
    sample_scene,
    scene_config,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")

# The key width of img2dataset's defaults: oom_shard_count=5 shard digits plus 4 index digits for
# 10,000 samples per shard. With fewer index digits, the shard id gets the rest.
KEY_WIDTH = 9
# A fixed member mtime, because TarWriter would otherwise stamp time.time() and no two builds would match.
SHARD_MTIME = 0
# Samples per shard, chosen from measured member sizes to keep each shard under about 1.5 MB.
MAX_SAMPLES_PER_SHARD = {"caption": 300, "interleaved": 120, "text": 500, "qa": 300}
# At least 4 train shards, so 2 ranks x 2 dataloader workers can each read whole shards.
MIN_SHARDS = {"train": 4, "val": 1}
# Fraction of caption rows dropped as if their download had failed, leaving gaps in the keys.
GAP_RATE = 0.02

# The train/val pools do not depend on the build seed, so val sets of different seeds share sources.
SPLIT_SEED = 1797
VAL_SCAN_FRACTION = 0.1
VAL_TEXT_FRACTION = 0.15

SAMPLE_DESCRIPTION = (
    "Write caption, interleaved, text and question-answering shards (train and val) built from "
    "scikit-learn's digit scans and the Python documentation topics, with no download. The counts are "
    "samples per split: --*-scenes captioned scenes, --*-docs interleaved documents of 2-4 scenes, "
    "--*-texts text passages, --*-questions scenes with one question each."
)
DEFAULT_COUNTS = {
    "train": {"caption": 6000, "interleaved": 2000, "text": None, "qa": 6000},
    "val": {"caption": 300, "interleaved": 150, "text": None, "qa": 300},
}


# ---------------------------------------------------------------------------------------------
# Sources and their train/val pools


@functools.cache
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digit scans (N, 8, 8) with intensities 0..16 and their labels (N,).

    The arrays are cached and read-only, because every build in a process shares them.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def load_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


def split_scans(targets: np.ndarray, val_fraction: float = VAL_SCAN_FRACTION) -> dict[str, np.ndarray]:
    """Split scan ids into disjoint train/val pools, per digit class so that val contains every digit."""
    rng = np.random.default_rng(SPLIT_SEED)
    val = []
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(targets == c))
        val.append(ids[: max(1, round(val_fraction * len(ids)))])
    val_ids = np.sort(np.concatenate(val))
    train_ids = np.setdiff1d(np.arange(len(targets)), val_ids)
    return {"train": train_ids, "val": val_ids}


def split_topics(topics: dict[str, str], val_fraction: float = VAL_TEXT_FRACTION) -> dict[str, list[str]]:
    """Split topic names into disjoint train/val pools, with about `val_fraction` of the characters in val.

    Topics are visited in the order of their SHA-256 name hashes (stable across runs, unlike `hash`).
    A topic goes to val while it still fits the character budget.
    """
    names = sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    budget = val_fraction * sum(len(text) for text in topics.values())
    val, val_chars = [], 0
    for name in names:
        if val_chars + len(topics[name]) <= budget:
            val.append(name)
            val_chars += len(topics[name])
    train = [name for name in names if name not in set(val)]
    if not val or not train:
        raise ValueError(
            f"val_fraction={val_fraction} leaves a split without topics; use a value in (0.05, 0.5)"
        )
    return {"train": sorted(train), "val": sorted(val)}


def split_passages(paragraphs: list[str], max_chars: int) -> list[str]:
    """Pack consecutive paragraphs into passages of at most `max_chars` characters.

    A paragraph longer than `max_chars` is cut between lines, and a line longer than that between words.
    """
    pieces = []
    for paragraph in paragraphs:
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
        else:
            pieces += _pack(_cut_long_lines(paragraph.splitlines(), max_chars), max_chars, "\n")
    return _pack(pieces, max_chars, "\n\n")


def passage_pools(
    topics: dict[str, str], topic_pools: dict[str, list[str]], max_chars: int
) -> dict[str, tuple[list[str], int]]:
    """Cut each split's topics into passages, and return (passages, duplicate paragraphs dropped) per split.

    Topics embed one another ("compound" repeats "try", "function", "class", ...), so disjoint topic
    pools still share paragraphs. Each paragraph is kept at its first occurrence only, val first so
    that the small val pool stays whole and no val paragraph appears in train.
    """
    seen: set[str] = set()
    pools = {}
    for split in ("val", "train"):
        passages, dropped = [], 0
        for name in topic_pools[split]:
            kept = []
            for paragraph in re.split(r"\n\s*\n", topics[name].strip()):
                normalized = " ".join(paragraph.split())
                if normalized in seen:
                    dropped += 1
                    continue
                seen.add(normalized)
                kept.append(paragraph)
            passages += split_passages(kept, max_chars)
        pools[split] = (passages, dropped)
    return pools


def _cut_long_lines(lines: list[str], max_chars: int) -> list[str]:
    out = []
    for line in lines:
        while len(line) > max_chars:
            cut = line.rfind(" ", 1, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            out.append(line[:cut])
            line = line[cut:].lstrip()
        out.append(line)
    return out


def _pack(pieces: list[str], max_chars: int, sep: str) -> list[str]:
    """Greedily join consecutive pieces with `sep` while the result stays within `max_chars`."""
    passages, current = [], ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) > max_chars:
            passages.append(current)
            current = piece
        else:
            current = current + sep + piece if current else piece
    if current.strip():
        passages.append(current)
    return passages


# ---------------------------------------------------------------------------------------------
# Shards and keys


def shard_counts(n: int, min_shards: int, max_per_shard: int) -> list[int]:
    """Spread `n` samples evenly over enough shards (at least `min_shards`, never an empty one)."""
    n_shards = min(n, max(min_shards, math.ceil(n / max_per_shard)))
    return [(s + 1) * n // n_shards - s * n // n_shards for s in range(n_shards)]


def shard_keys(
    counts: list[int], rng: np.random.Generator | None = None, gap_rate: float = 0.0
) -> list[list[str]]:
    """Make img2dataset keys `shard_id * 10**k + index` for the samples of each shard.

    With `gap_rate` > 0, about that fraction of rows (at least one per shard of two or more samples)
    counts as failed and gets no sample, like an img2dataset download that failed. Failed rows are
    never the first or last row of a shard, so the gap shows between two keys.
    """
    rows = []
    for n in counts:
        n_failed = max(1, round(gap_rate * n)) if gap_rate > 0 and n >= 2 else 0
        interior = np.arange(1, n + n_failed - 1)
        failed = set(rng.choice(interior, size=n_failed, replace=False).tolist()) if n_failed else set()
        rows.append([i for i in range(n + n_failed) if i not in failed])

    # k = digits of the largest row index, as img2dataset's ceil(log10(samples_per_shard)).
    k = len(str(max((r[-1] for r in rows), default=0)))
    if len(counts) * 10**k > 10**KEY_WIDTH:
        raise ValueError(
            f"{len(counts)} shards of up to {10**k} rows do not fit {KEY_WIDTH}-digit keys; "
            "write fewer samples"
        )
    return [[f"{s * 10**k + i:0{KEY_WIDTH}d}" for i in shard_rows] for s, shard_rows in enumerate(rows)]


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Write samples to one tar with fixed member metadata, and return the number written.

    The tar is written to `path` + ".tmp" and renamed when complete, so a failed build never leaves a
    truncated shard under a name that readers would pick up.
    """
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=SHARD_MTIME) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


def shard_pattern(data_type: str, split: str, n_shards: int) -> str:
    """Brace pattern of a split's shards, relative to the output folder, as webdataset expands it."""
    if n_shards == 1:
        return f"{data_type}/{split}-000000.tar"
    return f"{data_type}/{split}-{{000000..{n_shards - 1:06d}}}.tar"


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Samples of each type


class SceneSamples:
    """Make caption and document samples of one split and type from a stream of random scenes.

    `uses` counts, per scan id, the images a scan appears in. The types of a split share it.
    """

    def __init__(
        self,
        config: SceneConfig,
        renderer: DigitRenderer,
        pool: ScanPool,
        rng: np.random.Generator,
        uses: np.ndarray,
    ):
        self.config = config
        self.renderer = renderer
        self.pool = pool
        self.rng = rng
        self.uses = uses

    def png(self, scene: Scene) -> bytes:
        for d in scene.digits:
            self.uses[d.scan] += 1
        return encode_png(self.renderer.render(scene))

    def caption_sample(self, key: str) -> dict:
        scene = sample_scene(self.config, self.pool, self.rng)
        caption = caption_scene(scene, self.config, self.rng)
        png = self.png(scene)
        size = self.config.image_size
        # The img2dataset metadata fields, then the scene that the caption and pixels were made from.
        meta = {
            "key": key,
            "caption": caption,
            "status": "success",
            "error_message": None,
            "width": size,
            "height": size,
            "original_width": size,
            "original_height": size,
            "sha256": hashlib.sha256(png).hexdigest(),
            "scene": scene.to_dict(),
        }
        return {"__key__": key, "png": png, "txt": caption.encode("utf-8"), "json": _json_bytes(meta)}

    def document_sample(self, key: str) -> dict:
        scenes, changes = [sample_scene(self.config, self.pool, self.rng)], [[]]
        for _ in range(int(self.rng.integers(1, 4))):
            scene, change = edit_scene(scenes[-1], self.config, self.pool, self.rng)
            scenes.append(scene)
            changes.append(change)

        # OBELICS schema: parallel lists with exactly one non-null entry per index.
        texts, images, metadata = [], [], []
        for item in document_items(scenes, changes, self.config, self.rng):
            is_text = isinstance(item, str)
            texts.append(item if is_text else None)
            images.append(None if is_text else f"img{item}.png")
            metadata.append(None if is_text else {"scene": scenes[item].to_dict(), "changes": changes[item]})
        doc = {"texts": texts, "images": images, "metadata": metadata}

        sample = {"__key__": key, "json": _json_bytes(doc)}
        for i, scene in enumerate(scenes):
            sample[f"img{i}.png"] = self.png(scene)
        return sample

    def question_sample(self, key: str) -> dict:
        scene = sample_scene(self.config, self.pool, self.rng)
        scene_dict = scene.to_dict()
        # One question per sample, its kind drawn at random, so each kind gets about a third of the scenes.
        questions = scene_questions(key, scene_dict, random.Random(int(self.rng.integers(2**63))))
        question = questions[int(self.rng.integers(len(questions)))]
        meta = {"conversations": conversation([question]), "kind": question.kind, "scene": scene_dict}
        return {"__key__": key, "png": self.png(scene), "json": _json_bytes(meta)}


def text_samples(passages: list[str], n: int, rng: np.random.Generator) -> Iterable[str]:
    """Yield `n` passages, one fresh shuffle of the pool per pass, so repeats come only after a full pass."""
    for start in range(0, n, len(passages)):
        order = rng.permutation(len(passages))[: n - start]
        yield from (passages[i] for i in order)


# ---------------------------------------------------------------------------------------------
# The sample set


def write_sample_set(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    variant: Variant = "rich",
    image_size: int | None = None,
    n_train_scenes: int = DEFAULT_COUNTS["train"]["caption"],
    n_val_scenes: int = DEFAULT_COUNTS["val"]["caption"],
    n_train_docs: int = DEFAULT_COUNTS["train"]["interleaved"],
    n_val_docs: int = DEFAULT_COUNTS["val"]["interleaved"],
    n_train_texts: int | None = None,
    n_val_texts: int | None = None,
    n_train_questions: int = DEFAULT_COUNTS["train"]["qa"],
    n_val_questions: int = DEFAULT_COUNTS["val"]["qa"],
    max_text_chars: int = 1500,
    overwrite: bool = False,
) -> dict:
    """Write the bundled sample set under `out_dir`, and return its manifest (also written as manifest.json).

    Counts are samples per split: captioned scenes, interleaved documents (2-4 scenes each), text
    passages, where None takes every passage of the split's topic pool once, and scenes with one
    question each. `image_size` defaults to
    the variant's (64 rich, 48 simple). Raises FileExistsError if `out_dir` already contains a sample
    set, unless `overwrite`.
    """
    config = scene_config(variant, image_size)
    counts = {
        "train": {"caption": n_train_scenes, "interleaved": n_train_docs, "text": n_train_texts, "qa": n_train_questions},
        "val": {"caption": n_val_scenes, "interleaved": n_val_docs, "text": n_val_texts, "qa": n_val_questions},
    }
    _check_arguments(seed, counts, max_text_chars)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)

    builder = SampleSetBuilder(out, seed, config, max_text_chars)
    manifest = {
        "format": "fusionlab-sample-set",
        "version": 1,
        "seed": seed,
        "variant": config.variant,
        "image_size": config.image_size,
        "grid": config.grid,
        "splits": {},
        "sources": {
            "digit_scans": {"name": "sklearn.datasets.load_digits"},
            "text": {"name": _topics_source()},
        },
        "repetition": {},
    }
    for split in SPLITS:
        entries, scan_record, text_record = builder.write_split(split, counts[split])
        manifest["splits"][split] = entries
        manifest["sources"]["digit_scans"][split] = scan_record
        manifest["sources"]["text"][split] = text_record
        manifest["repetition"][split] = _log_repetition(split, scan_record, text_record)

    _write_sizes(out, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


class SampleSetBuilder:
    """Load the sources once, split them into train/val pools, and write the shards of each split."""

    def __init__(self, out: Path, seed: int, config: SceneConfig, max_text_chars: int):
        self.out = out
        self.seed = seed
        self.config = config
        scans, self.targets = load_scans()
        self.renderer = DigitRenderer(scans)
        self.topics = load_topics()
        self.scan_pools = split_scans(self.targets)
        self.topic_pools = split_topics(self.topics)
        self.passage_pools = passage_pools(self.topics, self.topic_pools, max_text_chars)

    def rng(self, split: str, data_type: str) -> np.random.Generator:
        # One stream per (split, type), so changing one count leaves the other shards unchanged.
        return np.random.default_rng([self.seed, SPLITS.index(split), DATA_TYPES.index(data_type)])

    def write_split(self, split: str, counts: dict) -> tuple[dict, dict, dict]:
        """Write the four data types of `split`, and return their manifest entries and source records."""
        scan_ids = self.scan_pools[split]
        uses = np.zeros(len(self.targets), dtype=np.int64)
        entries = {t: self.write_scenes(t, split, counts[t], uses) for t in ("caption", "interleaved", "qa")}
        entries["text"], text_record = self.write_texts(split, counts["text"])

        used = uses[scan_ids]
        scan_record = {
            "n_scans": len(scan_ids),
            "uses_mean": round(float(used.mean()), 3),
            "uses_max": int(used.max()),
            "uses_min": int(used.min()),
            "scan_ids": scan_ids.tolist(),
        }
        return entries, scan_record, text_record

    def write_scenes(self, data_type: str, split: str, n: int, uses: np.ndarray) -> dict:
        """Write `n` caption, interleaved or question samples, adding each scan's image count to `uses`."""
        rng = self.rng(split, data_type)
        pool = ScanPool(self.scan_pools[split], self.targets, rng)
        samples = SceneSamples(self.config, self.renderer, pool, rng, uses)
        per_shard = shard_counts(n, MIN_SHARDS[split], MAX_SAMPLES_PER_SHARD[data_type])
        if data_type == "caption":
            keys, make_sample = shard_keys(per_shard, rng, GAP_RATE), samples.caption_sample
        elif data_type == "qa":
            keys, make_sample = shard_keys(per_shard), samples.question_sample
        else:
            keys, make_sample = shard_keys(per_shard), samples.document_sample
        return self.write_shards(data_type, split, keys, make_sample)

    def write_texts(self, split: str, n: int | None) -> tuple[dict, dict]:
        """Write `n` passages (None: the whole pool once), and return the manifest entry and source record."""
        passages, n_dropped = self.passage_pools[split]
        n = len(passages) if n is None else n
        stream = text_samples(passages, n, self.rng(split, "text"))
        keys = shard_keys(shard_counts(n, MIN_SHARDS[split], MAX_SAMPLES_PER_SHARD["text"]))

        def make_sample(key: str) -> dict:
            return {"__key__": key, "txt": next(stream).encode("utf-8")}

        entry = self.write_shards("text", split, keys, make_sample)
        record = {
            "n_topics": len(self.topic_pools[split]),
            "n_passages": len(passages),
            "duplicate_paragraphs_dropped": n_dropped,
            "passes": round(n / len(passages), 3),
            "topics": list(self.topic_pools[split]),
        }
        return entry, record

    def write_shards(self, data_type: str, split: str, keys: list[list[str]], make_sample: Callable) -> dict:
        """Write the shards of one type and split, shard s holding the samples keyed `keys[s]`."""
        shards = []
        for s, keys_s in enumerate(keys):
            path = self.out / data_type / f"{split}-{s:06d}.tar"
            write_shard(path, (make_sample(key) for key in keys_s))
            shards.append(path.relative_to(self.out).as_posix())
        return {
            "pattern": shard_pattern(data_type, split, len(shards)) if shards else None,
            "shards": shards,
            "samples_per_shard": [len(k) for k in keys],
            "n_samples": sum(len(k) for k in keys),
        }


def _log_repetition(split: str, scan_record: dict, text_record: dict) -> dict:
    """Log how often a split repeats its sources, and return the manifest's repetition entry."""
    log.info(
        "%s: each digit scan appears in %.1f images on average (max %d) over %d scans; "
        "text: %.2f passes over %d passages from %d topics",
        split,
        scan_record["uses_mean"],
        scan_record["uses_max"],
        scan_record["n_scans"],
        text_record["passes"],
        text_record["n_passages"],
        text_record["n_topics"],
    )
    return {
        "digit_scan_uses_mean": scan_record["uses_mean"],
        "digit_scan_uses_max": scan_record["uses_max"],
        "text_passes": text_record["passes"],
    }


def _topics_source() -> str:
    major, minor, micro = sys.version_info[:3]
    return f"pydoc_data.topics (Python {major}.{minor}.{micro})"


def _check_arguments(seed: int, counts: dict, max_text_chars: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for split, per_type in counts.items():
        for data_type, n in per_type.items():
            if n is None and data_type == "text":
                continue
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"{split} {data_type} count must be a non-negative int, got {n!r}")
    if max_text_chars < 200:
        raise ValueError(f"max_text_chars={max_text_chars} cuts prose into fragments; use at least 200")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create the type folders, after deleting a previous build's files if `overwrite` allows it.

    Only shards, sizes.json and manifest.json are deleted, so no stale shard of a larger build remains
    and other files in the folder stay.
    """
    old = [out / "manifest.json"] + [
        path
        for data_type in DATA_TYPES
        for name in ("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar", "sizes.json")
        for path in (out / data_type).glob(name)
    ]
    old = [path for path in old if path.exists()]
    if old and not overwrite:
        raise FileExistsError(
            f"output folder {out} already contains a sample set ({old[0]}): "
            "choose another folder or pass overwrite=True (--overwrite)"
        )
    for path in old:
        path.unlink()
    for data_type in DATA_TYPES:
        (out / data_type).mkdir(parents=True, exist_ok=True)


def _write_sizes(out: Path, manifest: dict) -> None:
    """Write sizes.json per type folder (shard file name -> sample count), the file open_clip reads."""
    for data_type in DATA_TYPES:
        sizes = {}
        for split in SPLITS:
            entry = manifest["splits"][split][data_type]
            sizes |= {Path(shard).name: n for shard, n in zip(entry["shards"], entry["samples_per_shard"])}
        (out / data_type / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line: `fusionlab data sample`


def _add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--out", required=True, type=Path, metavar="DIR", help="output folder for shards and manifest.json")
    add("--seed", type=int, default=0, metavar="S", help="random seed (0). The same seed gives identical shards")
    add("--variant", choices=("rich", "simple"), default="rich", help="scene variant (rich)")
    add("--image-size", type=int, metavar="PX", help="image side in pixels (64 for rich, 48 for simple)")
    for split in SPLITS:
        defaults = DEFAULT_COUNTS[split]
        add(f"--{split}-scenes", type=int, default=defaults["caption"], metavar="N", help="(%(default)s)")
        add(f"--{split}-docs", type=int, default=defaults["interleaved"], metavar="N", help="(%(default)s)")
        add(f"--{split}-texts", type=int, metavar="N", help=f"(every passage of the {split} topics once)")
        add(f"--{split}-questions", type=int, default=defaults["qa"], metavar="N", help="(%(default)s)")
    add("--max-text-chars", type=int, default=1500, metavar="N", help="max characters per passage (1500)")
    add("--overwrite", action="store_true", help="replace the shards and manifest of a previous build")


def add_sample_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `sample` command to the `fusionlab data` subparsers, with `run_sample` as `args.func`."""
    parser = subparsers.add_parser(
        "sample",
        help="write the bundled sample set (no download needed)",
        description=SAMPLE_DESCRIPTION,
    )
    _add_sample_arguments(parser)
    parser.set_defaults(func=run_sample)
    return parser


def run_sample(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run `fusionlab data sample` on an argv list or on parsed arguments, and print a summary.

    Returns the exit code: 0, or 2 when the output folder or a count is invalid.
    """
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(
            prog="fusionlab data sample",
            description=SAMPLE_DESCRIPTION,
        )
        _add_sample_arguments(parser)
        args = parser.parse_args(args)
    try:
        manifest = write_sample_set(
            args.out,
            seed=args.seed,
            variant=args.variant,
            image_size=args.image_size,
            n_train_scenes=args.train_scenes,
            n_val_scenes=args.val_scenes,
            n_train_docs=args.train_docs,
            n_val_docs=args.val_docs,
            n_train_texts=args.train_texts,
            n_val_texts=args.val_texts,
            n_train_questions=args.train_questions,
            n_val_questions=args.val_questions,
            max_text_chars=args.max_text_chars,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(manifest, Path(args.out)))
    return 0


def format_summary(manifest: dict, out: Path) -> str:
    lines = [f"wrote {out / 'manifest.json'} ({manifest['variant']} variant, seed {manifest['seed']})"]
    for split in SPLITS:
        for data_type in DATA_TYPES:
            entry = manifest["splits"][split][data_type]
            lines.append(f"  {split:5s} {data_type:11s} {entry['n_samples']:6d} samples  {entry['pattern']}")
        rep = manifest["repetition"][split]
        lines.append(
            f"  {split:5s} repetition: digit scans {rep['digit_scan_uses_mean']:.1f} uses on average "
            f"(max {rep['digit_scan_uses_max']}), text {rep['text_passes']:.2f} passes"
        )
    return "\n".join(lines)
