"""The manifest: one row per file in ``DATA/train/<class>/`` and per row of ``test.csv``, with what prepare learnt.

Each file is read once, in parallel: byte SHA-1, a SHA-1 of the decoded (EXIF-oriented, RGB) pixels so a re-encoded
or re-saved copy with identical pixels still matches, a 64-bit perceptual hash (``imagehash.phash``) for near
duplicates, the size, mode, format and EXIF orientation, and whether it decodes at all. Nothing is skipped silently:
zero-byte, truncated, text-as-.jpg, unsupported, unreadable, symlink-loop and decompression-bomb files get
``status="bad"`` and a reason in ``error``. ``width``/``height`` are as displayed (after EXIF rotation). OS and zip
leftovers (``carclf.data.scan.os_leftover``: ``__MACOSX``, ``.DS_Store``, ``Thumbs.db``...) are not read: they come
last, with ``split`` and ``status`` "ignored" and the reason in ``error``.

Incremental: a file whose (path, size_bytes, mtime_ns) matches a readable row of the previous manifest is not read
again. Bad rows are always re-checked (they are few and cheap, and a fixed permission does not change the mtime).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import posixpath
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, UnidentifiedImageError

from carclf.data.imageio import UnreadablePhoto, load_rgb, open_image
from carclf.data.scan import (
    IMAGE_EXTS,
    class_entry_note,
    column_key,
    nfc,
    os_leftover,
    read_csv_rows,
    scan_train,
)
from carclf.errors import CarclfError
from carclf.io import atomic_write_text

COLUMNS = [
    "path", "split", "class", "id", "size_bytes", "mtime_ns", "sha1", "pixel_hash", "phash",
    "width", "height", "mode", "format", "exif_orientation", "status", "error", "checks",
]
# The rules a row was probed under. An unchanged file is reused only when its row was probed under today's rules,
# so a prepare folder from before a new check (2: formats, aspect ratio, EOI-truncated JPEGs, too small) is read once
# more instead of keeping a hostile file that the new check refuses as "ok".
CHECKS = "2"
_INT_COLUMNS = ("size_bytes", "mtime_ns", "width", "height", "exif_orientation")
# Pillow's own default (MAX_IMAGE_PIXELS) is ~89.5 MP; a round 90 MP is the same guard, easier to quote.
DEFAULT_MAX_PIXELS = 90_000_000
# Shorter side below which a photo holds nothing to learn a car model from (the inputs are 64-600 px): listed as bad
# (quarantined from training) instead of being upscaled into a blur and trained on without a word.
MIN_SIDE = 16
EXT_LIST = ", ".join(sorted(IMAGE_EXTS))
IGNORED = "ignored"  # split and status of an OS or zip leftover: listed, never read, counted or used


@dataclass
class Entry:
    """A file to list: its manifest identity and where it is on disk."""

    path: str  # relative to DATA, posix, NFC
    split: str  # "train" | "test" | IGNORED
    cls: str  # NFC class name; "" for test
    id: str  # test ID; "" for train
    abspath: str  # on disk (folder and file names as they are, possibly NFD)
    note: str = ""  # a reason known before reading (e.g. a folder where a file was expected)


# ------------------------------------------------------------------------------------------------------ listing


def list_entries(data_root: Path | str) -> tuple[list[Entry], list[str]]:
    """Every entry of ``train/<class>/`` (sorted by class, then path), every row of ``test.csv``, then the OS and
    zip leftovers in ``train/``, its class folders and ``test/`` (split IGNORED, the reason in ``note``).

    Returns (entries, NFC class names in label order). Sub-folders of a class folder are listed (as bad) but never
    entered, so a directory symlink cycle cannot make this recurse. A missing ``test.csv`` means no test rows.
    """
    root = Path(data_root)
    trainset = scan_train(root)  # validates the layout and merges NFD/NFC folder names
    entries: list[Entry] = []
    ignored: list[Entry] = []
    train_dir = root / "train"
    for name in trainset.classes:
        folder = train_dir / trainset.folder_names[name]
        found: list[Entry] = []
        with os.scandir(folder) as it:
            for de in it:
                rel = nfc(f"train/{name}/{de.name}")
                if why := os_leftover(de.name):
                    ignored.append(Entry(rel, IGNORED, "", "", de.path, why))
                    continue
                note = class_entry_note(de.path, folder)  # a folder, or a symlink loop back to the class folder
                found.append(Entry(rel, "train", name, "", de.path, note))
        entries.extend(sorted(found, key=lambda e: e.path))
    with os.scandir(train_dir) as it:  # stray files beside the class folders are listed, not ignored
        for de in sorted(it, key=lambda d: d.name):
            if why := os_leftover(de.name):
                ignored.append(Entry(nfc(f"train/{de.name}"), IGNORED, "", "", de.path, why))
            elif not _is_dir(de.path):
                note = "file directly in train/, outside any class folder: not used"
                entries.append(Entry(nfc(f"train/{de.name}"), "train", "", "", de.path, note))
    entries.extend(_test_entries(root))
    listed = {e.path for e in entries}  # a leftover name that test.csv asks for is a test row, not ignored
    try:
        with os.scandir(root / "test") as it:
            in_test = [(de.name, de.path) for de in it]
    except OSError:  # no (readable) test/: no leftovers to list; the test.csv rows say what is missing
        in_test = []
    for name, path in in_test:
        rel = nfc(f"test/{name}")
        if (why := os_leftover(name)) and rel not in listed:
            ignored.append(Entry(rel, IGNORED, "", "", path, why))
    return entries + sorted(ignored, key=lambda e: e.path), trainset.classes


def _is_dir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except OSError:
        return False


def _test_entries(root: Path) -> list[Entry]:
    # Not scan_test: it resolve()s every path, which raises RuntimeError on a symlink loop instead of listing it.
    csv_path = root / "test.csv"
    if not csv_path.is_file():
        return []
    header, rows = read_csv_rows(csv_path)
    header = [column_key(h) for h in header]
    for col in ("ID", "img_path"):
        if col not in header:
            raise CarclfError(f"'{csv_path}' has no '{col}' column (found: {', '.join(header)})")
    i_id, i_path = header.index("ID"), header.index("img_path")
    out: list[Entry] = []
    seen: set[str] = set()
    for k, r in enumerate(rows, 1):
        if len(r) <= max(i_id, i_path):
            raise CarclfError(f"'{csv_path}' row {k} has {len(r)} field(s): every row needs ID and img_path")
        tid, raw = r[i_id].strip(), r[i_path].strip().replace("\\", "/")
        if tid in seen:
            raise CarclfError(f"'{csv_path}' repeats the ID '{tid}': IDs must be unique")
        seen.add(tid)
        rel = posixpath.normpath(raw) if raw else f"<no img_path for {tid}>"  # a unique key all the same
        note = "" if raw else "empty img_path in test.csv"
        if rel == ".." or rel.startswith("../") or posixpath.isabs(rel):
            note = "img_path points outside DATA (paths in test.csv are relative to it, e.g. ./test/x.jpg)"
        out.append(Entry(nfc(rel), "test", "", tid, str(root / rel), note))
    return out


# ------------------------------------------------------------------------------------------------------ probing


def _read_bytes(path: str) -> bytes:
    # A separate function so tests can simulate an unreadable file (they run as root, who may read anything).
    with open(path, "rb") as fh:
        return fh.read()


def _blank(**kw: object) -> dict:
    row = dict(size_bytes=-1, mtime_ns=-1, sha1="", pixel_hash="", phash="", width=0, height=0, mode="", format="",
               exif_orientation=1, status="bad", error="", checks=CHECKS)
    row.update(kw)
    return row


def _stat_reason(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT:
        return "broken symlink: its target does not exist" if os.path.islink(path) else "file not found"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied (fix the file's permissions)"
    return f"unreadable: {exc.strerror or exc}"


def _sniff(data: bytes) -> str:
    """Why Pillow could not identify a file: a few signatures written by hand (Pillow only says 'cannot identify')."""
    head = data[:512]
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        heif = {"heic", "heix", "heim", "heis", "mif1", "msf1"}
        kind = "AVIF" if brand.startswith("avi") else "HEIC/HEIF" if brand in heif else f"'{brand}' (ISO media)"
        return f"unsupported format: {kind} (Pillow cannot read it; convert the photo to JPEG or PNG)"
    if head.startswith(b"%PDF"):
        return "unsupported format: PDF document, not a photo"
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            snippet = re.sub(r"\s+", " ", text).strip()[:40]
            return f"not an image: the file is text (starts with {snippet!r})"
    return "not an image: unknown or unsupported format (Pillow cannot identify it)"


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1)) / 1e6:.1f} megapixels" if m else "its size"
    return (
        f"refused as a possible decompression bomb: {size} exceeds data.max_pixels={max_pixels:,}; if the photo is "
        "genuine, raise data.max_pixels (data.max_pixels=0 disables the guard)"
    )


def probe_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, note: str = "") -> dict:
    """Read one file and return its manifest columns (all but path/split/class/id). Never raises for a bad file."""
    if note:
        return _blank(error=note)
    try:
        st = os.stat(path)
    except OSError as exc:
        return _blank(error=_stat_reason(path, exc))
    if stat.S_ISDIR(st.st_mode):
        return _blank(error="a folder, not a file")
    row = _blank(size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTS:
        row["error"] = f"unsupported file type '{ext or '(no extension)'}' (carclf reads {EXT_LIST})"
        return row
    if st.st_size == 0:
        row["error"] = "zero-byte file"
        return row
    try:
        data = _read_bytes(path)
    except OSError as exc:
        row["error"] = _stat_reason(path, exc)
        return row
    row["sha1"] = hashlib.sha1(data).hexdigest()
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning is not a refusal, so make it one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(data)) as img:
                row["format"], row["mode"] = img.format or "", img.mode
                row["exif_orientation"] = _orientation(img)
                row["width"], row["height"] = img.size
            rgb = load_rgb(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        row["error"] = _bomb_reason(exc, max_pixels)
        return row
    except UnidentifiedImageError:
        row["error"] = _sniff(data)
        return row
    except UnreadablePhoto as exc:  # an aspect-ratio bomb, a truncated JPEG, a plugin failing on a bad header
        row["error"] = str(exc)
        return row
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, listed with its message
        msg = f"{type(exc).__name__}: {exc}"
        row["error"] = f"truncated or corrupt image ({msg})" if "truncated" in msg else f"cannot decode ({msg})"
        if row["exif_orientation"] in (5, 6, 7, 8):  # report the displayed size, as for readable photos
            row["width"], row["height"] = row["height"], row["width"]
        return row
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    row["width"], row["height"] = rgb.size
    if min(rgb.size) < MIN_SIDE:
        row["error"] = (f"too small to learn from ({rgb.width}x{rgb.height} pixels; carclf trains on photos of at "
                        f"least {MIN_SIDE} pixels on the short side)")
        return row
    row["pixel_hash"], row["phash"] = image_hashes(rgb)
    row["status"] = "ok"
    return row


def image_hashes(rgb: Image.Image) -> tuple[str, str]:
    """(SHA-1 of the RGB pixels and size, 64-bit phash as 16 hex digits) of a decoded, oriented photo."""
    import imagehash

    w, h = rgb.size
    pixel_hash = hashlib.sha1(f"{w}x{h}:".encode() + rgb.tobytes()).hexdigest()
    # phash looks at a 32x32 greyscale image; shrink with reduce() first (box filter, fast) rather than letting
    # imagehash run LANCZOS over the full photo. Same path for every format, so JPEG and PNG copies compare.
    small = rgb.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return pixel_hash, str(imagehash.phash(small))


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - broken EXIF is not a broken photo; load_rgb decides that
        return 1
    return value if 1 <= value <= 8 else 1


def _probe_star(args: tuple[str, int, str]) -> dict:
    return probe_file(*args)


# ------------------------------------------------------------------------------------------------------ building


def build_manifest(
    data_root: Path | str,
    previous: list[dict] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[str], dict]:
    """List and read the data set. Returns (rows in COLUMNS order, class names, stats).

    ``previous`` is an earlier manifest; its readable rows are reused for unchanged files. ``workers=0`` uses every
    core. ``stats`` holds ``n_probed``, ``n_reused``, ``probe_s`` and ``workers``; ignored leftovers are neither.
    """
    if max_pixels < 0:
        raise CarclfError(f"max_pixels must be >= 0 (0 disables the decompression-bomb guard), got {max_pixels}")
    entries, classes = list_entries(data_root)
    prev = {r["path"]: r for r in previous or [] if r.get("status") == "ok" and r.get("checks") == CHECKS}
    rows: list[dict | None] = [None] * len(entries)
    todo: list[int] = []
    for i, e in enumerate(entries):
        old = prev.get(e.path)
        if e.split == IGNORED:
            rows[i] = {"path": e.path, "split": e.split, "class": "", "id": "", **_blank(status=IGNORED, error=e.note)}
        elif old is not None and not e.note and _unchanged(e.abspath, old, max_pixels):
            rows[i] = {**old, "split": e.split, "class": e.cls, "id": e.id}
        else:
            todo.append(i)
    n_files = sum(e.split != IGNORED for e in entries)
    n_workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    if todo:
        log(f"prepare: reading {len(todo)} of {n_files} files ({n_files - len(todo)} unchanged)")
        args = [(entries[i].abspath, max_pixels, entries[i].note) for i in todo]
        for i, res in zip(todo, _run(args, n_workers, log), strict=True):
            e = entries[i]
            rows[i] = {"path": e.path, "split": e.split, "class": e.cls, "id": e.id, **res}
    probe_s = time.perf_counter() - t0
    stats = {"n_probed": len(todo), "n_reused": n_files - len(todo), "probe_s": round(probe_s, 3),
             "workers": n_workers if len(todo) >= _MIN_PARALLEL else 1}
    return [{c: r[c] for c in COLUMNS} for r in rows if r is not None], classes, stats


_MIN_PARALLEL = 32  # below this a process pool costs more than it saves


def _run(args: list[tuple[str, int, str]], workers: int, log: Callable[[str], None]) -> Iterable[dict]:
    step = max(len(args) // 10, 500)
    t0 = time.perf_counter()

    def progress(results: Iterable[dict]) -> Iterable[dict]:
        for k, res in enumerate(results, 1):
            if k % step == 0 and k < len(args):
                log(f"prepare: {k}/{len(args)} files read ({k / (time.perf_counter() - t0):.0f}/s)")
            yield res

    if workers <= 1 or len(args) < _MIN_PARALLEL:
        yield from progress(map(_probe_star, args))
        return
    chunk = max(1, min(64, len(args) // (workers * 8)))
    with ProcessPoolExecutor(workers) as pool:
        yield from progress(pool.map(_probe_star, args, chunksize=chunk))


def _unchanged(abspath: str, old: dict, max_pixels: int) -> bool:
    try:
        st = os.stat(abspath)
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) != (old["size_bytes"], old["mtime_ns"]):
        return False
    # A photo accepted under a looser guard is read again so the current max_pixels refuses it.
    return not max_pixels or old["width"] * old["height"] <= max_pixels


# ------------------------------------------------------------------------------------------------------ CSV


def csv_text(header: list[str], rows: Iterable[Iterable[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_manifest(path: Path | str, rows: list[dict], extra: list[str] | None = None) -> None:
    """Write ``manifest.csv`` atomically: COLUMNS, then any ``extra`` columns present in the rows."""
    cols = COLUMNS + list(extra or [])
    atomic_write_text(path, csv_text(cols, ([r.get(c, "") for c in cols] for r in rows)))


def read_manifest(path: Path | str) -> list[dict]:
    """Rows of a manifest CSV with integer columns parsed; [] if the file is missing or from another version."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not set(COLUMNS) <= set(reader.fieldnames or []):
            return []
        rows = list(reader)
    for r in rows:
        for c in _INT_COLUMNS:
            r[c] = int(r[c])
    return rows
