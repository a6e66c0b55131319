"""Images to evaluate or caption: caption shards (with their reference caption and scene) or a folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fusionlab.data.datamodule import expand_shards
from fusionlab.data.errors import SkipSample
from fusionlab.data.formats import IMAGE_EXTENSIONS, SampleDecoder, tar_samples
from fusionlab.data.images import decode_image, image_to_tensor

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 64 * 2**20  # the FusionDataModule default


@dataclass
class ImageSample:
    """One image with what is known about it: a reference caption and the sample-set scene, if any."""

    key: str
    image: torch.Tensor  # uint8 [3, S, S]
    reference: str | None = None
    scene: dict | None = None
    origin: str = ""  # shard url or file path


def read_caption_shards(urls: str, image_size: int, limit: int | None = None) -> list[ImageSample]:
    """Read caption samples from shards (a Source `urls` pattern), in order, skipping invalid ones.

    The scene comes from the sample's json member ("scene", written by `fusionlab data sample`) when
    present, so digit accuracy and question answering can be scored against it.
    """
    decoder = SampleDecoder("caption", image_size, MAX_IMAGE_PIXELS)
    samples: list[ImageSample] = []
    skipped = 0
    for raw in tar_samples(expand_shards(urls)):
        if limit is not None and len(samples) >= limit:
            break
        try:
            document = decoder(raw)
        except SkipSample as skip:
            skipped += 1
            log.warning("skipped sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), skip)
            continue
        image, reference = document.segments
        samples.append(ImageSample(document.key, image, reference, _scene(raw), document.shard))
    if skipped:
        log.warning("skipped %d invalid caption samples of %s", skipped, urls)
    return samples


def _scene(raw: dict) -> dict | None:
    if "json" not in raw:
        return None
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    scene = meta.get("scene") if isinstance(meta, dict) else None
    return scene if isinstance(scene, dict) else None


def read_image_folder(folder: str | Path, image_size: int, limit: int | None = None) -> list[ImageSample]:
    """Read the images of a folder (jpg, jpeg, png, webp; sorted by name), centre-cropped to image_size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} not found: give a folder of image files")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} file in {str(folder)!r}")
    samples = []
    for path in paths[:limit]:
        try:
            image = image_to_tensor(decode_image(path.read_bytes(), max_pixels=MAX_IMAGE_PIXELS), image_size)
        except SkipSample as error:
            log.warning("skipped image %s: %s", path, error)
            continue
        samples.append(ImageSample(path.name, image, origin=str(path)))
    return samples


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
