"""`fusionlab data build`: write a user's files as shards in the layouts that training reads.

- captions: an image folder plus a table of captions (CSV with a header row, or JSON lines) ->
  img2dataset-layout shards: `{key}.{jpg|jpeg|png|webp}`, `{key}.txt`, `{key}.json` (the table
  row, with the stored image size).
- interleaved: OBELICS-schema records (JSON lines of {"texts": [...], "images": [...]}) whose
  images are already downloaded -> shards in the native interleaved layout: `{key}.json` with the
  images named as sibling members `{key}.img0.png`, ...

Every image is decoded once with the training decoder (pixel budget, truncation, modes), so what
the builder writes, training can read. Rows that cannot be used are skipped and reported with
their line number and reason. Keys are 9-digit running numbers, so they never contain a dot.
Shards are written under a temporary name and renamed once complete; `sizes.json` maps each
shard's file name to its sample count, as open_clip reads it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from fusionlab.data.errors import SkipSample
from fusionlab.data.formats import IMAGE_EXTENSIONS, parallel_lists
from fusionlab.data.images import decode_image

KEY_WIDTH = 9
# A fixed member mtime, so that the same input gives byte-identical shards.
SHARD_MTIME = 0
_URL_PREFIXES = ("http://", "https://", "s3://", "gs://")


@dataclass
class BuildReport:
    """Result of a build: samples and shards written, skipped rows by reason, one line per skipped row."""

    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)

    def skip(self, line: int, error: SkipSample) -> None:
        self.skipped[error.reason] += 1
        self.details.append(f"line {line}: {error.reason}: {error.detail}")

    def format(self, max_listed: int = 20) -> str:
        lines = [f"wrote {self.written:,} samples in {len(self.shards)} shard(s)"]
        lines += [f"  {shard}" for shard in self.shards[:3]]
        if len(self.shards) > 3:
            lines.append(f"  ... {self.shards[-1]}")
        if self.skipped:
            lines.append("skipped, by reason: " + ", ".join(f"{r} {n}" for r, n in self.skipped.most_common()))
            lines += [f"  {detail}" for detail in self.details[:max_listed]]
            if len(self.details) > max_listed:
                lines.append(f"  ... {len(self.details) - max_listed} more")
        return "\n".join(lines)


class ShardWriter:
    """Stream samples into `{prefix}-{NNNNNN}.tar` shards of at most `samples_per_shard` samples."""

    def __init__(self, out: Path, prefix: str, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be at least 1")
        existing = sorted(out.glob(f"{prefix}-*.tar"))
        if existing:
            raise FileExistsError(
                f"{out} already contains shards {existing[0].name} ...: choose another output folder or --prefix"
            )
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.sizes: dict[str, int] = {}
        self._stream = None
        self._sink: wds.TarWriter | None = None
        self._path: Path | None = None

    def write(self, sample: dict) -> None:
        if self._sink is None or self.sizes[self._path.name] == self.samples_per_shard:
            self._finish_shard()
            self._path = self.out / f"{self.prefix}-{len(self.sizes):06d}.tar"
            self._stream = open(self._tmp(self._path), "wb")
            self._sink = wds.TarWriter(self._stream, encoder=False, mtime=SHARD_MTIME)
            self.sizes[self._path.name] = 0
        self._sink.write(sample)
        self.sizes[self._path.name] += 1

    def close(self) -> list[str]:
        """Finish the last shard, write sizes.json and return the shard paths."""
        self._finish_shard()
        (self.out / "sizes.json").write_text(json.dumps(self.sizes, indent=1) + "\n")
        return [str(self.out / name) for name in self.sizes]

    def _finish_shard(self) -> None:
        if self._sink is None:
            return
        self._sink.close()
        self._stream.close()
        os.replace(self._tmp(self._path), self._path)
        self._sink = None

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")


# ---------------------------------------------------------------------------------------------
# reading the user's tables


def read_rows(path: Path) -> Iterator[tuple[int, dict | SkipSample]]:
    """Yield (line number, row) from a CSV file with a header row or a JSON-lines file.

    A JSON line that is not an object is yielded as a SkipSample in place of the row.
    """
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as stream:
            for line, row in enumerate(csv.DictReader(stream), start=2):
                yield line, row
        return
    with open(path, encoding="utf-8") as stream:
        for line, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exn:
                yield line, SkipSample("invalid_json", str(exn))
                continue
            yield line, row if isinstance(row, dict) else SkipSample("invalid_json", "the line is not a JSON object")


def _image_member(path: Path, max_pixels: int) -> tuple[str, bytes, tuple[int, int]]:
    """Return (extension, bytes, stored size) of an image file, re-encoded as PNG if not jpg/png/webp."""
    if not path.is_file():
        raise SkipSample("missing_image", f"image file {str(path)!r} not found")
    data = path.read_bytes()
    img = decode_image(data, max_pixels=max_pixels)  # raises SkipSample for unusable images
    extension = path.suffix.lower().lstrip(".")
    if extension in IMAGE_EXTENSIONS:
        return extension, data, img.size
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return "png", buffer.getvalue(), img.size


# ---------------------------------------------------------------------------------------------
# captions


def build_captions(
    images: Path,
    captions: Path,
    out: Path,
    *,
    image_column: str = "file_name",
    caption_column: str = "caption",
    prefix: str = "train",
    samples_per_shard: int = 10_000,
    max_pixels: int = 64 * 2**20,
) -> BuildReport:
    """Write image-caption shards from an image folder and a captions table (CSV or JSON lines)."""
    report = BuildReport()
    writer = ShardWriter(out, prefix, samples_per_shard)
    for line, row in read_rows(captions):
        try:
            sample = _caption_sample(row, images, image_column, caption_column, max_pixels)
        except SkipSample as skip:
            report.skip(line, skip)
            continue
        key = f"{report.written:0{KEY_WIDTH}d}"
        writer.write({"__key__": key, **sample})
        report.written += 1
    report.shards = writer.close()
    return report


def _caption_sample(row, images: Path, image_column: str, caption_column: str, max_pixels: int) -> dict:
    if isinstance(row, SkipSample):
        raise row
    for column in (image_column, caption_column):
        if not row.get(column):
            raise SkipSample("missing_column", f"no value in column {column!r} (columns: {sorted(row)})")
    caption = str(row[caption_column]).strip()
    if not caption:
        raise SkipSample("empty_text", f"column {caption_column!r} contains no text")
    extension, data, (width, height) = _image_member(images / str(row[image_column]), max_pixels)
    metadata = {**row, "width": width, "height": height}
    return {extension: data, "txt": caption.encode("utf-8"), "json": json.dumps(metadata, ensure_ascii=False).encode()}


# ---------------------------------------------------------------------------------------------
# interleaved documents


def build_interleaved(
    records: Path,
    images: Path,
    out: Path,
    *,
    url_map: Path | None = None,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    max_pixels: int = 64 * 2**20,
) -> BuildReport:
    """Write interleaved shards from OBELICS-schema JSON lines whose images are already downloaded.

    An image entry is found as `url_map[entry]` (a table with columns "url" and "file_name", such
    as a download tool's output list) or as the path `entry` inside `images`. Images that are
    missing or unusable are dropped from their document; a document left without an image or
    without text is skipped.
    """
    files = _read_url_map(url_map) if url_map is not None else {}
    report = BuildReport()
    writer = ShardWriter(out, prefix, samples_per_shard)
    for line, row in read_rows(records):
        key = f"{report.written:0{KEY_WIDTH}d}"
        try:
            sample = _interleaved_sample(row, key, images, files, max_pixels, lambda skip: report.skip(line, skip))
        except SkipSample as skip:
            report.skip(line, skip)
            continue
        writer.write(sample)
        report.written += 1
    report.shards = writer.close()
    return report


def _interleaved_sample(row, key: str, images: Path, files: dict[str, str], max_pixels: int, on_image_skip) -> dict:
    if isinstance(row, SkipSample):
        raise row
    texts, entries = parallel_lists(row)

    keep = []  # indices that stay in the document
    out_images: list[str | None] = []
    members: dict[str, bytes] = {}
    for index, (text, entry) in enumerate(zip(texts, entries)):
        if text is not None:
            keep.append(index)
            out_images.append(None)
            continue
        try:
            extension, data, _ = _image_member(_image_path(entry, images, files), max_pixels)
        except SkipSample as skip:
            on_image_skip(skip)
            continue
        name = f"img{len(members)}.{extension}"
        members[name] = data
        keep.append(index)
        out_images.append(name)

    if not members:
        raise SkipSample("no_image", f"no image of the {sum(e is not None for e in entries)} listed could be used")
    if not any(texts[i] and texts[i].strip() for i in keep):
        raise SkipSample("empty_text", "the document contains no text")

    document = {"texts": [texts[i] for i in keep], "images": out_images}
    metadata = _aligned_metadata(row.get("metadata"), len(texts))
    if metadata is not None:
        document["metadata"] = [metadata[i] for i in keep]
    if "general_metadata" in row:
        document["general_metadata"] = row["general_metadata"]
    return {"__key__": key, "json": json.dumps(document, ensure_ascii=False).encode(), **members}


def _image_path(entry, images: Path, files: dict[str, str]) -> Path:
    if not isinstance(entry, str):
        raise SkipSample("invalid_layout", f"image entry is a {type(entry).__name__}, expected a URL or a path")
    if entry in files:
        return images / files[entry]
    if entry.startswith(_URL_PREFIXES):
        raise SkipSample("missing_image", f"image URL {entry[:100]!r} is not in the URL map (--url-map)")
    return images / entry


def _aligned_metadata(metadata, length: int) -> list | None:
    # OBELICS stores per-index metadata as a JSON string of a list aligned with texts and images.
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return None
    return metadata if isinstance(metadata, list) and len(metadata) == length else None


def _read_url_map(path: Path) -> dict[str, str]:
    files = {}
    for line, row in read_rows(path):
        if isinstance(row, SkipSample) or not row.get("url") or not row.get("file_name"):
            raise ValueError(f"{path} line {line}: the URL map needs columns 'url' and 'file_name'")
        files[row["url"]] = row["file_name"]
    return files
