"""Safe image decoding, conversion of every Pillow mode to RGB, resizing to square tensors, patchify.

Decoding never touches Pillow's global settings: the pixel budget is checked per call against the
size declared in the header, and truncated files stay errors (`ImageFile.LOAD_TRUNCATED_IMAGES` is
left as it is).
"""

from __future__ import annotations

import io
import math
import random
import struct

import numpy as np
import torch
from PIL import Image, ImageOps

from fusionlab.data.errors import SkipSample

# Transparent pixels are composited on white, the usual page background of web images.
BACKGROUND = (255, 255, 255)

# Pillow raises these on corrupt or hostile input (a truncated file is an OSError, a broken PNG
# chunk a SyntaxError, a bad header field a struct.error or ValueError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)

_TRANSPARENT_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode `data` to an upright RGB image, rejecting it from its header when it is too large.

    Raises SkipSample with reason "empty_member", "image_too_large" (width * height declared in the
    header exceeds `max_pixels`, checked before any pixel is decoded) or "image_undecodable".
    """
    if not data:
        raise SkipSample("empty_member", "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))  # parses the header only
    except Image.DecompressionBombError as exn:
        # Image.open itself rejects sizes above twice Image.MAX_IMAGE_PIXELS, before the check below.
        raise SkipSample("image_too_large", f"declared size rejected by Pillow: {exn}") from exn
    except DECODE_ERRORS as exn:
        raise SkipSample("image_undecodable", f"{type(exn).__name__}: {exn}") from exn

    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise SkipSample(
                "image_too_large",
                f"declared size {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}; "
                "raise the pixel budget (max_image_pixels) to accept such images",
            )
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)
        except DECODE_ERRORS as exn:
            raise SkipSample("image_undecodable", f"{type(exn).__name__}: {exn}") from exn


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (alpha channels and palette or tRNS transparency) is composited on BACKGROUND.
    16-bit modes are rescaled by 255/65535 (0, 257, 32896, 65535 -> 0, 1, 128, 255), mode I is
    read as 16-bit samples and clipped to 0..65535 first, and mode F is clipped to 0..255 as
    Pillow's own F -> L conversion does.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.float64)
        return _grey_to_rgb(np.clip(values, 0, 65535) / 257)
    if mode == "F":
        return _grey_to_rgb(np.clip(np.asarray(img, dtype=np.float64), 0, 255))
    if mode in _TRANSPARENT_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.rint(values).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


def image_to_tensor(
    img: Image.Image,
    image_size: int,
    *,
    random_crop: bool = False,
    hflip: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize and crop an RGB image to a uint8 tensor [3, image_size, image_size].

    By default the shorter side is resized to `image_size` and the centre is cropped, in one bicubic
    resampling (antialiased when downscaling). `random_crop` takes a random crop of 40-100 % of the
    area with aspect ratio 3/4-4/3 instead, and `hflip` mirrors half of the images. Both are off by
    default because a flip falsifies captions that name left and right.
    """
    if (random_crop or hflip) and rng is None:
        raise ValueError("random_crop and hflip need an rng (random.Random) so that augmentation is seeded")
    box = _random_box(img.size, rng) if random_crop else _centre_box(img.size)
    out = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.array(out, dtype=np.uint8)  # [S, S, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _centre_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _random_box(size: tuple[int, int], rng: random.Random, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    width, height = size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if crop_w <= width and crop_h <= height:
            left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
            return (left, top, left + crop_w, top + crop_h)
    return _centre_box(size)  # very elongated images: no crop of that shape fits


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images [N, C, H, W] into patches [N, (H/p)*(W/p), C*p*p], row-major.

    Each patch is flattened in (C, p, p) order, so a Linear layer on it equals a Conv2d with
    kernel_size = stride = p whose weight is viewed as [d_model, C*p*p].
    """
    n, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={patch_size}")
    p = patch_size
    patches = images.reshape(n, channels, height // p, p, width // p, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # [N, H/p, W/p, C, p, p]
    return patches.reshape(n, (height // p) * (width // p), channels * p * p)
