"""`fusionlab data inspect | build | tokenizer`: reports, shards written from user files, a BPE file."""

from __future__ import annotations

import base64
import csv
import json
from itertools import islice

import pytest
from PIL import Image

from fusionlab.cli import main
from fusionlab.data.datamodule import FusionDataModule, Source
from fusionlab.data.errors import SkipCounter
from fusionlab.data.formats import SampleDecoder, decode_samples, tar_samples
from fusionlab.data.tokenizer import SPECIAL_TOKENS, HFTokenizer, load_tokenizer, special_ids
from test_formats import caption_members, jpeg, png, write_tar
from test_images import png_header_only


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def mixed_shards(tmp_path) -> str:
    mmc4 = {"text_list": ["sample m0.", "more."], "image_info": [
        {"image_base64": base64.b64encode(png(size=(40, 30))).decode(), "matched_text_index": 1}]}
    obelics = {"texts": ["sample i0.", None], "images": [None, "img0.png"]}
    members = caption_members(["c0", "c1"]) + [
        ("c2.png", png_header_only(20_000, 20_000)), ("c2.txt", "a bomb"),
        ("i0.img0.png", png(size=(64, 48))), ("i0.json", json.dumps(obelics)),
        ("m0.json", json.dumps(mmc4)),
        ("bad.json", "{not json"),
        ("t0.txt", "sample t0. Some prose."), ("t1.txt", "  "),
    ]
    write_tar(tmp_path / "mixed-0.tar", members)
    write_tar(tmp_path / "mixed-1.tar", [("t2.txt", "sample t2.")])
    return str(tmp_path / "mixed-{0..1}.tar")


def test_inspect_reports_types_sizes_and_skips(mixed_shards, capsys):
    code, out, _ = run_cli(["data", "inspect", mixed_shards, "--json", "--image-size", "16", "--patch-size", "4"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["shards"] == 2
    types = report["types"]
    assert {name: entry["samples"] for name, entry in types.items()} == {"caption": 2, "interleaved": 2, "text": 2}
    assert types["interleaved"]["images"] == 2
    assert types["caption"]["images"] == 2
    # byte tokenizer: "sample t0. Some prose." (22) + "sample t2." (10)
    assert types["text"]["text_tokens"] == 32
    assert types["text"]["positions"] == 32 + 2 * 2
    assert types["caption"]["positions"] == types["caption"]["text_tokens"] + 2 * 2 + 2 * (16 + 2)
    assert report["image_sizes"]["count"] == 4
    assert report["image_sizes"]["max"] == "64x48"
    skipped = {(record["key"], record["reason"]) for record in report["skipped"]}
    assert skipped == {("c2", "image_too_large"), ("bad", "invalid_json"), ("t1", "empty_text")}
    assert all(record["shard"].endswith("mixed-0.tar") for record in report["skipped"])


def test_inspect_text_report(mixed_shards, capsys):
    code, out, _ = run_cli(["data", "inspect", mixed_shards], capsys)
    assert code == 0
    assert "6 usable samples, 3 skipped" in out
    assert "image_too_large 1" in out
    assert "mixed-0.tar  c2  image_too_large: " in out


def test_inspect_missing_pattern(tmp_path, capsys):
    code, _, err = run_cli(["data", "inspect", str(tmp_path / "none-*.tar")], capsys)
    assert code == 2
    assert "none-*.tar" in err


def image_file(path, mode="RGB", size=(20, 16), fmt=None):
    Image.new(mode, size, 120).save(path, fmt)
    return path.name


def test_build_captions(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rows = [
        {"file_name": image_file(images / "a.png"), "caption": "sample a.", "source": "mine"},
        {"file_name": image_file(images / "b.jpg"), "caption": "sample b.", "source": "mine"},
        {"file_name": image_file(images / "c.bmp", size=(30, 10)), "caption": "sample c.", "source": "mine"},
        {"file_name": "missing.png", "caption": "gone", "source": "mine"},
        {"file_name": image_file(images / "d.png"), "caption": " ", "source": "mine"},
    ]
    (images / "e.jpg").write_bytes(jpeg()[:100])
    rows.append({"file_name": "e.jpg", "caption": "truncated", "source": "mine"})
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["file_name", "caption", "source"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "shards"
    code, printed, _ = run_cli(["data", "build", "captions", "--images", str(images), "--captions", str(table),
                                "--out", str(out), "--samples-per-shard", "2"], capsys)
    assert code == 0
    assert "wrote 3 samples in 2 shard(s)" in printed
    assert "line 5: missing_image" in printed
    assert "line 6: empty_text" in printed
    assert "line 7: image_undecodable" in printed
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 2, "train-000001.tar": 1}

    raw = list(tar_samples(sorted(str(p) for p in out.glob("*.tar"))))
    assert [sample["__key__"] for sample in raw] == ["000000000", "000000001", "000000002"]
    assert [sorted(k for k in sample if not k.startswith("__")) for sample in raw] == [
        ["json", "png", "txt"], ["jpg", "json", "txt"], ["json", "png", "txt"]]  # the bmp became a png
    assert json.loads(raw[2]["json"]) == {"file_name": "c.bmp", "caption": "sample c.", "source": "mine",
                                          "width": 30, "height": 10}
    counter = SkipCounter()
    documents = list(decode_samples(raw, SampleDecoder("caption", 8, 10**6), counter))
    assert [document.segments[1] for document in documents] == ["sample a.", "sample b.", "sample c."]
    assert counter.totals == {}

    again = run_cli(["data", "build", "captions", "--images", str(images), "--captions", str(table),
                     "--out", str(out)], capsys)
    assert again[0] == 2
    assert "already contains shards" in again[2]


def test_build_captions_from_json_lines(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    lines = [json.dumps({"image": image_file(images / "a.webp", fmt="WEBP"), "text": "sample a."}), "[1, 2]", "{bad"]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    code, printed, _ = run_cli(["data", "build", "captions", "--images", str(images), "--captions",
                                str(tmp_path / "captions.jsonl"), "--image-column", "image", "--caption-column",
                                "text", "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "wrote 1 samples" in printed
    assert "invalid_json 2" in printed
    (sample,) = tar_samples([str(tmp_path / "out" / "train-000000.tar")])
    assert "webp" in sample


def test_build_interleaved(tmp_path, capsys):
    images = tmp_path / "downloads"
    images.mkdir()
    image_file(images / "00001.jpg")
    image_file(images / "00002.png", size=(12, 12))
    image_file(images / "local.png")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    url_map = tmp_path / "urls.csv"
    url_map.write_text("url,file_name\nhttps://example.invalid/a.jpg,00001.jpg\nhttps://example.invalid/b.png,00002.png\n")
    records = [
        {"texts": ["sample d0.", None, "between", None, None],
         "images": [None, "https://example.invalid/a.jpg", None, "https://example.invalid/gone.jpg", "local.png"],
         "metadata": json.dumps([None, {"alt": "a"}, None, {"alt": "gone"}, {"alt": "local"}]),
         "general_metadata": json.dumps({"url": "https://example.invalid/page"})},
        {"texts": ["sample d1.", None], "images": [None, "broken.png"]},  # no usable image: skipped
        {"texts": [None, "sample d2."], "images": ["https://example.invalid/b.png", None]},
        {"texts": ["a"], "images": []},
    ]
    lines = [json.dumps(record) for record in records] + ["not json"]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    code, printed, _ = run_cli(["data", "build", "interleaved", "--records", str(tmp_path / "docs.jsonl"),
                                "--images", str(images), "--url-map", str(url_map), "--out", str(out)], capsys)
    assert code == 0
    assert "wrote 2 samples" in printed
    for expected in ("line 1: missing_image", "line 2: image_undecodable", "line 2: no_image",
                     "line 4: invalid_layout", "line 5: invalid_json"):
        assert expected in printed

    raw = list(tar_samples([str(out / "train-000000.tar")]))
    first = json.loads(raw[0]["json"])
    assert first["images"] == [None, "img0.jpg", None, "img1.png"]
    assert first["texts"] == ["sample d0.", None, "between", None]
    assert [entry and entry["alt"] for entry in first["metadata"]] == [None, "a", None, "local"]
    assert set(raw[0]) >= {"img0.jpg", "img1.png"}
    counter = SkipCounter()
    documents = list(decode_samples(raw, SampleDecoder("interleaved", 8, 10**6), counter))
    assert counter.totals == {}
    assert [document.n_images for document in documents] == [2, 1]
    assert documents[1].segments[1] == "sample d2."


def test_tokenizer_trained_on_shards(tmp_path, mixed_shards, capsys):
    out = tmp_path / "tok" / "bpe.json"
    code, printed, _ = run_cli(["data", "tokenizer", mixed_shards, "--out", str(out), "--vocab-size", "300",
                                "--min-frequency", "1"], capsys)
    assert code == 0
    tok = load_tokenizer(str(out))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size % 64 == 0
    assert tok.vocab_size == 320  # 300 trained, padded with reserved tokens
    assert f"vocabulary of {tok.vocab_size}" in printed
    assert set(special_ids(tok).values()) < set(range(tok.vocab_size))
    ids = tok.encode("sample t0. Some prose.")
    assert tok.decode(ids) == "sample t0. Some prose."
    assert len(ids) < len("sample t0. Some prose.")  # merges were learned from the shards

    dm = FusionDataModule([Source(mixed_shards, "text")], tokenizer=str(out), image_size=8, patch_size=4,
                          context=32, batch_size=2)
    assert dm.vocab_size == 320
    batch = next(islice(dm.train_dataloader(), 1))
    assert int(batch.tokens.max()) < 320


def test_tokenizer_small_corpus_still_padded(tmp_path, mixed_shards, capsys):
    out = tmp_path / "bpe.json"
    code, printed, _ = run_cli(["data", "tokenizer", mixed_shards, "--out", str(out)], capsys)
    assert code == 0
    assert "fewer than the 50432 requested" in printed
    assert load_tokenizer(str(out)).vocab_size % 64 == 0
    added = {entry["content"] for entry in json.loads(out.read_text())["added_tokens"] if entry["special"]}
    assert set(SPECIAL_TOKENS.values()) <= added


def test_tokenizer_rejects_other_suffix(tmp_path, mixed_shards, capsys):
    code, _, err = run_cli(["data", "tokenizer", mixed_shards, "--out", str(tmp_path / "bpe.txt")], capsys)
    assert code == 2
    assert ".json" in err


def test_inspect_guesses_question_answering(tmp_path, capsys):
    conversation = {"conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}]}
    members = caption_members(["c0"]) + [("q0.png", png()), ("q0.json", json.dumps(conversation))]
    shard = write_tar(tmp_path / "qa.tar", members)
    code, out, _ = run_cli(["data", "inspect", shard, "--json"], capsys)
    assert code == 0
    types = json.loads(out)["types"]
    assert types["qa"]["samples"] == 1
    assert types["caption"]["samples"] == 1
    # byte tokenizer: " Question: How many? Answer:" (28) + " 2" (2)
    assert types["qa"]["text_tokens"] == 30
