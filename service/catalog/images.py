"""Image decoding: bytes in, an RGB array of the encoder's input size out (values in [0, 1])."""

from __future__ import annotations

import io
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.errors import BadImageError

# Formats the service accepts, with the file extension and content type it stores them under.
FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": (".jpg", "image/jpeg"),
    "PNG": (".png", "image/png"),
    "WEBP": (".webp", "image/webp"),
    "BMP": (".bmp", "image/bmp"),
    "GIF": (".gif", "image/gif"),
}
SUPPORTED = ", ".join(FORMATS)
CONTENT_TYPES = {ext: ctype for ext, ctype in FORMATS.values()}

# Memory a decode needs per pixel, by the mode PIL decodes into, through the conversion to RGB
# (`_to_rgb`): a 16-bit greyscale PNG passes through a 4-byte array, a transparent one through
# three RGBA images. The budget is what a plain RGB image at the pixel limit needs, twice over.
_BYTES_PER_PIXEL = {
    "1": 4,
    "L": 4,
    "P": 4,
    "RGB": 6,
    "CMYK": 7,
    "YCbCr": 6,
    "I;16": 10,
    "I;16B": 10,
    "I;16L": 10,
    "I": 12,
    "F": 12,
    "RGBA": 15,
    "LA": 15,
    "PA": 15,
}
BUDGET_BYTES_PER_PIXEL = 6
# Progressive JPEGs decode once per scan: a file whose last scan repeats a thousand times costs
# seconds of CPU. Real encoders write up to about a dozen.
MAX_JPEG_SCANS = 64

# `decode` checks every image against the service's own, configurable pixel limit before
# decoding it. PIL's global limit (a warning, then an error at twice the size) is switched off:
# silencing that warning per call would need `warnings.catch_warnings`, which is not thread-safe.
Image.MAX_IMAGE_PIXELS = None


def decode(
    data: bytes, max_pixels: int, draft: int = 0, allowed: Collection[str] | None = None
) -> tuple[Image.Image, str]:
    """Decode image bytes into an RGB image (first frame, EXIF rotation applied) and its format.

    `draft`: the size the image will be shrunk to; JPEGs are then decoded at the smallest DCT
    scale that is still at least that big (2-8x less work for photos), other formats in full.
    """
    if not data:
        raise BadImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        fmt = image.format or ""
        if fmt not in (FORMATS if allowed is None else allowed):
            accepted = SUPPORTED if allowed is None else ", ".join(sorted(allowed))
            raise BadImageError(f"unsupported image format {fmt or 'unknown'} (use {accepted})")
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
        if fmt == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            # 0xFFDA starts a scan; inside compressed data 0xFF is always followed by 0x00.
            raise BadImageError(f"JPEG with {scans} scans, over the limit of {MAX_JPEG_SCANS}")
        image.seek(0)  # GIF, WebP: first frame only
        if draft and fmt == "JPEG":
            image.draft("RGB", (draft, draft))
        _check_budget(image, max_pixels)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy of every image that needs no turn
        return _to_rgb(image), fmt
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"not a decodable image (use {SUPPORTED})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data surfaces as any of these from PIL's decoders.
        raise BadImageError(f"image could not be decoded: {exc}") from None


def _check_budget(image: Image.Image, max_pixels: int) -> None:
    """Refuse an image whose decode (and conversion to RGB) would need more memory than a plain
    RGB image at the pixel limit, twice over: bytes per pixel count, not only pixels."""
    mode = "RGBA" if image.mode == "P" and "transparency" in image.info else image.mode
    width, height = image.size
    needed = width * height * _BYTES_PER_PIXEL.get(mode, 15)
    budget = max_pixels * BUDGET_BYTES_PER_PIXEL
    if needed > budget:
        raise BadImageError(
            f"a {width}x{height} {mode} image needs {needed >> 20} MB to decode, over the limit of "
            f"{budget >> 20} MB (fewer pixels, or 8-bit RGB)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white, as product photos with cut-out backgrounds expect.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        # 4 bytes a pixel, scaled in place (no second full-size array); 32-bit values as floats.
        array = np.asarray(image).astype(np.uint32 if image.mode.startswith("I;16") else np.float32)
        peak = array.max() or 1
        array *= 255
        array //= peak  # type: ignore[misc]  # uint32 or float32, both floor-divide in place
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def to_input(image: Image.Image, size: int) -> np.ndarray:
    """Resize the whole image to size x size: uint8 RGB [size, size, 3]. The encoder scales it to
    [0, 1] (TF-Hub's convention) inside its graph, so batches cross into TensorFlow at 1 byte a value."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


def prepare(
    data: bytes, size: int, max_pixels: int, allowed: Collection[str] | None = None
) -> tuple[np.ndarray, str]:
    """Decode and resize in one step: returns the encoder input and the image's format."""
    image, fmt = decode(data, max_pixels, draft=size, allowed=allowed)
    return to_input(image, size), fmt
