"""Decoding photos: PIL draft mode for large JPEGs, EXIF orientation, any mode converted to RGB."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
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


def check_image(path: str) -> str:
    """Return '' if the image decodes completely, else the reason it does not."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        load_rgb(path, target=32, draft_factor=1.0)
    except Exception as exc:  # noqa: BLE001 - every decode failure is reported, whatever its type
        return f"{type(exc).__name__}: {exc}"
    return ""


def check_images(paths: list[Path], cache_file: Path | None = None, workers: int = 0) -> dict[str, str]:
    """Decode every image once (in parallel) and return {path: reason} for those that fail.

    Results are cached by (path, size, mtime) in ``cache_file`` so an unchanged data set is checked only once.
    """
    cache: dict[str, list] = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            cache = {}
    keys: dict[str, list] = {}
    todo: list[str] = []
    for p in paths:
        s = str(p)
        try:
            st = os.stat(s)
            key = [st.st_size, st.st_mtime_ns]
        except OSError as exc:
            keys[s] = [-1, -1, f"unreadable: {exc.strerror}"]
            continue
        hit = cache.get(s)
        if hit and hit[:2] == key:
            keys[s] = hit
        else:
            keys[s] = key
            todo.append(s)
    if todo:
        workers = workers or min(len(todo) // 64 + 1, os.cpu_count() or 1)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                reasons = list(pool.map(check_image, todo, chunksize=64))
        else:
            reasons = [check_image(s) for s in todo]
        for s, reason in zip(todo, reasons, strict=True):
            keys[s] = [*keys[s], reason]
        if cache_file:
            from carclf.io import atomic_write_text

            atomic_write_text(cache_file, json.dumps(keys))
    return {s: v[2] for s, v in keys.items() if v[2]}
