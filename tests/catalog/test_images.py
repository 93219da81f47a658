"""Image decoding: every accepted format, odd modes, and clear errors for what cannot be decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench import demo
from service.catalog.images import decode, prepare, to_input
from service.core.errors import BadImageError

LIMIT = 10_000_000


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def rocket() -> Image.Image:
    return demo.photo("rocket").resize((96, 64))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_every_supported_format_decodes_to_rgb(rocket: Image.Image, fmt: str) -> None:
    image, detected = decode(encoded(rocket, fmt), LIMIT)
    assert detected == fmt
    assert image.mode == "RGB"
    assert image.size == (96, 64)


def test_a_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image, _ = decode(data, LIMIT)
    assert image.getpixel((4, 4))[0] > 200  # red, not blue


def test_transparency_is_composited_onto_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image, _ = decode(encoded(clear, "PNG"), LIMIT)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    array = np.full((4, 4), 30000, np.uint16)
    array[0, 0] = 60000
    image, _ = decode(encoded(Image.fromarray(array), "PNG"), LIMIT)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert 100 < image.getpixel((1, 1))[0] < 160


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    decoded, _ = decode(encoded(image, "JPEG", exif=exif), LIMIT)
    assert decoded.size == (20, 40)


def test_to_input_resizes_the_whole_image_to_uint8(rocket: Image.Image) -> None:
    array = to_input(rocket, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert array.max() > 100  # the picture, not a blank


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"just some text, not an image", "not a decodable image"),
        (b"%PDF-1.4 not an image", "not a decodable image"),
    ],
)
def test_non_images_are_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        decode(data, LIMIT)


def test_a_truncated_image_is_refused(rocket: Image.Image) -> None:
    data = encoded(rocket, "PNG")
    with pytest.raises(BadImageError, match="could not be decoded"):
        prepare(data[: len(data) // 2], 32, LIMIT)


def test_an_unsupported_format_is_named(rocket: Image.Image) -> None:
    with pytest.raises(BadImageError, match="unsupported image format TIFF"):
        decode(encoded(rocket, "TIFF"), LIMIT)


def test_too_many_pixels_are_refused_before_decoding() -> None:
    data = encoded(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(BadImageError, match="over the limit of 10000 pixels"):
        decode(data, 10_000)
