"""`fusionlab data inspect`: what a set of shards contains, and every sample that training would skip.

The shards go through the same readers and decoders as training (formats.py), so a sample listed
here as skipped is exactly one that a training run would skip and count, for the same reason.
"""

from __future__ import annotations

import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from fusionlab.batch import DATA_TYPES
from fusionlab.data.errors import SkipCounter, SkipSample
from fusionlab.data.formats import IMAGE_EXTENSIONS, Answer, SampleDecoder, decode_samples, tar_samples
from fusionlab.data.tokenizer import Tokenizer


@dataclass
class SkipRecord:
    shard: str
    key: str | None
    reason: str
    detail: str


@dataclass
class ShardReport:
    """Counts per data type, image sizes and skipped samples of a set of shards."""

    shards: list[str]
    samples: Counter = field(default_factory=Counter)  # usable documents per type
    text_tokens: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)

    def as_dict(self, tokens_per_image: int | None) -> dict:
        types = {}
        for name in DATA_TYPES:
            if not self.samples[name]:
                continue
            entry = {"samples": self.samples[name], "text_tokens": self.text_tokens[name], "images": self.images[name]}
            if tokens_per_image is not None:
                entry["positions"] = self.positions(name, tokens_per_image)
            types[name] = entry
        return {
            "shards": len(self.shards),
            "types": types,
            "image_sizes": _size_summary(self.image_sizes),
            "skipped_by_reason": dict(Counter(record.reason for record in self.skipped)),
            "skipped": [vars(record) for record in self.skipped],
        }

    def positions(self, data_type: str, tokens_per_image: int) -> int:
        """Packed positions of a type: text tokens, <bos> and <eos> per document, and every image."""
        return (
            self.text_tokens[data_type]
            + 2 * self.samples[data_type]
            + self.images[data_type] * (tokens_per_image + 2)
        )


class _RecordingCounter(SkipCounter):
    """A SkipCounter that keeps every loss, instead of logging at a bounded rate or raising."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[SkipRecord] = []

    def skip(self, shard: str, key: str | None, error: SkipSample) -> None:
        self.totals[error.reason] += 1
        self.records.append(SkipRecord(shard, key, error.reason, error.detail))


class _SizeRecordingDecoder(SampleDecoder):
    """A SampleDecoder that also notes the stored width and height of every image it accepts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[tuple[int, int]] = []

    def image(self, data: bytes):
        tensor = super().image(data)
        with Image.open(io.BytesIO(data)) as img:
            self.sizes.append(img.size)
        return tensor


def guess_type(sample: dict) -> str:
    """Guess the data type of a raw sample from its members.

    An image member with a json that contains "conversations" is qa, another image member caption;
    without one, json is interleaved, else text. Interleaved documents name their images
    `key.img0.png`, so their extensions ("img0.png") are not plain image extensions.
    """
    if any(extension in sample for extension in IMAGE_EXTENSIONS):
        return "qa" if b'"conversations"' in sample.get("json", b"") else "caption"
    return "interleaved" if "json" in sample else "text"


def inspect_shards(
    shards: list[str],
    tokenizer: Tokenizer,
    *,
    data_type: str | None = None,
    image_size: int = 32,
    max_pixels: int = 64 * 2**20,
) -> ShardReport:
    """Read every sample of `shards` as training would and report on them.

    `data_type` None guesses the type of each sample from its members (see guess_type).
    """
    report = ShardReport(shards)
    counter = _RecordingCounter()
    decoders = {name: _SizeRecordingDecoder(name, image_size, max_pixels) for name in DATA_TYPES}
    for sample in tar_samples(shards, counter.handler):
        decoder = decoders[data_type or guess_type(sample)]
        for document in decode_samples([sample], decoder, counter):
            report.samples[document.data_type] += 1
            report.images[document.data_type] += document.n_images
            texts = [segment if isinstance(segment, str) else segment.text
                     for segment in document.segments if isinstance(segment, (str, Answer))]
            report.text_tokens[document.data_type] += sum(len(tokenizer.encode(text)) for text in texts)
    for decoder in decoders.values():
        report.image_sizes += decoder.sizes
    report.skipped = counter.records
    return report


def format_report(report: ShardReport, tokens_per_image: int | None, max_listed: int) -> str:
    usable = sum(report.samples.values())
    lines = [f"{len(report.shards)} shard(s): {usable:,} usable samples, {len(report.skipped):,} skipped samples or images"]
    header = f"  {'type':<12}{'samples':>10}{'text tokens':>14}{'images':>10}"
    if tokens_per_image is not None:
        header += f"{'positions':>12}"
    lines.append(header)
    for name in DATA_TYPES:
        if not report.samples[name]:
            continue
        line = f"  {name:<12}{report.samples[name]:>10,}{report.text_tokens[name]:>14,}{report.images[name]:>10,}"
        if tokens_per_image is not None:
            line += f"{report.positions(name, tokens_per_image):>12,}"
        lines.append(line)
    sizes = _size_summary(report.image_sizes)
    if sizes:
        lines.append(
            f"image sizes (width x height, {sizes['count']:,} images): min {sizes['min']}, "
            f"median {sizes['median']}, max {sizes['max']}"
        )
    if report.skipped:
        reasons = Counter(record.reason for record in report.skipped)
        lines.append("skipped, by reason: " + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()))
        for record in report.skipped[:max_listed]:
            lines.append(f"  {record.shard}  {record.key}  {record.reason}: {record.detail}")
        if len(report.skipped) > max_listed:
            lines.append(f"  ... {len(report.skipped) - max_listed} more (--max-listed sets how many are listed, --json lists all)")
    return "\n".join(lines)


def _size_summary(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    by_area = sorted(sizes, key=lambda size: size[0] * size[1])
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return {
        "count": len(sizes),
        "min": "x".join(map(str, by_area[0])),
        "median": f"{statistics.median(widths):g}x{statistics.median(heights):g}",
        "max": "x".join(map(str, by_area[-1])),
    }


def report_json(report: ShardReport, tokens_per_image: int | None) -> str:
    return json.dumps(report.as_dict(tokens_per_image), indent=2)
