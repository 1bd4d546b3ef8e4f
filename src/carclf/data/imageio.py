"""Decoding photos: PIL draft mode for large JPEGs, EXIF orientation, any mode converted to RGB."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFile, ImageOps

# A truncated photo must fail loudly (and be listed), not be padded with grey and trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_rgb(path: Path | str, target: int = 0, draft_factor: float = 2.0) -> Image.Image:
    """Decode ``path`` to RGB. When ``target`` > 0 and the JPEG is at least ``draft_factor`` times larger on its
    shorter side, libjpeg decodes at 1/2, 1/4 or 1/8 scale (PIL's draft mode), which is several times faster and
    still leaves at least ``target * draft_factor`` pixels for cropping."""
    with Image.open(path) as img:
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
