"""Tests of the bundled sample set: tiny builds in tmp_path, read back with plain webdataset."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fusionlab.batch import DATA_TYPES
from fusionlab.data import build
from fusionlab.data.build import (
    SPLITS,
    add_sample_parser,
    load_scans,
    load_topics,
    run_sample,
    shard_counts,
    shard_keys,
    passage_pools,
    split_passages,
    split_topics,
    write_sample_set,
)
from fusionlab.data.scenes import (
    COLOURS,
    DIGIT_WORDS,
    DigitRenderer,
    PlacedDigit,
    Scene,
    Wording,
    digit_phrase,
    relation,
    scene_config,
)

# The val topic pool's passage count depends on the Python version that ships pydoc_data.
_topics = load_topics()
VAL_PASSAGES = len(passage_pools(_topics, split_topics(_topics), 1500)["val"][0])
# About a second per build. Asking for 6 more val passages than the pool contains repeats the pool.
N_VAL_TEXTS = VAL_PASSAGES + 6
TINY = dict(
    n_train_scenes=24,
    n_val_scenes=6,
    n_train_docs=8,
    n_val_docs=4,
    n_train_texts=None,
    n_val_texts=N_VAL_TEXTS,
    n_train_questions=12,
    n_val_questions=6,
)


@pytest.fixture(scope="module")
def rich_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("rich")
    return out, write_sample_set(out, seed=0, variant="rich", **TINY)


@pytest.fixture(scope="module")
def simple_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("simple")
    return out, write_sample_set(out, seed=0, variant="simple", **TINY)


def read(out: Path, manifest: dict, split: str, data_type: str) -> list[dict]:
    pattern = manifest["splits"][split][data_type]["pattern"]
    return list(wds.WebDataset(str(out / pattern), shardshuffle=False))


def decode_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB"
    return np.asarray(image)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def scene_images(out: Path, manifest: dict, split: str):
    """Yield (scene dict, png bytes) for every image of a split: captions, questions and documents."""
    for data_type in ("caption", "qa"):
        for sample in read(out, manifest, split, data_type):
            yield json.loads(sample["json"])["scene"], sample["png"]
    for sample in read(out, manifest, split, "interleaved"):
        doc = json.loads(sample["json"])
        for name, meta in zip(doc["images"], doc["metadata"]):
            if name is not None:
                yield meta["scene"], sample[name]


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_identical_bytes(rich_set, tmp_path):
    out, _ = rich_set
    write_sample_set(tmp_path, seed=0, variant="rich", **TINY)
    first, second = tree_bytes(out), tree_bytes(tmp_path)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name


def test_other_seed_different_bytes(rich_set, tmp_path):
    out, _ = rich_set
    write_sample_set(tmp_path, seed=1, variant="rich", **TINY)
    first, second = tree_bytes(out), tree_bytes(tmp_path)
    for name in ("caption/train-000000.tar", "interleaved/train-000000.tar", "text/train-000000.tar"):
        assert first[name] != second[name], name


def test_tar_members_have_fixed_mtime(rich_set):
    out, manifest = rich_set
    with tarfile.open(out / manifest["splits"]["train"]["caption"]["shards"][0]) as tar:
        mtimes = {member.mtime for member in tar.getmembers()}
    assert mtimes == {build.SHARD_MTIME}


# ---------------------------------------------------------------------------------------------
# Layout and reading back


def test_shards_read_back_with_webdataset(rich_set):
    out, manifest = rich_set
    for split in SPLITS:
        for data_type in DATA_TYPES:
            entry = manifest["splits"][split][data_type]
            samples = read(out, manifest, split, data_type)
            assert len(samples) == entry["n_samples"], (split, data_type)
            for sample in samples:
                members = {k for k in sample if not k.startswith("__")}
                if data_type == "caption":
                    assert members == {"png", "txt", "json"}
                elif data_type == "qa":
                    assert members == {"png", "json"}
                elif data_type == "text":
                    assert members == {"txt"}
                else:
                    n_images = len(members) - 1
                    assert members == {"json"} | {f"img{i}.png" for i in range(n_images)}
                    assert 2 <= n_images <= 4


def test_train_split_has_four_shards(rich_set):
    out, manifest = rich_set
    for data_type in DATA_TYPES:
        entry = manifest["splits"]["train"][data_type]
        assert len(entry["shards"]) >= 4, data_type
        assert entry["pattern"] == f"{data_type}/train-{{000000..{len(entry['shards']) - 1:06d}}}.tar"
        assert sum(entry["samples_per_shard"]) == entry["n_samples"]
        assert all((out / shard).is_file() for shard in entry["shards"])


def test_sizes_json_matches_shards(rich_set):
    out, manifest = rich_set
    for data_type in DATA_TYPES:
        sizes = json.loads((out / data_type / "sizes.json").read_text())
        for split in SPLITS:
            entry = manifest["splits"][split][data_type]
            for shard, n in zip(entry["shards"], entry["samples_per_shard"]):
                assert sizes[Path(shard).name] == n
                assert sum(1 for _ in wds.WebDataset(str(out / shard), shardshuffle=False)) == n


def test_caption_keys_have_gaps(rich_set):
    out, manifest = rich_set
    for shard_id, shard in enumerate(manifest["splits"]["train"]["caption"]["shards"]):
        keys = [s["__key__"] for s in wds.WebDataset(str(out / shard), shardshuffle=False)]
        assert all(re.fullmatch(r"\d{9}", key) for key in keys), keys
        indices = [int(key) for key in keys]
        assert indices == sorted(indices)
        # 6 samples + 1 failed row per shard: k = 1 index digit, so key // 10 is the shard id.
        assert {i // 10 for i in indices} == {shard_id}
        gaps = np.diff(indices)
        assert (gaps > 1).any(), indices
        first = next(iter(wds.WebDataset(str(out / shard), shardshuffle=False)))
        assert json.loads(first["json"])["key"] == keys[0]


def test_caption_json_img2dataset_fields(rich_set):
    out, manifest = rich_set
    for sample in read(out, manifest, "val", "caption"):
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]
        assert meta["caption"] == sample["txt"].decode()
        assert meta["status"] == "success"
        assert meta["width"] == meta["height"] == manifest["image_size"] == 64
        assert decode_png(sample["png"]).shape == (64, 64, 3)


# ---------------------------------------------------------------------------------------------
# Captions and pixels


def test_pixels_match_scene_description(rich_set):
    out, manifest = rich_set
    renderer = DigitRenderer(load_scans()[0])
    n_images = 0
    for split in SPLITS:
        for scene_dict, png in scene_images(out, manifest, split):
            pixels = decode_png(png)
            np.testing.assert_array_equal(pixels, renderer.render(Scene.from_dict(scene_dict)))
            n_images += 1
    assert n_images > 30


def test_digits_drawn_inside_their_cells(rich_set):
    out, manifest = rich_set
    for scene_dict, png in scene_images(out, manifest, "train"):
        pixels = decode_png(png).astype(int)
        scene = Scene.from_dict(scene_dict)
        cell = scene.image_size // scene.grid
        ink = np.zeros(pixels.shape[:2], dtype=bool)
        for d in scene.digits:
            assert d.col * cell <= d.x
            assert d.x + d.size_px <= (d.col + 1) * cell
            assert d.row * cell <= d.y
            assert d.y + d.size_px <= (d.row + 1) * cell
            box = pixels[d.y : d.y + d.size_px, d.x : d.x + d.size_px]
            assert box.sum() > 0
            # Full-intensity strokes show the named colour itself.
            rgb = np.asarray(COLOURS[d.colour])
            brightest = box.reshape(-1, 3)[box.sum(-1).argmax()]
            assert np.abs(brightest - rgb).max() <= 40, (d.colour, brightest)
            ink[d.y : d.y + d.size_px, d.x : d.x + d.size_px] = True
        assert pixels[~ink].sum() == 0


def rich_phrases(d: PlacedDigit, scene: Scene) -> list[str]:
    """Every phrase the rich captions may use for one digit (3 templates x numeral or word)."""
    wordings = [Wording(words, form, colour_and_size=True) for words in (False, True) for form in range(3)]
    return [digit_phrase(d, scene, wording) for wording in wordings]


def test_rich_caption_names_each_digit(rich_set):
    out, manifest = rich_set
    for split in SPLITS:
        for sample in read(out, manifest, split, "caption"):
            caption = sample["txt"].decode()
            scene = Scene.from_dict(json.loads(sample["json"])["scene"])
            assert 1 <= len(scene.digits) <= 4
            for d in scene.digits:
                # Lower case, because the first phrase of a caption may start the sentence.
                assert any(phrase in caption.lower() for phrase in rich_phrases(d, scene)), (caption, d)


def test_simple_caption_lists_placed_digits(simple_set):
    out, manifest = simple_set
    assert manifest["image_size"] == 48
    assert manifest["grid"] == 2
    for sample in read(out, manifest, "train", "caption"):
        caption = sample["txt"].decode()
        scene = Scene.from_dict(json.loads(sample["json"])["scene"])
        assert 1 <= len(scene.digits) <= 3
        assert {d.colour for d in scene.digits} == {"white"}
        named = sorted(int(n) for n in re.findall(r"\b\d\b", caption))
        assert named == sorted(d.digit for d in scene.digits), caption
        for d in scene.digits:
            assert f"{d.digit} in the {scene.cell(d)}" in caption, caption


def test_relation_reads_left_and_above():
    wording = Wording(words=False, form=0, colour_and_size=True)
    three = PlacedDigit(3, 0, row=0, col=0, colour="red", size="small", size_px=10, x=0, y=0)
    seven = PlacedDigit(7, 1, row=2, col=2, colour="red", size="small", size_px=10, x=44, y=44)
    five = PlacedDigit(5, 2, row=2, col=0, colour="red", size="small", size_px=10, x=0, y=44)
    assert relation(three, seven, wording) == "the 3 is left of the 7"
    assert relation(seven, three, wording) == "the 7 is right of the 3"
    assert relation(three, five, wording) == "the 3 is above the 5"
    in_words = Wording(words=True, form=0, colour_and_size=True)
    assert relation(five, three, in_words) == "the five is below the three"


def test_scene_config_rejects_small_image():
    with pytest.raises(ValueError, match="image_size >= 48"):
        scene_config("rich", image_size=30)
    with pytest.raises(ValueError, match="unknown scene variant 'fancy'"):
        scene_config("fancy")


# ---------------------------------------------------------------------------------------------
# Interleaved documents


def test_interleaved_obelics_invariants(rich_set):
    out, manifest = rich_set
    for split in SPLITS:
        for sample in read(out, manifest, split, "interleaved"):
            doc = json.loads(sample["json"])
            texts, images, metadata = doc["texts"], doc["images"], doc["metadata"]
            assert len(texts) == len(images) == len(metadata)
            for text, image, meta in zip(texts, images, metadata):
                assert (text is None) != (image is None)
                assert (meta is None) == (image is None)
            names = [name for name in images if name is not None]
            assert names == [f"img{i}.png" for i in range(len(names))]
            assert set(names) == {k for k in sample if k.endswith(".png")}
            assert "." not in sample["__key__"]


def test_interleaved_text_describes_changes(rich_set):
    out, manifest = rich_set
    n_changes = 0
    for sample in read(out, manifest, "train", "interleaved"):
        doc = json.loads(sample["json"])
        text = " ".join(t for t in doc["texts"] if t is not None)
        metas = [m for m in doc["metadata"] if m is not None]
        scenes = [Scene.from_dict(m["scene"]) for m in metas]
        for i in range(1, len(scenes)):
            before, after = scenes[i - 1], scenes[i]
            assert metas[i]["changes"], "each picture after the first changes something"
            for change in metas[i]["changes"]:
                n_changes += 1
                if change["op"] == "move":
                    assert before.cell(before.find(change["digit"])) == change["from"]
                    assert after.cell(after.find(change["digit"])) == change["to"]
                    assert f"from the {change['from']} to the {change['to']}" in text
                elif change["op"] == "add":
                    assert change["digit"] not in {d.digit for d in before.digits}
                    assert after.cell(after.find(change["digit"])) == change["cell"]
                    assert f"appeared in the {change['cell']}" in text
                elif change["op"] == "remove":
                    assert change["digit"] not in {d.digit for d in after.digits}
                    assert f"in the {change['cell']} is gone" in text
                elif change["op"] == "recolour":
                    assert after.find(change["digit"]).colour == change["to"]
                    assert f"from {change['from']} to {change['to']}" in text
                elif change["op"] == "resize":
                    assert after.find(change["digit"]).size == change["to"]
                    assert f"from {change['from']} to {change['to']}" in text
            more = len(after.digits) - len(before.digits)
            if more == 1:
                assert "has one digit more than" in text
    assert n_changes >= 8


def test_moved_digit_keeps_its_scan(rich_set):
    out, manifest = rich_set
    n_moves = 0
    for sample in read(out, manifest, "train", "interleaved"):
        metas = [m for m in json.loads(sample["json"])["metadata"] if m is not None]
        for prev, meta in zip(metas, metas[1:]):
            before, after = Scene.from_dict(prev["scene"]), Scene.from_dict(meta["scene"])
            for change in meta["changes"]:
                if change["op"] in ("move", "recolour", "resize"):
                    assert before.find(change["digit"]).scan == after.find(change["digit"]).scan
                    n_moves += 1
    assert n_moves > 0


# ---------------------------------------------------------------------------------------------
# Sources: disjoint splits and repetition


def test_train_val_scans_disjoint(rich_set):
    out, manifest = rich_set
    pools = {split: set(manifest["sources"]["digit_scans"][split]["scan_ids"]) for split in SPLITS}
    assert not pools["train"] & pools["val"]
    assert len(pools["train"]) + len(pools["val"]) == 1797
    targets = load_scans()[1]
    assert set(targets[sorted(pools["val"])]) == set(range(10))
    for split in SPLITS:
        used = {d["scan"] for scene, _ in scene_images(out, manifest, split) for d in scene["digits"]}
        assert used <= pools[split], split
        for scene, _ in scene_images(out, manifest, split):
            for d in scene["digits"]:
                assert targets[d["scan"]] == d["digit"]


def test_train_val_topics_disjoint(rich_set):
    out, manifest = rich_set
    topics = load_topics()
    pools = {split: manifest["sources"]["text"][split]["topics"] for split in SPLITS}
    assert not set(pools["train"]) & set(pools["val"])
    assert sorted(pools["train"] + pools["val"]) == sorted(topics)

    def squash(text: str) -> str:
        return " ".join(text.split())

    paragraphs = {}
    for split in SPLITS:
        own = [squash(topics[name]) for name in pools[split]]
        paragraphs[split] = set()
        for sample in read(out, manifest, split, "text"):
            for paragraph in sample["txt"].decode().split("\n\n"):
                assert any(squash(paragraph) in text for text in own), (split, paragraph[:80])
                paragraphs[split].add(squash(paragraph))
    # Topics repeat paragraphs of other topics, and none of those may cross the split.
    assert not paragraphs["train"] & paragraphs["val"]
    assert manifest["sources"]["text"]["train"]["duplicate_paragraphs_dropped"] > 0


def test_text_passes_recorded(rich_set):
    out, manifest = rich_set
    train, val = manifest["sources"]["text"]["train"], manifest["sources"]["text"]["val"]
    assert train["passes"] == 1.0
    assert manifest["splits"]["train"]["text"]["n_samples"] == train["n_passages"]
    assert val["n_passages"] == VAL_PASSAGES
    assert val["passes"] == round(N_VAL_TEXTS / VAL_PASSAGES, 3) > 1
    assert manifest["repetition"]["val"]["text_passes"] == val["passes"]
    # A passage repeats only after the whole pool has been seen once.
    val_texts = [s["txt"] for s in read(out, manifest, "val", "text")]
    assert len(set(val_texts[: val["n_passages"]])) == val["n_passages"]
    train_texts = [s["txt"] for s in read(out, manifest, "train", "text")]
    assert len(set(train_texts)) == len(train_texts)


def test_scan_uses_match_images(rich_set):
    out, manifest = rich_set
    for split in SPLITS:
        record = manifest["sources"]["digit_scans"][split]
        uses = np.zeros(1797, dtype=int)
        for scene, _ in scene_images(out, manifest, split):
            for d in scene["digits"]:
                uses[d["scan"]] += 1
        pool_uses = uses[record["scan_ids"]]
        assert record["uses_mean"] == round(float(pool_uses.mean()), 3)
        assert record["uses_max"] == pool_uses.max()
        assert manifest["repetition"][split]["digit_scan_uses_max"] == record["uses_max"]


def test_repetition_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fusionlab.data.build"):
        manifest = write_sample_set(tmp_path, variant="simple", **TINY)
    messages = [r.getMessage() for r in caplog.records if r.name == "fusionlab.data.build"]
    for split in SPLITS:
        lines = [m for m in messages if m.startswith(f"{split}:")]
        assert len(lines) == 1, messages
        assert "digit scan appears in" in lines[0]
        assert "passes over" in lines[0]
    val_passes = manifest["repetition"]["val"]["text_passes"]
    val_line = next(m for m in messages if m.startswith("val:"))
    assert f"{val_passes:.2f} passes over {VAL_PASSAGES} passages" in val_line
    train_uses = manifest["repetition"]["train"]["digit_scan_uses_mean"]
    assert f"appears in {train_uses:.1f} images" in next(m for m in messages if m.startswith("train:"))


# ---------------------------------------------------------------------------------------------
# Helpers


def test_split_passages_respects_limit():
    paragraph = "word " * 30
    text = "\n\n".join([paragraph.strip()] * 5 + ["x" * 50 + " " + "y" * 300])
    passages = split_passages(text.split("\n\n"), 200)
    assert all(len(p) <= 200 for p in passages)
    assert passages[0] == paragraph.strip()
    # Nothing is lost or reordered. The over-long word is cut, so compare without whitespace.
    assert "".join("".join(passages).split()) == "".join(text.split())
    for split, (pool, _) in passage_pools(_topics, split_topics(_topics), 1500).items():
        assert all(len(p) <= 1500 for p in pool), split


def test_shard_counts_spread_samples():
    assert shard_counts(10, 4, 300) == [2, 3, 2, 3]
    assert shard_counts(2, 4, 300) == [1, 1]
    assert shard_counts(0, 4, 300) == []
    assert shard_counts(1000, 1, 300) == [250, 250, 250, 250]


def test_shard_keys_without_gaps():
    keys = shard_keys([3, 2])
    assert keys == [["000000000", "000000001", "000000002"], ["000000010", "000000011"]]
    with_gaps = shard_keys([300], np.random.default_rng(0), gap_rate=0.02)[0]
    assert len(with_gaps) == 300
    assert int(with_gaps[-1]) == 305


def test_digit_words_and_colours():
    assert DIGIT_WORDS[8] == "eight"
    assert len(set(COLOURS.values())) == len(COLOURS)


# ---------------------------------------------------------------------------------------------
# Output folder and command line


def test_existing_set_needs_overwrite(tmp_path):
    write_sample_set(tmp_path, variant="simple", **TINY)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_sample_set(tmp_path, variant="simple", **TINY)

    (tmp_path / "notes.txt").write_text("keep me")
    manifest = write_sample_set(tmp_path, variant="simple", overwrite=True, **dict(TINY, n_train_scenes=4))
    assert manifest["splits"]["train"]["caption"]["samples_per_shard"] == [1, 1, 1, 1]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.rglob("*.tmp"))


def test_stale_shards_removed_on_overwrite(tmp_path):
    write_sample_set(tmp_path, variant="simple", **dict(TINY, n_train_texts=None))
    n_before = len(list((tmp_path / "text").glob("train-*.tar")))
    write_sample_set(tmp_path, variant="simple", overwrite=True, **dict(TINY, n_train_texts=2))
    assert n_before >= 4
    after = sorted(p.name for p in (tmp_path / "text").glob("train-*.tar"))
    assert after == ["train-000000.tar", "train-000001.tar"]


def test_invalid_count_rejected(tmp_path):
    with pytest.raises(ValueError, match="train caption count must be a non-negative int, got -1"):
        write_sample_set(tmp_path, **dict(TINY, n_train_scenes=-1))


def test_run_sample_cli(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--variant", "simple", "--seed", "3"]
    argv += ["--train-scenes", "8", "--val-scenes", "2", "--train-docs", "4", "--val-docs", "1"]
    argv += ["--train-texts", "8", "--val-texts", "2"]
    assert run_sample(argv) == 0
    printed = capsys.readouterr().out
    assert "caption/train-{000000..000003}.tar" in printed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3
    assert manifest["variant"] == "simple"
    assert manifest["splits"]["val"]["interleaved"]["n_samples"] == 1

    assert run_sample(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_add_sample_parser_dispatches(tmp_path):
    parser = argparse.ArgumentParser(prog="fusionlab data")
    add_sample_parser(parser.add_subparsers(dest="command"))
    counts = ["--train-scenes", "0", "--train-docs", "0", "--val-scenes", "0", "--val-docs", "0"]
    counts += ["--train-texts", "0", "--val-texts", "3", "--train-questions", "0", "--val-questions", "0"]
    args = parser.parse_args(["sample", "--out", str(tmp_path), *counts])
    assert args.func is run_sample
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["caption"] == {
        "pattern": None, "shards": [], "samples_per_shard": [], "n_samples": 0
    }
    assert manifest["splits"]["val"]["text"]["n_samples"] == 3


def test_question_samples_answer_from_their_scene(simple_set):
    from fusionlab.data.formats import conversation_pairs
    from fusionlab.data.questions import QUESTION_KINDS, scene_digits

    out, manifest = simple_set
    kinds = []
    for split in SPLITS:
        samples = read(out, manifest, split, "qa")
        assert len(samples) == manifest["splits"][split]["qa"]["n_samples"] > 0
        for sample in samples:
            meta = json.loads(sample["json"])
            ((question, answer),) = conversation_pairs(meta)
            assert meta["conversations"][0]["value"].startswith("<image>\n")
            pairs = scene_digits(meta["scene"])
            digits = {digit for digit, _ in pairs}
            if meta["kind"] == "count":
                assert answer == str(len(pairs))
            elif meta["kind"] == "presence":
                digit = int(re.search(r"Is there a (\d)\?", question)[1])
                assert answer == ("yes" if digit in digits else "no")
            else:
                cell = re.search(r"Which digit is in the (.+)\?", question)[1]
                assert answer == next((str(d) for d, c in pairs if c == cell), "none")
            kinds.append(meta["kind"])
    assert set(kinds) == set(QUESTION_KINDS)
