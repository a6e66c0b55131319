"""Readers for caption, interleaved and text samples in the public WebDataset layouts.

Layouts, by source type:

- caption (img2dataset, LAION, DataComp, CC12M): `{key}.jpg|jpeg|png|webp` and `{key}.txt`, with an
  optional `{key}.json` of metadata that is tolerated and never parsed. Keys may have gaps.
- interleaved, two layouts of `{key}.json`:
  - the OBELICS schema with the bytes inside the tar, as Megatron-Energon stores it:
    {"texts": [...], "images": [...]}, two lists of equal length with exactly one non-null entry per
    index. An image entry is the name of a sibling member ("img0.png" for member
    `{key}.img0.png`), a {"base64": ...} object, a base64 data: URI or a bare base64 string.
    Other fields such as "metadata" are ignored.
  - MMC4 as OpenFlamingo's converter writes it: {"text_list": [...], "image_info": [{...,
    "image_base64": ...}], "similarity_matrix": [[...]]}; each image is placed before its matched
    sentence (see _mmc4_lists).
  Images given only as URLs, or MMC4 images without image_base64, are dropped and counted, never
  fetched.
- text: `{key}.txt` (a `{key}.json` beside it is ignored).
- qa (question answering, LLaVA's instruction layout): one image member and `{key}.json` =
  {"conversations": [{"from": "human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value":
  "Answer"}, ...]}, turns alternating from "human" (or "user") to "gpt" (or "assistant"). The image
  goes first, as LLaVA's preprocessing puts it, wherever `<image>` is. Each question becomes
  `qa_prompt(question)` and each answer an `Answer` segment, the only text that gets targets.

Only allow-listed members (the image extensions above, txt, json) are ever read from a tar, and
nothing is ever unpickled: `.pyd`, `.pth` or `.pickle` members are skipped unread.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from fusionlab.batch import DATA_TYPES
from fusionlab.data.errors import ShardReadError, SkipCounter, SkipSample
from fusionlab.data.questions import IMAGE_PLACEHOLDER, qa_prompt
from fusionlab.data.images import decode_image, image_to_tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# TODO(formats): add "tiff" with multi-frame reading for MINT-1T PDF shards once a real shard is checked.
ALLOWED_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json"))

# Errors that mean a shard cannot be opened or read further (gzip errors are OSErrors).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, such as __index__
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")



@dataclass(frozen=True)
class Answer:
    """Text the model learns to produce. In a document with answers, only they get targets."""

    text: str


Segment = str | torch.Tensor | Answer


@dataclass
class Document:
    """One sample in reading order: text strings and uint8 image tensors [3, S, S]."""

    key: str
    shard: str
    data_type: str  # one of fusionlab.batch.DATA_TYPES
    segments: list[Segment]

    @property
    def n_images(self) -> int:
        return sum(isinstance(segment, torch.Tensor) for segment in self.segments)


# ---------------------------------------------------------------------------------------------
# tar shards -> raw samples


def is_allowed_member(extension: str) -> bool:
    """True for a member extension that may be read: its last part is an image type, txt or json."""
    return extension.rsplit(".", 1)[-1].lower() in ALLOWED_EXTENSIONS


def tar_samples(urls: Iterable[str], handler: Callable[[Exception], bool] | None = None) -> Iterator[dict]:
    """Read raw samples {"__key__", "__url__", extension: bytes} from tar shards, in order.

    Members that are not allow-listed are never read; their extensions are listed under
    "__ignored__" so that the decoder can count them.

    Members are grouped into samples as webdataset does: the key is the member name up to the first
    dot of its base name. A shard that fails to open or read gives `handler` one ShardReadError
    naming the shard and the key being read. The sample being read and the rest of that shard are
    lost. The handler returns True to go on with the next shard, and otherwise the error is raised.
    """
    for url in urls:
        yield from _read_shard(url, handler)


def _read_shard(url: str, handler: Callable[[Exception], bool] | None) -> Iterator[dict]:
    sample: dict | None = None
    key: str | None = None
    stream = None
    try:
        stream = wds.gopen(url)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # stream mode keeps every header otherwise
                member_key, extension = base_plus_ext(info.name) if info.isreg() else (None, None)
                if member_key is None or _META_MEMBER.match(info.name):
                    continue
                key = member_key
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                extension = extension.lower()
                if not is_allowed_member(extension):
                    sample.setdefault("__ignored__", []).append(extension)
                    continue  # never read, so never decoded or unpickled
                if extension in sample:
                    sample["__duplicate__"] = extension
                sample[extension] = tar.extractfile(info).read()
        if sample is not None:
            yield sample
            sample = None
        stream.close()  # a pipe: URL reports its command's exit status here
        stream = None
    except SHARD_ERRORS as exn:
        error = ShardReadError(url, key, exn)
        if handler is None or not handler(error):
            raise error from exn
    finally:
        if stream is not None:
            _close_quietly(stream)


def _close_quietly(stream) -> None:
    # Closing a pipe: stream early kills its command, which then reports a failing exit status.
    try:
        stream.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# raw samples -> documents


class SampleDecoder:
    """Decode a raw sample of one source type into a Document, or raise SkipSample with a reason.

    Images become uint8 tensors [3, image_size, image_size] (see images.image_to_tensor). A bad
    image of an interleaved document is dropped and passed to `on_image_skip`, and the rest of the
    document is kept. Without `on_image_skip`, the whole document is skipped.
    """

    def __init__(
        self,
        data_type: str,
        image_size: int,
        max_pixels: int,
        *,
        random_crop: bool = False,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        if data_type not in DATA_TYPES:
            raise ValueError(f"unknown source type {data_type!r}: use one of {DATA_TYPES}")
        self.data_type = data_type
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.random_crop = random_crop
        self.hflip = hflip
        self.rng = random.Random(seed)

    def __call__(self, sample: dict, on_image_skip: Callable[[SkipSample], None] | None = None) -> Document:
        _check_dotted_key(sample, self.data_type)
        if "__duplicate__" in sample:
            raise SkipSample("duplicate_member", f"member {sample['__duplicate__']!r} appears twice under this key")
        if self.data_type == "caption":
            segments = self._caption(sample)
        elif self.data_type == "interleaved":
            segments = self._interleaved(sample, on_image_skip)
        elif self.data_type == "qa":
            segments = self._qa(sample)
        else:
            segments = self._text(sample)
        return Document(sample["__key__"], sample["__url__"], self.data_type, segments)

    def image(self, data: bytes) -> torch.Tensor:
        img = decode_image(data, max_pixels=self.max_pixels)
        return image_to_tensor(img, self.image_size, random_crop=self.random_crop, hflip=self.hflip, rng=self.rng)

    def _caption(self, sample: dict) -> list[Segment]:
        image = self._single_image(sample, "caption")
        caption = _text_member(sample)
        return [self.image(image), caption]

    def _single_image(self, sample: dict, kind: str) -> bytes:
        found = [extension for extension in IMAGE_EXTENSIONS if extension in sample]
        if not found:
            raise SkipSample("missing_image", f"{kind} sample without an image member ({_members(sample)})")
        if len(found) > 1:
            raise SkipSample("multiple_images", f"{kind} sample with several image members {found}")
        return sample[found[0]]

    def _qa(self, sample: dict) -> list[Segment]:
        segments: list[Segment] = [self.image(self._single_image(sample, "question-answering"))]
        for question, answer in conversation_pairs(_json_member(sample)):
            segments += [qa_prompt(question), Answer(" " + answer)]
        return segments

    def _text(self, sample: dict) -> list[Segment]:
        found = [extension for extension in IMAGE_EXTENSIONS if extension in sample]
        if found:
            raise SkipSample(
                "type_mismatch",
                f"sample of a text source has image members {found}: declare the source as caption",
            )
        return [_text_member(sample)]

    def _interleaved(self, sample: dict, on_image_skip) -> list[Segment]:
        document = _json_member(sample)
        if isinstance(document, dict) and "text_list" in document:
            texts, images = _mmc4_lists(document)
        else:
            texts, images = parallel_lists(document)
        segments: list[Segment] = []
        for text, entry in zip(texts, images):
            if text is not None:
                _append_text(segments, text)
                continue
            try:
                segments.append(self.image(_image_bytes(sample, entry)))
            except SkipSample as skip:
                if on_image_skip is None:
                    raise
                on_image_skip(skip)
        if not any(isinstance(segment, torch.Tensor) for segment in segments):
            raise SkipSample("no_image", f"interleaved document without a usable image ({len(images)} entries)")
        if not any(isinstance(segment, str) for segment in segments):
            raise SkipSample("empty_text", "interleaved document without text")
        return segments


def decode_samples(samples: Iterable[dict], decoder: SampleDecoder, counter: SkipCounter) -> Iterator[Document]:
    """Decode raw samples into Documents, passing every skipped sample or image to `counter`."""
    for sample in samples:
        shard, key = sample["__url__"], sample["__key__"]
        for extension in sample.get("__ignored__", ()):
            detail = f"member {key}.{extension} is not an image, txt or json member, so it is never read (nor unpickled)"
            counter.skip(shard, key, SkipSample("ignored_member", detail))

        def on_image_skip(skip: SkipSample) -> None:
            counter.skip(shard, key, skip)

        try:
            document = decoder(sample, on_image_skip)
        except SkipSample as skip:
            counter.skip(shard, key, skip)
            continue
        yield document


def sample_texts(sample: dict) -> list[str]:
    """Return the text of a raw sample of any type without decoding images (for tokenizer training).

    Text comes from the txt member, the "texts" of an OBELICS-schema json, the "text_list" of an
    MMC4 json or the turns of a LLaVA "conversations" json. Members that are not valid UTF-8 or JSON give no text.
    """
    texts = []
    if "txt" in sample:
        try:
            texts.append(sample["txt"].decode("utf-8"))
        except UnicodeDecodeError:
            pass
    if "json" in sample:
        try:
            document = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            document = None
        if isinstance(document, dict):
            listed = document.get("texts") or document.get("text_list") or []
            texts += [text for text in listed if isinstance(text, str)] if isinstance(listed, list) else []
            turns = document.get("conversations")
            if isinstance(turns, list):
                texts += [turn["value"].replace(IMAGE_PLACEHOLDER, "") for turn in turns
                          if isinstance(turn, dict) and isinstance(turn.get("value"), str)]
    return [text for text in texts if text.strip()]


def _members(sample: dict) -> str:
    names = [f"{sample['__key__']}.{extension}" for extension in sample if not extension.startswith("__")]
    return "members: " + (", ".join(names) if names else "none that are allow-listed")


def _check_dotted_key(sample: dict, data_type: str) -> None:
    dotted = [extension for extension in sample if "." in extension and not extension.startswith("__")]
    if data_type == "interleaved":
        # `{key}.img0.png` is how interleaved documents name their images; only json/txt reveal a dot.
        dotted = [extension for extension in dotted if extension.rsplit(".", 1)[-1] in ("json", "txt")]
    if dotted:
        names = [f"{sample['__key__']}.{extension}" for extension in dotted]
        raise SkipSample(
            "dotted_key",
            f"members {names} come from a sample key that contains a dot: webdataset takes the key up to "
            f"the first dot of a file name, so these files were read as extensions {dotted} of key "
            f"{sample['__key__']!r}; rename the samples without dots in their keys (for example with '_')",
        )


def _text_member(sample: dict) -> str:
    if "txt" not in sample:
        raise SkipSample("missing_text", f"no txt member ({_members(sample)})")
    try:
        text = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise SkipSample("invalid_text", f"txt member is not UTF-8: {exn}") from exn
    if not text.strip():
        raise SkipSample("empty_text", f"txt member of {len(sample['txt'])} bytes contains no text")
    return text.strip()


def _json_member(sample: dict):
    if "json" not in sample:
        raise SkipSample("missing_json", f"sample without a json member ({_members(sample)})")
    if not sample["json"]:
        raise SkipSample("empty_member", "zero-byte json member")
    try:
        return json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise SkipSample("invalid_json", f"{type(exn).__name__}: {exn}") from exn


_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def conversation_pairs(document) -> list[tuple[str, str]]:
    """Return the (question, answer) pairs of a LLaVA conversation, without the `<image>` marker."""
    turns = document.get("conversations") if isinstance(document, dict) else None
    if not isinstance(turns, list) or not turns:
        raise SkipSample("invalid_layout", 'question-answering json must be an object with a non-empty list "conversations"')
    roles, values = [], []
    for index, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise SkipSample("invalid_layout", f'conversations[{index}] must be {{"from": "human" or "gpt", "value": text}}')
        roles.append(role)
        values.append(value)
    if roles != ["human", "gpt"] * (len(turns) // 2) or len(turns) % 2:
        raise SkipSample("invalid_layout", f"conversation turns must alternate human, gpt and end with gpt; got {roles}")
    if sum(value.count(IMAGE_PLACEHOLDER) for value in values) > 1:
        raise SkipSample("multiple_images", "the conversation marks more than one image; one image per sample is supported")
    pairs = []
    for question, answer in zip(values[::2], values[1::2]):
        question = " ".join(question.replace(IMAGE_PLACEHOLDER, " ").split())
        if not question or not answer.strip():
            raise SkipSample("empty_text", "a conversation turn has no text")
        pairs.append((question, answer.strip()))
    return pairs


def parallel_lists(document) -> tuple[list, list]:
    """Return the "texts" and "images" lists of an OBELICS-schema document, checked for shape."""
    if not isinstance(document, dict) or not isinstance(document.get("texts"), list):
        raise SkipSample("invalid_layout", 'interleaved json must be an object with lists "texts" and "images"')
    texts, images = document["texts"], document.get("images")
    if not isinstance(images, list) or len(images) != len(texts):
        raise SkipSample("invalid_layout", '"texts" and "images" must be lists of equal length')
    for index, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SkipSample("invalid_layout", f"index {index} must have exactly one of text and image")
        if text is not None and not isinstance(text, str):
            raise SkipSample("invalid_layout", f"texts[{index}] is a {type(text).__name__}, expected a string")
    return texts, images


def _mmc4_lists(document: dict) -> tuple[list, list]:
    """Turn an MMC4 document (OpenFlamingo's WebDataset form) into parallel texts/images lists.

    Each image goes right before the sentence it is matched to: its `matched_text_index` (MMC4's
    own assignment) when present, otherwise the sentence of highest CLIP similarity in its row of
    `similarity_matrix` (rows are images, columns sentences), as OpenFlamingo's reader does.
    Several images matched to one sentence keep their order.
    """
    sentences, infos = document["text_list"], document.get("image_info", [])
    if not isinstance(sentences, list) or not all(isinstance(sentence, str) for sentence in sentences):
        raise SkipSample("invalid_layout", '"text_list" must be a list of strings')
    if not isinstance(infos, list) or not all(isinstance(info, dict) for info in infos):
        raise SkipSample("invalid_layout", '"image_info" must be a list of objects')
    if not sentences:
        raise SkipSample("empty_text", "MMC4 document with an empty text_list")
    attached: list[list] = [[] for _ in sentences]
    for index, info in enumerate(infos):
        sentence = _matched_sentence(info, index, document.get("similarity_matrix"), len(sentences))
        attached[sentence].append(_mmc4_image(info, index))
    texts, images = [], []
    for sentence, entries in zip(sentences, attached):
        texts += [None] * len(entries) + [sentence]
        images += entries + [None]
    return texts, images


def _matched_sentence(info: dict, index: int, similarity, n_sentences: int) -> int:
    matched = info.get("matched_text_index")
    if matched is None and isinstance(similarity, list) and index < len(similarity):
        row = similarity[index]
        if isinstance(row, list) and len(row) == n_sentences and all(isinstance(x, (int, float)) for x in row):
            matched = max(range(n_sentences), key=row.__getitem__)
    if isinstance(matched, bool) or not isinstance(matched, int) or not 0 <= matched < n_sentences:
        raise SkipSample(
            "invalid_layout",
            f"image_info[{index}] has no usable matched_text_index ({matched!r}) and no similarity_matrix row "
            f"of {n_sentences} numbers to match it to a sentence",
        )
    return matched


def _mmc4_image(info: dict, index: int):
    if "image_base64" in info:
        return {"base64": info["image_base64"]}
    # OpenFlamingo's converter leaves out image_base64 where the download failed.
    return SkipSample(
        "missing_image",
        f"image_info[{index}] ({info.get('image_name')!r}) has no image_base64, so its download failed; "
        "images are never fetched while training",
    )


def _append_text(segments: list[Segment], text: str) -> None:
    text = text.strip()
    if not text:
        return
    if segments and isinstance(segments[-1], str):
        segments[-1] += "\n\n" + text  # consecutive paragraphs
    else:
        segments.append(text)


def _image_bytes(sample: dict, entry) -> bytes:
    if isinstance(entry, SkipSample):
        raise entry
    if isinstance(entry, dict):
        if "base64" in entry:
            return _from_base64(entry["base64"])
        if "url" in entry:
            entry = entry["url"]
        else:
            raise SkipSample("invalid_layout", f"image entry with keys {sorted(entry)} has neither base64 nor url")
    if not isinstance(entry, str):
        raise SkipSample("invalid_layout", f"image entry is a {type(entry).__name__}, expected a string or object")
    if entry.startswith("data:"):
        header, _, payload = entry.partition(",")
        if not header.endswith(";base64"):
            raise SkipSample("invalid_base64", f"data: URI {header!r} is not base64")
        return _from_base64(payload)
    if "." not in entry:
        # Member names carry an extension, and the base64 alphabet has no dot.
        return _from_base64(entry)
    if _URL.match(entry):
        raise SkipSample(
            "image_url",
            f"image {entry[:100]!r} is given only as a URL and is never fetched while training: "
            "download the images into the shards first (for example with img2dataset)",
        )
    return _sibling_member(sample, entry)


def _sibling_member(sample: dict, name: str) -> bytes:
    extension = name.lower()
    prefix = sample["__key__"].lower() + "."
    if extension.startswith(prefix):
        extension = extension[len(prefix):]
    if extension.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
        raise SkipSample("unsupported_image", f"image member {name!r} is not one of {IMAGE_EXTENSIONS}")
    if extension not in sample:
        raise SkipSample("missing_image", f"image member {sample['__key__']}.{extension} named in the json is not in the shard")
    return sample[extension]


def _from_base64(payload) -> bytes:
    if not isinstance(payload, str):
        raise SkipSample("invalid_base64", f"base64 image is a {type(payload).__name__}, expected a string")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as exn:
        raise SkipSample("invalid_base64", str(exn)) from exn
