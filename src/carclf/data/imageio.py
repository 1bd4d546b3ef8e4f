"""Decoding photos: the one path from encoded bytes or a file to upright RGB pixels.

Training, out-of-fold logits, ``predict`` and serving all call :func:`load_rgb`, from a path on disk or from bytes in
memory alike, so a photo gives the same pixels wherever it comes from (PIL draft mode for large JPEGs included).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, ImageOps

# A truncated photo must fail loudly (and be listed), not be padded with grey and trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image


def load_rgb(
    src: ImageSource, target: int = 0, draft_factor: float = 2.0, max_pixels: int | None = None
) -> Image.Image:
    """Decode ``src`` (a path, encoded bytes, a binary file object, or a PIL image opened but not yet loaded) to
    upright RGB.

    When ``target`` > 0 and the JPEG is at least ``2 * target * draft_factor`` pixels on its shorter side, libjpeg
    decodes at 1/2, 1/4 or 1/8 scale (PIL's draft mode), several times faster, still leaving at least
    ``target * draft_factor`` pixels for cropping. ``max_pixels`` refuses larger images as decompression bombs
    (0: no limit; None: Pillow's own default guard)."""
    if isinstance(src, Image.Image):
        return _decode(src, target, draft_factor, max_pixels)
    if isinstance(src, bytes | bytearray | memoryview):
        src = io.BytesIO(src)
    if max_pixels is not None:
        # Pillow refuses at open() above twice its global limit; set it so our own check below decides.
        Image.MAX_IMAGE_PIXELS = max_pixels or None
    with Image.open(src) as img:
        return _decode(img, target, draft_factor, max_pixels)


def _decode(img: Image.Image, target: int, draft_factor: float, max_pixels: int | None) -> Image.Image:
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise Image.DecompressionBombError(
            f"{w}x{h} = {w * h:,} pixels exceeds data.max_pixels={max_pixels:,} (a decompression-bomb guard; "
            "raise it if the photo is genuine, 0 disables it)"
        )
    if target > 0 and img.format == "JPEG":
        want = int(target * draft_factor)
        if min(img.size) >= 2 * want:
            img.draft("RGB", (want, want))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, transparency on white, 16-bit scaled, CMYK/palette converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, as a browser shows them, instead of on black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")
