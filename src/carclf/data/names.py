"""ASCII aliases for class names: for file names, plot labels and logs where Hangul may not survive.

Hangul is romanised with ``koroman`` (Revised Romanization with the pronunciation rules of the National Institute of
Korean Language, MIT licence; e.g. 그랜저 -> geuraenjeo, 팰리세이드 -> paelliseideu). Any other non-ASCII text
(accented Latin, Han, Cyrillic, lone jamo) falls back to ``anyascii``. Latin letters and digits are kept as written.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from carclf.data.scan import nfc
from carclf.io import atomic_write_text

_HANGUL_RUN = re.compile(r"[\uac00-\ud7a3]+")  # precomposed syllables (NFC), the only thing koroman romanises
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Names Windows refuses as file names whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
MAX_ALIAS_LEN = 80


def romanize(text: str) -> str:
    """Romanise Hangul syllables (lower case), transliterate other non-ASCII characters, keep ASCII as is."""
    from anyascii import anyascii
    from koroman import romanize as ko_romanize

    # Romanise each Hangul run on its own so koroman's lower-casing does not touch Latin model codes (K5, N라인).
    text = _HANGUL_RUN.sub(lambda m: ko_romanize(m.group(0)), nfc(text))
    return anyascii(text)


def _safe(name: str) -> str:
    alias = _UNSAFE.sub("_", romanize(name))
    alias = re.sub(r"_+", "_", alias).strip("_-")[:MAX_ALIAS_LEN].rstrip("_-")
    if not alias:
        alias = "class"
    if alias.lower() in _RESERVED:
        alias += "_"
    return alias


def class_aliases(classes: list[str]) -> dict[str, str]:
    """{NFC class name: alias}; aliases are ASCII ``[A-Za-z0-9_-]``, unique even on case-insensitive file systems.

    Clashes (e.g. two names differing only in punctuation) get ``_2``, ``_3``... in the order given.
    """
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in classes:
        key = nfc(name)
        if key in out:
            continue
        base = alias = _safe(key)
        k = 2
        while alias.lower() in taken:
            alias = f"{base}_{k}"
            k += 1
        taken.add(alias.lower())
        out[key] = alias
    return out


def write_classes_csv(
    path: Path | str, classes: list[str], n_train: dict[str, int] | None = None, n_used: dict[str, int] | None = None
) -> dict[str, str]:
    """Write ``classes.csv`` (``index,name,alias,n_train,n_used``); index is the position in ``classes`` (the label).

    ``n_train`` counts the readable photos in each class folder, ``n_used`` those left after quarantine.
    Returns the aliases.
    """
    aliases = class_aliases(classes)
    n_train, n_used = n_train or {}, n_used or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "name", "alias", "n_train", "n_used"])
    for i, name in enumerate(classes):
        w.writerow([i, nfc(name), aliases[nfc(name)], n_train.get(name, 0), n_used.get(name, 0)])
    atomic_write_text(path, buf.getvalue())
    return aliases


def read_classes_csv(path: Path | str) -> tuple[list[str], dict[str, str]]:
    """(classes in label order, {name: alias}) from a ``classes.csv`` written by :func:`write_classes_csv`."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["index"]))
    return [r["name"] for r in rows], {r["name"]: r["alias"] for r in rows}
