"""Reading the competition layout: class folders, test.csv and sample_submission.csv.

Class names are NFC-normalised (macOS zips deliver NFD Hangul, which looks identical but compares unequal). CSV
headers are kept as written, so the submission can repeat sample_submission.csv's; they are compared by column_key.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from carclf.errors import CarclfError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def column_key(name: str) -> str:
    """A CSV column or class name as compared (NFC, no surrounding spaces); never written back."""
    return nfc(name.strip())


@dataclass
class TrainSet:
    root: Path
    classes: list[str]  # NFC names, sorted
    paths: list[Path]  # absolute paths, sorted by (class, file name)
    labels: list[int]
    folder_names: dict[str, str] = field(default_factory=dict)  # NFC name -> folder name on disk

    def __len__(self) -> int:
        return len(self.paths)

    def relpaths(self) -> list[str]:
        return [nfc(p.relative_to(self.root).as_posix()) for p in self.paths]


# Written by an OS or a zip tool, not photos or classes: ignored wherever carclf lists a folder (keys lower case).
_LEFTOVERS = {
    "__macosx": "macOS zip leftover", ".ds_store": "macOS Finder data", "thumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
}


def os_leftover(name: str) -> str:
    """Why a file or folder named ``name`` is an OS or zip leftover that carclf ignores; "" if it is not one.

    The one rule for ``train/``, its class folders and ``test/``: ``__MACOSX``, hidden names (``.DS_Store``, ``._x.jpg``
    AppleDouble files), ``Thumbs.db`` and ``desktop.ini`` (case-insensitive).
    """
    kind = _LEFTOVERS.get(name.lower())
    if kind is None and name.startswith("."):
        kind = "macOS AppleDouble file" if name.startswith("._") else "hidden file or folder"
    return f"{kind} ({name}), ignored" if kind else ""


def class_entry_note(path: str | os.PathLike, class_folder: str | os.PathLike) -> str:
    """Why an entry of a class folder is not read, when its kind alone says so: a symlink loop (a link to the class
    folder itself or a folder above it: following it would never end), or a folder. "" for anything else (a file, a
    broken link: reading it decides). Nothing is entered."""
    path = os.fspath(path)
    if not os.path.isdir(path):  # follows links; False for a broken or looping link (their read names them)
        return ""
    if os.path.islink(path):
        target, here = os.path.realpath(path), os.path.realpath(class_folder)
        if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
            where = "its own class folder" if here == target else f"'{target}', a folder above its class folder"
            return (f"symlink loop: '{os.path.basename(path)}' links back to {where} ({os.readlink(path)}), so it "
                    "is not followed (only files directly in train/<class>/ are read)")
    return "folder inside a class folder: not read (only files directly in train/<class>/ are)"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not os_leftover(path.name)


def scan_train(data_root: Path | str) -> TrainSet:
    """List ``DATA/train/<class>/*`` images; raise a clear error for a missing, empty or ambiguous layout."""
    root = Path(data_root)
    train = root.absolute() / "train"
    if not root.is_dir():
        raise CarclfError(f"data root '{root}' does not exist (set data.root=PATH to the competition folder)")
    if not train.is_dir():
        raise CarclfError(f"'{train}' not found: carclf expects DATA/train/<class name>/*.jpg")
    folders = sorted(p for p in train.iterdir() if p.is_dir() and not os_leftover(p.name))
    if not folders:
        raise CarclfError(f"'{train}' has no class folders: put each class's photos in train/<class name>/")
    by_name: dict[str, Path] = {}
    for folder in folders:
        name = nfc(folder.name)
        if name in by_name:
            raise CarclfError(
                f"class folders '{by_name[name]}' and '{folder}' are the same name in different Unicode forms: "
                "merge them into one folder"
            )
        by_name[name] = folder
    empty = [str(f) for f in by_name.values() if not any(_is_image(p) for p in f.iterdir())]
    if empty:
        raise CarclfError(
            f"{len(empty)} class folder(s) hold no images ({', '.join(sorted(IMAGE_EXTS))}): "
            + "; ".join(empty[:5])
            + ". Add photos or remove the folder."
        )
    classes = sorted(by_name)
    paths: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        files = sorted((p for p in by_name[name].iterdir() if p.is_file() and _is_image(p)), key=lambda p: p.name)
        paths.extend(p.absolute() for p in files)  # not resolve(): a symlinked class folder keeps its own name
        labels.extend([idx] * len(files))
    return TrainSet(
        root=train.absolute(), classes=classes, paths=paths, labels=labels,
        folder_names={n: f.name for n, f in by_name.items()},
    )


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Read a CSV with header; accepts UTF-8 with or without BOM, and CP949 (Korean Windows) as a fallback.

    The header comes back as written (only a BOM removed): compare its names through :func:`column_key`.
    """
    if not path.is_file():
        raise CarclfError(f"'{path}' not found")
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "cp949"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise CarclfError(f"'{path}' is neither UTF-8 nor CP949 text: re-save it as UTF-8")
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise CarclfError(f"'{path}' is empty: it needs a header row")
    return rows[0], [r for r in rows[1:] if r]


@dataclass
class TestSet:
    ids: list[str]
    paths: list[Path]


def scan_test(data_root: Path | str, csv_name: str = "test.csv") -> TestSet:
    """Read ``test.csv`` (``ID,img_path``); image paths are relative to the data root."""
    root = Path(data_root)
    header, rows = read_csv_rows(root / csv_name)
    header = [column_key(h) for h in header]
    for col in ("ID", "img_path"):
        if col not in header:
            raise CarclfError(f"'{root / csv_name}' has no '{col}' column (found: {', '.join(header)})")
    i_id, i_path = header.index("ID"), header.index("img_path")
    short = [n + 2 for n, r in enumerate(rows) if len(r) <= max(i_id, i_path)]
    if short:
        raise CarclfError(f"'{root / csv_name}': line(s) {', '.join(map(str, short[:5]))} have too few columns")
    ids = [r[i_id].strip() for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CarclfError(f"'{root / csv_name}' repeats IDs: {', '.join(dup)}")
    # absolute(), not resolve(): resolving a symlink loop raises instead of letting the loader list the file
    paths = [root.absolute() / r[i_path].strip().replace("\\", "/") for r in rows]  # Windows-style paths too
    return TestSet(ids=ids, paths=paths)


def read_sample_columns(path: Path) -> list[str]:
    """Class columns of ``sample_submission.csv`` in the file's own order, exactly as written (the submission's header
    repeats them byte for byte); match them to classes through :func:`column_key`."""
    header, _ = read_csv_rows(path)
    if not header or column_key(header[0]) != "ID":
        raise CarclfError(f"'{path}' must start with an 'ID' column (found: {', '.join(header[:3])})")
    keys = [column_key(c) for c in header[1:]]
    repeated = sorted({c for c in keys if keys.count(c) > 1})
    if repeated:
        raise CarclfError(f"'{path}' repeats column(s) {', '.join(repeated[:5])}: each class must appear once")
    return header[1:]
