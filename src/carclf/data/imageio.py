"""Decoding photos: the one path from encoded bytes or a file to upright RGB pixels.

Training, out-of-fold logits, ``predict``, export parity, report thumbnails and serving all call :func:`load_rgb`,
from a path on disk or from bytes in memory alike, so a photo gives the same pixels wherever it comes from (PIL
draft mode for large JPEGs included), and every path refuses the same hostile files:

- only the formats carclf lists (:data:`FORMATS`) are opened: Pillow's other plugins (EPS, which starts
  Ghostscript; DDS, PSD, ...) never see a byte of a user's file;
- decompression bombs (``max_pixels``) and aspect-ratio bombs (:data:`MAX_ASPECT`: a 2,000,000 x 20 PNG is 5 KB,
  and the eval resize would scale its short side up to hundreds of pixels and its long side to hundreds of
  millions) are refused from the header, before decoding;
- photos much larger than the input are shrunk before the transform (draft mode for JPEG, ``reduce`` otherwise);
- truncated JPEGs are refused, including those that end in an EOI marker (or whose header claims more rows than
  the data holds), which libjpeg fills with grey and reports only as a warning.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, ImageOps

# A truncated photo must fail loudly (and be listed), not be padded with grey and trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image

# The formats carclf opens (Pillow plugin names; the JPEG opener also yields MPO, the JPEG variant phones write).
# The README lists them.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
FORMAT_LIST = "JPEG, PNG, WebP, BMP, GIF, TIFF"
# Longest side / shortest side beyond which a photo is refused: car photos are at most panoramas of ~4:1, and the
# bound keeps what the resize to the input produces within MAX_ASPECT times the input's area.
MAX_ASPECT = 10.0


class UnreadablePhoto(ValueError):
    """A photo refused before or after decoding (shape, truncation): the message says why."""


@contextmanager
def open_image(src: str | Path | BinaryIO):
    """``Image.open`` limited to :data:`FORMATS`; any decoder exception is an ``UnidentifiedImageError`` or an
    :class:`UnreadablePhoto`, never a plugin's own ``NotImplementedError`` and the like."""
    from PIL import UnidentifiedImageError

    Image.init()  # registers the plugins of every format in FORMATS (only those are then tried)
    try:
        img = Image.open(src, formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError):
        raise  # not a plugin's failure: the caller says why (unknown format, bomb, unreadable file)
    except Exception as exc:  # noqa: BLE001 - a plugin failing on a malformed header is a bad file
        raise UnreadablePhoto(f"malformed image header ({type(exc).__name__}: {exc})") from None
    with img:
        yield img


def check_shape(w: int, h: int, max_pixels: int | None, limit_name: str = "data.max_pixels",
                max_aspect: float = MAX_ASPECT) -> None:
    """Refuse a photo from its header's size: too many pixels (``DecompressionBombError`` naming ``limit_name``)
    or a long side over ``max_aspect`` times the short side (:class:`UnreadablePhoto`)."""
    if max_pixels and w * h > max_pixels:
        raise Image.DecompressionBombError(
            f"{w}x{h} = {w * h:,} pixels exceeds {limit_name}={max_pixels:,} (a decompression-bomb guard; raise "
            f"{limit_name} if the photo is genuine, 0 disables it)"
        )
    if min(w, h) < 1 or max(w, h) > max_aspect * min(w, h):
        raise UnreadablePhoto(f"{w}x{h} is not a photo's shape: the long side is over {max_aspect:g} times the "
                              "short side (an aspect-ratio bomb guard)")


def load_rgb(
    src: ImageSource, target: int = 0, draft_factor: float = 2.0, max_pixels: int | None = None,
    limit_name: str = "data.max_pixels",
) -> Image.Image:
    """Decode ``src`` (a path, encoded bytes, a binary file object, or a PIL image opened but not yet loaded) to
    upright RGB.

    When ``target`` > 0 and the photo is at least ``2 * target * draft_factor`` pixels on its shorter side, it is
    shrunk while decoding (JPEG: libjpeg at 1/2, 1/4 or 1/8 scale, PIL's draft mode) or right after (other formats:
    ``Image.reduce``, a box filter), still leaving at least ``target * draft_factor`` pixels for cropping.
    ``max_pixels`` refuses larger images as decompression bombs (0: no limit; None: Pillow's own default guard),
    naming ``limit_name`` as the setting to change; photos of over :data:`MAX_ASPECT` to 1 are refused too."""
    if isinstance(src, Image.Image):
        return _decode(src, target, draft_factor, max_pixels, limit_name, None)
    if isinstance(src, bytes | bytearray | memoryview):
        src = io.BytesIO(src)
    if max_pixels is not None:
        # Pillow refuses at open() above twice its global limit; set it so our own check below decides.
        Image.MAX_IMAGE_PIXELS = max_pixels or None
    with open_image(src) as img:
        return _decode(img, target, draft_factor, max_pixels, limit_name, src)


def _decode(img: Image.Image, target: int, draft_factor: float, max_pixels: int | None, limit_name: str,
            src: str | Path | BinaryIO | None) -> Image.Image:
    w, h = img.size
    check_shape(w, h, max_pixels, limit_name)
    want = int(target * draft_factor)
    is_jpeg = img.format in ("JPEG", "MPO")
    if target > 0 and is_jpeg and min(img.size) >= 2 * want:
        img.draft("RGB", (want, want))
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's own failure on a malformed body is a bad file
        raise UnreadablePhoto(f"cannot decode ({type(exc).__name__}: {exc})") from None
    if is_jpeg and _grey_last_row(img) and src is not None:
        _check_jpeg_complete(src)
    if target > 0 and not is_jpeg and min(img.size) >= 2 * want:
        img = img.reduce(min(img.size) // want)
    return to_rgb(img)


def _grey_last_row(img: Image.Image) -> bool:
    """True when the stored image's last row is the flat mid-grey (128) that libjpeg writes for blocks it never
    received: the cheap sign of a JPEG whose data ended early, confirmed by :func:`_check_jpeg_complete`."""
    if img.mode not in ("RGB", "L"):
        return False
    w, h = img.size
    extrema = img.crop((0, h - 1, w, h)).getextrema()
    bands = extrema if img.mode == "RGB" else (extrema,)
    return all(lo == hi == 128 for lo, hi in bands)


def _check_jpeg_complete(src: str | Path | BinaryIO) -> None:
    """Raise :class:`UnreadablePhoto` when libjpeg warns that the data ended before the image did. Pillow silences
    libjpeg's warnings, so the rare suspect is decoded again by simplejpeg (libjpeg-turbo) in its strict mode."""
    import simplejpeg

    if isinstance(src, str | Path):
        data = Path(src).read_bytes()
    else:
        src.seek(0)
        data = src.read()
    try:
        simplejpeg.decode_jpeg(data, strict=True, min_height=8, min_width=8)
    except ValueError as exc:
        if "premature end" in str(exc).lower() or "corrupt" in str(exc).lower():
            raise UnreadablePhoto(f"truncated JPEG: {exc} (the data ends before the image; re-copy the file)") from None
        raise UnreadablePhoto(f"corrupt JPEG ({exc})") from None


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
