"""Shard formats: public layouts read unchanged, bad samples and damaged shards skipped and counted."""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionlab.data.errors import SkipCounter, SkipSample, StrictDataError
from fusionlab.data.formats import Document, SampleDecoder, decode_samples, tar_samples
from test_images import png_header_only

SIZE = 16
BUDGET = 1_000_000


def png(colour=(200, 30, 30), size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes | str]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def read(urls: list[str], data_type: str, counter: SkipCounter | None = None) -> list[Document]:
    counter = counter if counter is not None else SkipCounter()
    decoder = SampleDecoder(data_type, SIZE, BUDGET)
    return list(decode_samples(tar_samples(urls, counter.handler), decoder, counter))


def caption_members(keys, image=png):
    members = []
    for key in keys:
        members += [(f"{key}.jpg" if image is jpeg else f"{key}.png", image()), (f"{key}.txt", f"caption of {key}")]
    return members


def test_img2dataset_layout_with_gaps(tmp_path):
    members = []
    for key in ("000010000", "000010002", "000010005"):  # failed downloads leave gaps
        meta = {"key": key, "url": "http://example.invalid/x.jpg", "caption": "c", "status": "success", "width": 24}
        members += [(f"{key}.jpg", jpeg()), (f"{key}.json", json.dumps(meta)), (f"{key}.txt", f"a photo {key}")]
    shard = write_tar(tmp_path / "00001.tar", members)
    counter = SkipCounter()
    docs = read([shard], "caption", counter)
    assert [doc.key for doc in docs] == ["000010000", "000010002", "000010005"]
    assert all(doc.shard == shard and doc.data_type == "caption" for doc in docs)
    image, text = docs[1].segments
    assert image.shape == (3, SIZE, SIZE)
    assert image.dtype == torch.uint8
    assert text == "a photo 000010002"
    assert counter.totals == {}


def test_interleaved_native_layout(tmp_path):
    data_uri = "data:image/png;base64," + base64.b64encode(png((0, 0, 250))).decode()
    document = {
        "texts": ["First paragraph.", None, "Second.", "Third.", None, None, None],
        "images": [None, "img0.png", None, None, {"base64": base64.b64encode(png((0, 250, 0))).decode()},
                   data_uri, "https://example.invalid/gone.jpg"],
        "metadata": json.dumps([None, {"alt": "red"}, None, None, None, None, None]),  # a JSON string, as in OBELICS
        "general_metadata": json.dumps({"url": "https://example.invalid/page"}),
    }
    shard = write_tar(tmp_path / "il.tar", [("doc7.img0.png", png((250, 0, 0))), ("doc7.json", json.dumps(document))])
    counter = SkipCounter()
    (doc,) = read([shard], "interleaved", counter)
    kinds = ["text" if isinstance(segment, str) else "image" for segment in doc.segments]
    assert kinds == ["text", "image", "text", "image", "image"]
    assert doc.segments[2] == "Second.\n\nThird."
    red, green, blue = doc.segments[1], doc.segments[3], doc.segments[4]
    assert red[0].float().mean() > 240
    assert green[1].float().mean() > 240
    assert blue[2].float().mean() > 240
    assert counter.totals == {"image_url": 1}  # the URL image is dropped, never fetched


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_mmc4_openflamingo_layout(tmp_path):
    document = {
        "url": "https://example.invalid/page",
        "text_list": ["First sentence.", "Second sentence.", "Third sentence."],
        "image_info": [
            {"image_name": "a.jpg", "raw_url": "https://example.invalid/a.jpg", "matched_text_index": 2,
             "matched_sim": 0.3, "image_base64": b64(png((250, 0, 0)))},
            {"image_name": "gone.jpg", "raw_url": "https://example.invalid/gone.jpg", "matched_text_index": 0},
            {"image_name": "c.jpg", "image_base64": b64(png((0, 0, 250)))},  # matched by similarity only
        ],
        "similarity_matrix": [[0.1, 0.2, 0.3], [0.3, 0.1, 0.1], [0.25, 0.2, 0.1]],
        "could_have_url_duplicate": 0,
    }
    shard = write_tar(tmp_path / "000000000.tar", [("5f3a9c.json", json.dumps(document))])
    counter = SkipCounter()
    (doc,) = read([shard], "interleaved", counter)
    kinds = ["text" if isinstance(segment, str) else "image" for segment in doc.segments]
    assert kinds == ["image", "text", "image", "text"]
    assert doc.segments[0][2].float().mean() > 240  # blue, before the sentence of highest similarity
    assert doc.segments[1] == "First sentence.\n\nSecond sentence."
    assert doc.segments[2][0].float().mean() > 240  # red, before its matched_text_index
    assert doc.segments[3] == "Third sentence."
    assert counter.totals == {"missing_image": 1}  # the failed download is dropped, never fetched


def test_mmc4_similarity_only(tmp_path):
    document = {"text_list": ["one", "two"], "image_info": [{"image_base64": b64(png())}],
                "similarity_matrix": [[0.1, 0.9]]}
    shard = write_tar(tmp_path / "s.tar", [("d.json", json.dumps(document))])
    (doc,) = read([shard], "interleaved")
    assert [isinstance(segment, str) for segment in doc.segments] == [True, False, True]
    assert doc.segments[0] == "one"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"text_list": ["a", "b"], "image_info": [{"image_base64": ""}], "similarity_matrix": [[0.1]]},
         "invalid_layout"),
        ({"text_list": ["a"], "image_info": [{"matched_text_index": 3, "image_base64": ""}]}, "invalid_layout"),
        ({"text_list": "a", "image_info": []}, "invalid_layout"),
        ({"text_list": [], "image_info": []}, "empty_text"),
        ({"text_list": ["only text"], "image_info": []}, "no_image"),
    ],
)
def test_mmc4_bad_documents(tmp_path, document, reason):
    shard = write_tar(tmp_path / "s.tar", [("d.json", json.dumps(document))])
    counter = SkipCounter()
    assert read([shard], "interleaved", counter) == []
    assert counter.totals == {reason: 1}


def test_obelics_bare_base64_image(tmp_path):
    document = {"texts": ["caption", None], "images": [None, b64(png((0, 250, 0)))]}
    shard = write_tar(tmp_path / "s.tar", [("d.json", json.dumps(document))])
    (doc,) = read([shard], "interleaved")
    assert doc.segments[1][1].float().mean() > 240


def test_text_layout(tmp_path):
    shard = write_tar(tmp_path / "t.tar", [("k0.txt", "Some prose."), ("k1.txt", "More prose.")])
    docs = read([shard], "text")
    assert [doc.segments for doc in docs] == [["Some prose."], ["More prose."]]


@pytest.mark.parametrize(
    ("data_type", "members", "reason"),
    [
        ("caption", [("k.jpg", b"")] + [("k.txt", "c")], "empty_member"),
        ("caption", [("k.png", png()), ("k.txt", "   \n")], "empty_text"),
        ("caption", [("k.png", png()), ("k.txt", b"")], "empty_text"),
        ("caption", [("k.png", png())], "missing_text"),
        ("caption", [("k.txt", "orphan caption")], "missing_image"),
        ("caption", [("k.png", png()), ("k.jpg", jpeg()), ("k.txt", "c")], "multiple_images"),
        ("caption", [("k.png", b"\x89PNG garbage"), ("k.txt", "c")], "image_undecodable"),
        ("caption", [("k.png", png()), ("k.txt", b"\xff\xfe bad utf-8")], "invalid_text"),
        ("interleaved", [("k.json", "{not json")], "invalid_json"),
        ("interleaved", [("k.json", b"")], "empty_member"),
        ("interleaved", [("k.png", png()), ("k.txt", "c")], "missing_json"),
        ("interleaved", [("k.json", json.dumps({"texts": ["a"], "images": []}))], "invalid_layout"),
        ("interleaved", [("k.json", json.dumps({"texts": ["a", "b"], "images": ["x.png", None]}))], "invalid_layout"),
        ("interleaved", [("k.json", json.dumps({"texts": ["only text"], "images": [None]}))], "no_image"),
        ("text", [("k.png", png()), ("k.txt", "c")], "type_mismatch"),
        ("text", [("k.json", "{}")], "missing_text"),
    ],
)
def test_bad_sample_skipped_with_reason(tmp_path, data_type, members, reason):
    good = [("z.txt", "fine")] if data_type == "text" else caption_members(["z"])
    if data_type == "interleaved":
        good = [("z.img0.png", png()), ("z.json", json.dumps({"texts": ["t", None], "images": [None, "img0.png"]}))]
    shard = write_tar(tmp_path / "s.tar", members + good)
    counter = SkipCounter()
    docs = read([shard], data_type, counter)
    assert [doc.key for doc in docs] == ["z"]
    assert counter.totals == {reason: 1}


def test_interleaved_missing_sibling_dropped(tmp_path):
    document = {"texts": ["a", None, None], "images": [None, "img0.png", "img1.png"]}
    shard = write_tar(tmp_path / "s.tar", [("d.img0.png", png()), ("d.json", json.dumps(document))])
    counter = SkipCounter()
    (doc,) = read([shard], "interleaved", counter)
    assert doc.n_images == 1
    assert counter.totals == {"missing_image": 1}


def test_dotted_key_skipped_with_explanation(tmp_path, caplog):
    members = [("photo.v2.jpg", jpeg()), ("photo.v2.txt", "a dotted caption")] + caption_members(["ok"], jpeg)
    shard = write_tar(tmp_path / "d.tar", members)
    for data_type in ("caption", "text", "interleaved"):
        counter = SkipCounter()
        with caplog.at_level(logging.WARNING):
            docs = read([shard], data_type, counter)
        assert "photo" not in [doc.key for doc in docs]  # never a text-only sample
        assert counter.totals["dotted_key"] == 1
    assert "first dot" in caplog.text
    assert "photo.v2.jpg" in caplog.text


def test_pickled_members_never_loaded(tmp_path):
    marker = tmp_path / "unpickled.marker"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    trap = pickle.dumps(Trap())
    pickle.loads(trap)  # prove the payload works: loading it creates the marker
    assert marker.exists()
    marker.unlink()

    weights = io.BytesIO()
    torch.save({"trap": Trap()}, weights)
    members = [("a.png", png()), ("a.pyd", trap), ("a.txt", "a red square"),
               ("b.pth", weights.getvalue()), ("b.pickle", trap), ("b.png", png()), ("b.txt", "another")]
    shard = write_tar(tmp_path / "p.tar", members)
    raw = list(tar_samples([shard]))
    assert all(set(sample) == {"__key__", "__url__", "__ignored__", "png", "txt"} for sample in raw)
    assert [sample["__ignored__"] for sample in raw] == [["pyd"], ["pth", "pickle"]]
    counter = SkipCounter()
    docs = read([shard], "caption", counter)
    assert [doc.key for doc in docs] == ["a", "b"]
    assert counter.totals == {"ignored_member": 3}
    assert docs[0].segments[1] == "a red square"
    assert not marker.exists()


def truncated_copy(shard: str, member: str, keep: int, out: Path) -> str:
    with tarfile.open(shard) as tar:
        offset = tar.getmember(member).offset_data
    out.write_bytes(Path(shard).read_bytes()[: offset + keep])
    return str(out)


def test_truncated_shard_keeps_intact_samples(tmp_path, caplog):
    full = write_tar(tmp_path / "full.tar", caption_members([f"0{i}" for i in range(1, 6)], jpeg))
    cut = truncated_copy(full, "03.jpg", 100, tmp_path / "cut.tar")
    intact = write_tar(tmp_path / "next.tar", caption_members(["11", "12", "13"], jpeg))
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        docs = read([cut, intact], "caption", counter)
    assert [doc.key for doc in docs] == ["01", "02", "11", "12", "13"]
    assert counter.totals == {"damaged_shard": 1}
    warnings = [record for record in caplog.records if "damaged_shard" in record.getMessage()]
    assert len(warnings) == 1
    assert "cut.tar" in warnings[0].getMessage()
    assert "'03'" in warnings[0].getMessage()


def test_truncated_image_in_valid_shard(tmp_path, caplog):
    members = caption_members(["1", "2", "3"], jpeg)
    members[2] = ("2.jpg", jpeg()[:100])  # only the first 100 bytes of the JPEG
    shard = write_tar(tmp_path / "s.tar", members)
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        docs = read([shard], "caption", counter)
    assert [doc.key for doc in docs] == ["1", "3"]
    assert counter.totals == {"image_undecodable": 1}
    assert "s.tar" in caplog.text
    assert "'2'" in caplog.text


def test_missing_shard_counted(tmp_path):
    intact = write_tar(tmp_path / "ok.tar", caption_members(["1"]))
    counter = SkipCounter()
    docs = read([str(tmp_path / "gone.tar"), intact], "caption", counter)
    assert [doc.key for doc in docs] == ["1"]
    assert counter.totals == {"damaged_shard": 1}


def test_bomb_skipped_and_counted(tmp_path, caplog):
    members = caption_members(["a"]) + [("b.png", png_header_only(20_000, 20_000)), ("b.txt", "bomb")]
    shard = write_tar(tmp_path / "bomb.tar", members + caption_members(["c"]))
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        docs = read([shard], "caption", counter)
    assert [doc.key for doc in docs] == ["a", "c"]
    assert counter.totals == {"image_too_large": 1}
    assert "bomb.tar" in caplog.text
    assert "'b'" in caplog.text
    assert "400000000" in caplog.text


def test_strict_mode_raises(tmp_path):
    members = caption_members(["1"]) + [("2.png", png()), ("2.txt", "")]
    shard = write_tar(tmp_path / "strict.tar", members)
    with pytest.raises(StrictDataError) as caught:
        read([shard], "caption", SkipCounter(strict=True))
    assert "strict.tar" in str(caught.value)
    assert "'2'" in str(caught.value)

    full = write_tar(tmp_path / "full.tar", caption_members(["1", "2", "3"], jpeg))
    cut = truncated_copy(full, "2.jpg", 50, tmp_path / "cut.tar")
    with pytest.raises(StrictDataError, match="cut.tar"):
        read([cut], "caption", SkipCounter(strict=True))


def test_counter_rate_limit_and_drain(caplog):
    counter = SkipCounter(warn_first=2, warn_every=3)
    with caplog.at_level(logging.WARNING):
        for i in range(7):
            counter.skip("s.tar", f"k{i}", SkipSample("empty_text", "x"))
        counter.skip("s.tar", "j", SkipSample("invalid_json", "y"))
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 5  # empty_text 1, 2, 3, 6 and the first invalid_json
    assert counter.drain() == {"skipped/empty_text": 7, "skipped/invalid_json": 1}
    assert counter.drain() == {}
    assert counter.totals["empty_text"] == 7


def test_handler_rejects_other_errors():
    assert SkipCounter().handler(KeyError("not a shard error")) is False


def test_decoder_rejects_unknown_type():
    with pytest.raises(ValueError, match="video"):
        SampleDecoder("video", SIZE, BUDGET)


# ---------------------------------------------------------------------------------------------
# question answering (LLaVA conversations)


def conversation_json(*turns) -> str:
    return json.dumps({"id": "x", "conversations": [{"from": role, "value": value} for role, value in turns]})


def test_qa_reads_llava_conversation(tmp_path):
    members = [
        ("k.jpg", jpeg()),
        ("k.json", conversation_json(("human", "What is shown?\n<image>"), ("gpt", " A red square. "),
                                     ("user", "Is it round?"), ("assistant", "No"))),
    ]
    (doc,) = read([write_tar(tmp_path / "q.tar", members)], "qa")
    from fusionlab.data.formats import Answer

    assert isinstance(doc.segments[0], torch.Tensor)  # the image goes first, wherever <image> is
    assert doc.segments[1:] == [
        " Question: What is shown? Answer:", Answer(" A red square."), " Question: Is it round? Answer:", Answer(" No"),
    ]


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([("k.json", conversation_json(("human", "q"), ("gpt", "a")))], "missing_image"),
        ([("k.png", png())], "missing_json"),
        ([("k.png", png()), ("k.json", json.dumps({"conversations": []}))], "invalid_layout"),
        ([("k.png", png()), ("k.json", conversation_json(("gpt", "a"), ("human", "q")))], "invalid_layout"),
        ([("k.png", png()), ("k.json", conversation_json(("human", "q")))], "invalid_layout"),
        ([("k.png", png()), ("k.json", conversation_json(("human", "q"), ("robot", "a")))], "invalid_layout"),
        ([("k.png", png()), ("k.json", conversation_json((["human"], "q"), ("gpt", "a")))], "invalid_layout"),
        ([("k.png", png()), ("k.json", conversation_json(({"a": 1}, "q"), ("gpt", "a")))], "invalid_layout"),
        ([("k.png", png()), ("k.json", conversation_json(("human", "<image> q <image>"), ("gpt", "a")))], "multiple_images"),
        ([("k.png", png()), ("k.json", conversation_json(("human", "<image>"), ("gpt", "a")))], "empty_text"),
        ([("k.png", png()), ("k.json", conversation_json(("human", "q"), ("gpt", "  ")))], "empty_text"),
    ],
)
def test_bad_qa_sample_skipped_with_reason(tmp_path, members, reason):
    good = [("z.png", png()), ("z.json", conversation_json(("human", "<image>\nq"), ("gpt", "a")))]
    counter = SkipCounter()
    docs = read([write_tar(tmp_path / "q.tar", members + good)], "qa", counter)
    assert [doc.key for doc in docs] == ["z"]
    assert counter.totals == {reason: 1}


def test_sample_texts_reads_conversation_turns():
    from fusionlab.data.formats import sample_texts

    sample = {"json": conversation_json(("human", "<image>\nHow many?"), ("gpt", "2")).encode()}
    assert sample_texts(sample) == ["\nHow many?", "2"]
