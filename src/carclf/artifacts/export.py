"""An export folder (``carclf export`` writes it): ``export.yaml``, the graphs it lists, ``calibration.npz`` for an
ensemble's calibration arrays, and the ``.carclf-export`` marker.

``export.yaml`` is checked strictly when it is loaded: known keys with the types carclf writes, engine and
calibration files inside the export folder, and (exports made since it was recorded) a checksum of the whole spec.

Every temperature, class name and post-processing figure in export.yaml is part of what the parity check at export
time measured: an edited spec would serve predictions nobody checked. ``spec_sha256`` is the SHA-256 of the spec's
content (parsed, so comments and layout do not count) without itself; a spec without one (written before it was
recorded) is checked for keys and types only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from carclf.artifacts.ensemble import CALIBRATION_FILE
from carclf.artifacts.owned import OwnedFolder
from carclf.errors import CarclfError
from carclf.io import read_yaml

EXPORT_FILE = "export.yaml"
EXPORT_MARKER = ".carclf-export"
EXPORT_FORMAT = 1
ENGINE_FILE_RE = re.compile(r"(m\d+\.)?(fold\d+|full)(\.int8)?\.onnx")  # how carclf export names its graphs
SPEC_KEY = "spec_sha256"
_NUMBER = (int, float)
# key -> (type, required); a type may be a tuple of types
TOP = {
    "format": (int, True), "created": (str, False), "source": (dict, False), "classes": (list, True),
    "output_classes": (list, False), "merge": (dict, True), "engines": (list, True), "averaging": (str, False),
    "versions": (dict, False), "config": (dict, True), "predictor": (dict, False), "parity": (dict, False),
    "int8": (dict, False), "bf16": (dict, False), "precision": (dict, False), SPEC_KEY: (str, False),
}
ENGINE = {
    "name": (str, True), "fold": (int, True), "eval_size": (int, True), "temperature": (_NUMBER, True),
    "views": (list, True), "data_config": (dict, True), "input": (dict, False), "output": (dict, False),
    "opset": (int, False), "files": (dict, True), "member": (str, False),
}
GRAPH = {"file": (str, True), "sha256": (str, True), "bytes": (int, False), "mode": (str, False),
         "calibration": (str, False), "format": (str, False), "needs": (str, False), "runtime": (str, False)}
ENGINE_PRECISIONS = ("fp32", "bf16", "int8")  # the files an engine entry may list (carclf.infer.precision)
MERGE = {"original": (list, True), "classes": (list, True), "label_map": (list, True), "share": (list, True),
         "dropped_prob": (_NUMBER, False), "dropped": (list, False)}
PREDICTOR = {"postprocess": (dict, True), "engine_members": (list, True), "engine_names": (list, False)}


def spec_checksum(doc: dict[str, Any]) -> str:
    """SHA-256 of the spec's content without its own checksum: sorted keys, so the order in the file is free."""
    body = {k: v for k, v in doc.items() if k != SPEC_KEY}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Checker:
    def __init__(self, path: Path, export_dir: Path) -> None:
        self.path, self.dir = path, Path(export_dir)

    def fail(self, what: str) -> CarclfError:
        return CarclfError(f"'{self.path}': {what}. It is not as carclf export wrote it: export the model again "
                           "(carclf export SOURCE -o DIR --overwrite)")

    def keys(self, d: Any, schema: dict[str, tuple], where: str) -> None:
        if not isinstance(d, dict):
            raise self.fail(f"{where or 'the file'} must be a mapping, not {type(d).__name__}")
        for key in d:
            if key not in schema:
                raise self.fail(f"unknown key '{_join(where, key)}' (known: {', '.join(schema)})")
        for key, (kind, required) in schema.items():
            if key not in d:
                if required:
                    raise self.fail(f"'{_join(where, key)}' is missing")
                continue
            self.type(d[key], kind, _join(where, key))

    def type(self, value: Any, kind: type | tuple, where: str) -> None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) or not isinstance(value, kinds):  # YAML's true is no number
            names = " or ".join("a number" if k is float else f"a {_TYPE_NAMES.get(k, k.__name__)}" for k in kinds
                                if not (k is int and float in kinds))
            raise self.fail(f"'{where}' must be {names}, not {value!r}")

    def strings(self, value: list, where: str, unique: bool = False) -> None:
        for i, v in enumerate(value):
            self.type(v, str, f"{where}[{i}]")
        if unique and len(set(value)) != len(value):
            raise self.fail(f"'{where}' repeats a name")

    def inside(self, name: str, where: str) -> None:
        """A file the spec names must be inside the export folder (a symlink out of it too is refused)."""
        p = Path(name)
        base = self.dir.resolve()
        if p.is_absolute() or not name or base not in (base / p).resolve().parents:
            raise self.fail(f"'{where}' = '{name}' is outside the export folder '{self.dir}' (an export names only "
                            "its own files)")


_TYPE_NAMES = {int: "whole number", str: "string", list: "list", dict: "mapping"}


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def validate_export(doc: Any, path: Path, export_dir: Path | str, fmt: int) -> None:
    """Refuse an export.yaml with unknown keys, wrong types, files outside the folder, counts that disagree, or
    (when recorded) content that is not what was exported. Raises a one-line CarclfError naming the key."""
    c = _Checker(path, Path(export_dir))
    c.keys(doc, TOP, "")
    if doc["format"] > fmt:
        raise CarclfError(f"'{path}' has export format {doc['format']}, newer than this carclf reads ({fmt}): "
                          "upgrade carclf")
    classes = doc["classes"]
    if not classes:
        raise c.fail("'classes' is empty")
    c.strings(classes, "classes", unique=True)
    if "output_classes" in doc:
        c.strings(doc["output_classes"], "output_classes", unique=True)
    _merge(c, doc["merge"], classes, doc.get("output_classes"))
    engines = doc["engines"]
    if not engines:
        raise c.fail("'engines' is empty: an export holds at least one graph")
    for i, e in enumerate(engines):
        _engine(c, e, f"engines[{i}]")
    if "predictor" in doc:
        _predictor(c, doc["predictor"], len(engines))
    if "precision" in doc:
        chosen = doc["precision"].get("chosen")
        if chosen not in ENGINE_PRECISIONS:
            raise c.fail(f"'precision.chosen' = {chosen!r} is not one of {', '.join(ENGINE_PRECISIONS)}")
        lacking = [e["name"] for e in engines if chosen not in e["files"]]
        if lacking:
            raise c.fail(f"'precision.chosen' is {chosen}, but engine(s) {', '.join(lacking)} have no {chosen} file")
    if SPEC_KEY in doc and spec_checksum(doc) != doc[SPEC_KEY]:
        raise CarclfError(
            f"'{path}' was edited after export: its content (temperatures, classes, engines, post-processing) no "
            f"longer matches its {SPEC_KEY}, so it is not what the parity check measured. Re-export with carclf "
            "export SOURCE -o DIR --overwrite"
        )


def _merge(c: _Checker, merge: dict, classes: list[str], output_classes: list[str] | None) -> None:
    c.keys(merge, MERGE, "merge")
    c.strings(merge["classes"], "merge.classes")
    c.strings(merge["original"], "merge.original")
    if merge["classes"] != classes:
        raise c.fail("'merge.classes' are not 'classes'")
    if output_classes is not None and merge["original"] != output_classes:
        raise c.fail("'merge.original' are not 'output_classes'")
    n = len(merge["original"])
    if len(merge["label_map"]) != n or len(merge["share"]) != n:
        raise c.fail(f"'merge.label_map' and 'merge.share' must have one entry per original class ({n})")
    for i, m in enumerate(merge["label_map"]):
        c.type(m, int, f"merge.label_map[{i}]")
        if not -1 <= m < len(classes):
            raise c.fail(f"'merge.label_map[{i}]' = {m} is not a class index (-1 .. {len(classes) - 1})")
    for i, s in enumerate(merge["share"]):
        c.type(s, _NUMBER, f"merge.share[{i}]")


def _engine(c: _Checker, e: Any, where: str) -> None:
    c.keys(e, ENGINE, where)
    t = e["temperature"]
    if not math.isfinite(t) or t <= 0:
        raise c.fail(f"'{where}.temperature' = {t!r} must be a positive number")
    if e["eval_size"] < 0:
        raise c.fail(f"'{where}.eval_size' = {e['eval_size']} must not be negative")
    if not e["views"]:
        raise c.fail(f"'{where}.views' is empty")
    c.strings(e["views"], f"{where}.views")
    from carclf.tta import parse_policy

    try:
        parse_policy(",".join(e["views"]) + ",")
    except CarclfError as exc:
        raise c.fail(f"'{where}.views': {exc}") from None
    d = e["data_config"]
    for key, n in (("input_size", 3), ("mean", 3), ("std", 3)):
        v = d.get(key)
        kind = int if key == "input_size" else _NUMBER
        if not isinstance(v, list) or len(v) != n:
            raise c.fail(f"'{where}.data_config.{key}' must be a list of {n} numbers, not {v!r}")
        for i, x in enumerate(v):
            c.type(x, kind, f"{where}.data_config.{key}[{i}]")
    if any(x <= 0 for x in d["input_size"][1:]) or any(x <= 0 for x in d["std"]):
        raise c.fail(f"'{where}.data_config': input_size and std must be positive")
    files = e["files"]
    if "fp32" not in files:
        raise c.fail(f"'{where}.files.fp32' is missing")
    for precision, f in files.items():
        if precision not in ENGINE_PRECISIONS:
            raise c.fail(f"unknown key '{where}.files.{precision}' (known: {', '.join(ENGINE_PRECISIONS)})")
        c.keys(f, GRAPH, f"{where}.files.{precision}")
        c.inside(f["file"], f"{where}.files.{precision}.file")


def _predictor(c: _Checker, p: Any, n_engines: int) -> None:
    c.keys(p, PREDICTOR, "predictor")
    members = p["engine_members"]
    if len(members) != n_engines:
        raise c.fail(f"'predictor.engine_members' has {len(members)} entries for {n_engines} engines")
    post = p["postprocess"]
    for key, kind in (("members", list), ("engine_members", list), ("space", str), ("calibration", dict),
                      ("eps", _NUMBER)):
        if key not in post:
            raise c.fail(f"'predictor.postprocess.{key}' is missing")
        c.type(post[key], kind, f"predictor.postprocess.{key}")
    for i, m in enumerate(members):
        c.type(m, int, f"predictor.engine_members[{i}]")
        if not 0 <= m < len(post["members"]):
            raise c.fail(f"'predictor.engine_members[{i}]' = {m} is not a member index")
    for i, m in enumerate(post["members"]):
        if not isinstance(m, dict) or not isinstance(m.get("merge"), dict) or "weight" not in m:
            raise c.fail(f"'predictor.postprocess.members[{i}]' must be a mapping with its merge and weight")
        c.type(m["weight"], _NUMBER, f"predictor.postprocess.members[{i}].weight")
        _member_merge(c, m["merge"], f"predictor.postprocess.members[{i}].merge")
    cal = post["calibration"]
    if "file" in cal:
        c.type(cal["file"], str, "predictor.postprocess.calibration.file")
        c.inside(cal["file"], "predictor.postprocess.calibration.file")


def _member_merge(c: _Checker, merge: Any, where: str) -> None:
    c.keys(merge, MERGE, where)
    c.strings(merge["classes"], f"{where}.classes")
    c.strings(merge["original"], f"{where}.original")


def engine_classes(doc: dict[str, Any]) -> list[int]:
    """How many classes each engine's graph outputs: a run's model classes; an ensemble member's own."""
    if "predictor" not in doc:
        return [len(doc["classes"])] * len(doc["engines"])
    p = doc["predictor"]
    members = p["postprocess"]["members"]
    return [len(members[m]["merge"]["classes"]) for m in p["engine_members"]]


def export_yaml(export_dir: Path | str) -> Path:
    return Path(export_dir) / EXPORT_FILE


def is_export_dir(path: Path | str) -> bool:
    return export_yaml(path).is_file()


def read_export(export_dir: Path | str) -> dict[str, Any]:
    """The export's description, checked for the fields the loader needs."""
    path = export_yaml(export_dir)
    if not path.is_file():
        raise CarclfError(f"'{export_dir}' is not an export directory (no {EXPORT_FILE}): run carclf export first")
    doc = read_yaml(path, "export the model again")
    needed = ("format", "engines", "classes", "merge", "config")
    missing = [k for k in needed if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise CarclfError(f"'{path}' lacks {', '.join(missing)}: it was not written by carclf export")
    validate_export(doc, path, export_dir, EXPORT_FORMAT)  # keys, types, files inside, the spec's checksum
    return doc


def _export_names(out: Path) -> set[str]:
    """What carclf writes in an export folder: what export.yaml lists, and graphs named as carclf names them (an
    export that stopped half-way)."""
    known = {EXPORT_FILE, EXPORT_MARKER, CALIBRATION_FILE}
    known |= {p.name for p in out.iterdir() if ENGINE_FILE_RE.fullmatch(p.name)}
    with contextlib.suppress(CarclfError):
        for e in read_export(out)["engines"]:
            known |= {f["file"] for f in e.get("files", {}).values()}
    return known


EXPORT_FOLDER = OwnedFolder("export directory", EXPORT_MARKER, _export_names, "an export")
