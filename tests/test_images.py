"""Image decoding: pixel budget from the header, every mode to RGB, EXIF orientation, resize and crop."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fusionlab.data.errors import SkipSample
from fusionlab.data.images import BACKGROUND, decode_image, image_to_tensor, patchify, to_rgb

BUDGET = 1_000_000


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of about 100 bytes whose header declares width x height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


@pytest.mark.parametrize("side", [2_000, 20_000])
def test_bomb_rejected_from_header(side):
    data = png_header_only(side, side)
    assert len(data) < 200
    with pytest.raises(SkipSample) as caught:
        decode_image(data, max_pixels=BUDGET)
    # The IDAT holds 64 bytes: had decoding started, the error would be a truncated image instead.
    assert caught.value.reason == "image_too_large"
    assert str(side * side) in caught.value.detail


def test_bomb_detail_names_declared_size():
    with pytest.raises(SkipSample) as caught:
        decode_image(png_header_only(3000, 2000), max_pixels=BUDGET)
    assert "3000x2000" in caught.value.detail
    assert f"max_pixels={BUDGET}" in caught.value.detail


def test_pillow_globals_untouched():
    limit, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    for data in (png_header_only(20_000, 20_000), encode(Image.new("RGB", (8, 8)))):
        try:
            decode_image(data, max_pixels=BUDGET)
        except SkipSample:
            pass
    assert Image.MAX_IMAGE_PIXELS == limit
    assert ImageFile.LOAD_TRUNCATED_IMAGES is truncated is False


def test_truncated_jpeg_is_undecodable():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(SkipSample) as caught:
        decode_image(data[:100], max_pixels=BUDGET)
    assert caught.value.reason == "image_undecodable"


def test_garbage_and_empty_bytes():
    with pytest.raises(SkipSample) as caught:
        decode_image(b"not an image at all", max_pixels=BUDGET)
    assert caught.value.reason == "image_undecodable"
    with pytest.raises(SkipSample) as caught:
        decode_image(b"", max_pixels=BUDGET)
    assert caught.value.reason == "empty_member"


def test_grey_modes_give_equal_channels():
    grey = Image.fromarray(np.array([[0, 77, 200, 255]], dtype=np.uint8), mode="L")
    out = pixels(decode_image(encode(grey), max_pixels=BUDGET))
    assert out.shape == (1, 4, 3)
    assert (out[..., 0] == [[0, 77, 200, 255]]).all()
    assert (out[..., 0] == out[..., 1]).all()
    assert (out[..., 1] == out[..., 2]).all()


def test_16bit_png_rescaled():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = pixels(decode_image(encode(img), max_pixels=BUDGET))
    for channel in range(3):
        assert out[0, :, channel].tolist() == [0, 1, 128, 255]


def test_mode_i_and_f_values():
    as_i = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32), mode="I")
    # Shards carry no format for these modes (TIFF is not allow-listed): convert the images directly.
    out = pixels(to_rgb(as_i))
    assert out[0, :, 0].tolist() == [0, 1, 255, 255, 0]
    as_f = Image.fromarray(np.array([[0.0, 1.4, 128.0, 300.0, -1.0]], dtype=np.float32), mode="F")
    out = pixels(to_rgb(as_f))
    assert out[0, :, 1].tolist() == [0, 1, 128, 255, 0]


def test_transparency_composited_on_background():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (10, 0))
    la.putpixel((1, 0), (10, 255))
    out = pixels(decode_image(encode(la), max_pixels=BUDGET))
    assert out[0, 0].tolist() == list(BACKGROUND)
    assert out[0, 1].tolist() == [10, 10, 10]

    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 2, 2))  # transparent left half
    out = pixels(decode_image(encode(rgba), max_pixels=BUDGET))
    assert (out[:, :2] == BACKGROUND).all()
    assert (out[:, 2:] == [255, 0, 0]).all()

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    out = pixels(decode_image(encode(palette, transparency=0), max_pixels=BUDGET))
    assert out[0, 0].tolist() == list(BACKGROUND)
    assert out[0, 1].tolist() == [0, 255, 0]


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in print colours
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = pixels(decode_image(data, max_pixels=BUDGET)).astype(int)
    assert abs(out[..., 0].mean() - 255) < 4
    assert out[..., 1].mean() < 4
    assert out[..., 2].mean() < 4


def test_exif_orientation_applied():
    stored = Image.new("RGB", (16, 8), (0, 0, 0))
    stored.paste((255, 255, 255), (8, 0, 16, 8))  # right half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = pixels(decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=BUDGET))
    assert out.shape == (16, 8, 3)  # 8 wide, 16 high
    assert out[:8].mean() < 40  # the stored left half ends on top
    assert out[8:].mean() > 215


def test_to_tensor_centre_crops_shorter_side():
    bands = Image.new("RGB", (30, 10), (255, 0, 0))
    bands.paste((0, 255, 0), (10, 0, 20, 10))
    bands.paste((0, 0, 255), (20, 0, 30, 10))
    tensor = image_to_tensor(bands, 10)
    assert tensor.shape == (3, 10, 10)
    assert tensor.dtype == torch.uint8
    assert (tensor[1] == 255).all()
    assert (tensor[0] == 0).all()
    assert (tensor[2] == 0).all()


def test_to_tensor_deterministic_by_default():
    noise = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    first, second = image_to_tensor(img, 16), image_to_tensor(img, 16)
    assert torch.equal(first, second)


def test_augmentation_options():
    half = Image.new("RGB", (16, 16), (0, 0, 0))
    half.paste((255, 255, 255), (8, 0, 16, 16))
    with pytest.raises(ValueError):
        image_to_tensor(half, 8, hflip=True)
    rng = random.Random(0)
    flips = [image_to_tensor(half, 8, hflip=True, rng=rng)[0, 0, 0].item() for _ in range(40)]
    assert 0 < flips.count(255) < 40  # some mirrored, some not
    crops = {image_to_tensor(half, 8, random_crop=True, rng=rng).float().mean().item() for _ in range(10)}
    assert len(crops) > 1
    assert image_to_tensor(half, 8, random_crop=True, rng=rng).shape == (3, 8, 8)


def test_patchify_matches_conv():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 12)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4, bias=False)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    expected = conv(images).flatten(2).transpose(1, 2)  # [N, patches, 5]
    got = patches @ conv.weight.reshape(5, -1).T
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="patch_size=5"):
        patchify(images, 5)
