"""``carclf export``: a run's (or an ensemble's) fold engines as ONNX graphs, with everything the Predictor needs
beside them.

One graph per fold engine (an ensemble: per fold of every member with a weight above 0, named ``m<i>.fold<k>``):
uint8 NCHW pixels -> normalisation -> the TTA views -> the network -> logits averaged over the views (what
:class:`~carclf.infer.predictor.TorchFold` computes), with a dynamic batch axis. ``export.yaml`` holds the
preprocessing (timm data config per engine), class names and merges, temperatures, the run's config, each graph's
checksum, the parity figure and (with ``--precision``, export/precision.py) the bf16 and int8 engines' change in OOF
log loss and accuracy, their speed on the exporting machine and the precision chosen there. An ensemble's
post-processing (member weights, space, member merges, final calibration, clipping) is plain data in export.yaml
(vector / matrix calibration arrays in ``calibration.npz``, checksummed), applied by the same numpy code.
:meth:`carclf.infer.predictor.Predictor.from_export` rebuilds the Predictor from that directory alone, and
:func:`onnx_predictor` is "this run on ONNX Runtime" through an export in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from carclf.artifacts.ensemble import save_calibration
from carclf.artifacts.export import EXPORT_FILE, EXPORT_FOLDER, EXPORT_FORMAT, EXPORT_MARKER, SPEC_KEY, spec_checksum
from carclf.artifacts.resolve import EXPORT, kind_of
from carclf.artifacts.run import FULL
from carclf.errors import CarclfError
from carclf.export import precision
from carclf.export.graphs import INPUT_NAME, OUTPUT_NAME, EngineModule, export_graph, retarget_graph, structure
from carclf.export.photos import oof_photos, photo_batches, synthetic_photos
from carclf.export.quantize import INT8_MODES
from carclf.infer.onnx_engine import PARITY_TOLERANCE, dcfg_to_yaml
from carclf.infer.predictor import Predictor
from carclf.io import atomic_write_text, file_sha256
from carclf.runtime import cpu_info


def _engine_names(predictor) -> list[str]:
    """File stems: ``fold<k>`` / ``full`` for a run; ``m<i>.fold<k>`` for member ``i`` of an ensemble (member names
    are free text: spaces, Korean, slashes; the yaml keeps them)."""
    names = ["full" if k == FULL else f"fold{k}" for k in predictor.folds]
    if predictor.postprocess:
        names = [f"m{m}.{n}" for m, n in zip(predictor.engine_members, names, strict=True)]
    return names


def _prepare_out(out: Path, overwrite: bool, source: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise CarclfError(f"-o '{out}' is inside the run directory '{source}': export elsewhere (a run directory "
                          "holds only what training writes)")
    EXPORT_FOLDER.make_room(out, overwrite)


def _ensemble_state(predictor, out: Path) -> dict[str, Any]:
    """An ensemble Predictor's numpy post-processing as export.yaml data (``Predictor.from_export`` reads it back);
    vector / matrix calibration arrays go to ``calibration.npz`` with their checksum."""
    post = dict(predictor.postprocess)
    post["calibration"] = save_calibration(out, post["calibration"])
    return {"postprocess": post, "engine_members": list(predictor.engine_members),
            "engine_names": list(predictor.engine_names)}


def _plain(obj: Any) -> Any:
    """YAML-safe: str subclasses (torch's version string), numpy scalars and tuples as plain Python values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)
    return obj


def _write_doc(out: Path, doc: dict[str, Any]) -> None:
    """export.yaml, with the checksum of its content (``spec_sha256``, last) that the loader checks."""
    plain = {k: v for k, v in _plain(doc).items() if k != SPEC_KEY}
    plain[SPEC_KEY] = spec_checksum(plain)
    text = yaml.safe_dump(plain, allow_unicode=True, sort_keys=False, width=120, default_flow_style=None)
    atomic_write_text(out / EXPORT_FILE, text)


def _export_engines(predictor: Predictor, out: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One graph per engine (traced, or a traced graph of the same structure with this engine's weights); their
    export.yaml entries."""
    engines, templates = [], {}
    for i, (name, fold, engine, temp, size) in enumerate(zip(_engine_names(predictor), predictor.folds,
                                                             predictor.engines, predictor.temperatures,
                                                             predictor.eval_sizes, strict=True)):
        engine.amp = None  # the graph is fp32; compare with fp32 PyTorch
        h, w = int(engine.dcfg["input_size"][1]), int(engine.dcfg["input_size"][2])
        t0 = time.perf_counter()
        path = out / f"{name}.onnx"
        module = EngineModule(engine.model, engine.dcfg, engine.views)
        key = structure(engine, module)
        how = "traced"
        if key in templates and retarget_graph(templates[key][0], module, path, templates[key][2]):
            opset, how = templates[key][1], f"{templates[key][0].name} with {name}'s weights"
        else:
            opset = export_graph(module, h, w, path)
            templates.setdefault(key, (path, opset, {k: v.detach().clone() for k, v in module.state_dict().items()}))
        log(f"exported {name}: {h}x{w}, views {','.join(engine.views)} -> {path} ({how}, "
            f"{time.perf_counter() - t0:.1f} s)")
        engines.append({
            "name": name, "fold": int(fold), "eval_size": int(size), "temperature": float(temp),
            "views": list(engine.views), "data_config": dcfg_to_yaml(engine.dcfg),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", 3, h, w],
                      "note": "RGB pixels after the eval transform (resize, centre crop), before normalisation"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(predictor.classes)],
                       "note": "logits averaged over the views; divide by temperature, softmax"},
            "opset": opset,
            "files": {"fp32": {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}},
        })
        if predictor.postprocess:
            engines[-1]["member"] = predictor.postprocess["members"][predictor.engine_members[i]]["name"]
    return engines


def _export_doc(predictor: Predictor, source: Path, engines: list[dict[str, Any]]) -> dict[str, Any]:
    """export.yaml's content, without the parity and int8 figures (measured once the graphs are written)."""
    import onnx
    import onnxruntime

    from carclf.runtime import versions

    return {
        "format": EXPORT_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"kind": "ensemble" if predictor.postprocess else "run", "path": str(source.resolve())},
        "classes": list(predictor.classes),
        "output_classes": list(predictor.output_classes),
        "merge": predictor.merge.to_dict(),
        "engines": engines,
        "averaging": ("per member: mean of its engines' tempered probabilities, shared out over the submission's "
                      "columns; members combined and calibrated as 'predictor.postprocess' says (Predictor)"
                      if predictor.postprocess else
                      "mean of the engines' calibrated probabilities, then merged classes shared out (Predictor)"),
        "versions": {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "config": predictor.cfg.to_dict(),
    }


def _parity_sources(predictor: Predictor, parity_photos: int, log: Callable[[str], None]) -> tuple[list, str]:
    """A few out-of-fold photos of every engine's fold when the data is still there (``"out-of-fold"``), else
    synthetic photos (``"synthetic"``)."""
    sources: list = []
    folds_per_run = {}  # ensemble members often validated the same photos: one entry per distinct (data, fold)
    for r, k in zip(predictor.runs, predictor.folds, strict=True):
        if r is not None and k != FULL:
            folds_per_run.setdefault((str(r.read_config().data.root), k), (r, k))
    per = max(1, -(-parity_photos // max(1, len(folds_per_run))))
    for r, k in folds_per_run.values():
        with contextlib.suppress(OSError, KeyError, ValueError, CarclfError):  # then synthetic photos
            sources += [p for p in oof_photos(r, k, per).paths if p not in sources]
    if sources:
        return sources, "out-of-fold"
    log(f"parity: the run's photos are not on disk (data.root={predictor.cfg.data.root}); checking on synthetic "
        "photos instead")
    return synthetic_photos(parity_photos), "synthetic"


def _lower_precisions(predictor: Predictor, out: Path, doc: dict[str, Any], requested: str, int8: str | None,
                      sources: list, kind: str, opts: dict[str, Any], log: Callable[[str], None]) -> None:
    """The bf16 / int8 engines ``requested`` asks for, each scored on OOF photos and parity-checked, then timed on
    this machine and the precision chosen (export/precision.py); export.yaml is rewritten after each step."""
    cpu = cpu_info()
    made = precision.plan(requested, int8, cpu, log)
    for p in made:
        quantised: dict[str, Any] = {}
        if p == "bf16":
            precision.write_bf16(doc)
        else:
            quantised = precision.write_int8(predictor, out, doc, int8 or "static", cpu, opts["calib_photos"],
                                             kind == "out-of-fold", opts["batch"], opts["seconds"], log)
        _write_doc(out, doc)  # the checks below read the export back as a user would
        gap = precision.lacks(doc["engines"][0]["files"][p].get("needs"), cpu["flags"])
        if gap:  # its figures here would be another precision's (OpenVINO runs fp32) or wrong (saturating int8)
            doc[p] = {**quantised, "note": f"not scored or parity-checked: this CPU lacks {gap}",
                      "parity": {"passed": False, "note": f"not checked: this CPU lacks {gap}"}}
            log(f"{p}: written for another machine; not scored here (this CPU lacks {gap})")
        else:
            doc[p] = {**quantised, **precision.score_precision(predictor, out, doc, p, opts["eval_photos"],
                                                              kind == "out-of-fold", log)}
            doc[p]["parity"] = precision.parity_check(predictor, Predictor.from_export(out, p, log=log), sources,
                                                      kind, p, photo_batches, log)
        _write_doc(out, doc)
    if requested == "fp32" and not made:
        return  # a plain fp32 export, as before: nothing to choose
    groups = _structure_groups(predictor)
    if requested == "fp32":  # --int8 alone: the int8 graphs are written and scored; fp32 stays the choice
        speed: dict[str, Any] = {}
    else:
        log(f"timing each precision on this machine ({cpu['model']}, batch {opts['batch']})")
        speed = precision.measure_speed(out, doc, ["fp32", *made], groups, cpu, opts["batch"], opts["seconds"], log)
    doc["precision"] = precision.choose(doc, requested, made, speed, opts["max_loss_increase"], cpu, log)
    _write_doc(out, doc)


def _structure_groups(predictor: Predictor) -> list[int]:
    """Per engine, the index of its group of engines with the same structure (timed once)."""
    keys: dict[tuple, int] = {}
    return [keys.setdefault(structure(e, EngineModule(e.model, e.dcfg, e.views)), len(keys))
            for e in predictor.engines]


def export_model(
    source: Path | str, out: Path | str, int8: str | None = None, overwrite: bool = False, parity_photos: int = 8,
    calib_photos: int = 64, eval_photos: int = 256, log: Callable[[str], None] = print, precision_request: str = "fp32",
    max_loss_increase: float = precision.DEFAULT_MAX_LOSS_INCREASE, speed_batch: int = 32, speed_seconds: float = 2.0,
) -> Path:
    """Export a run's (or an ensemble's) fold engines to ``out``; returns the path of ``export.yaml``.

    ``precision_request``: fp32 (only the fp32 graphs), bf16 or int8 (that precision too, chosen), or auto (bf16
    where the CPU has its instructions, and int8; then the fastest on this machine whose OOF log-loss increase is
    within ``max_loss_increase``); see :mod:`carclf.export.precision`. ``int8``: static or dynamic quantisation
    (alone, as before: int8 graphs beside an fp32 export). Lower precisions are scored on up to ``eval_photos`` OOF
    photos per fold. ``parity_photos`` OOF photos (synthetic ones when the run's data is gone) check that the
    export's calibrated probabilities match PyTorch's."""
    if int8 is not None and int8 not in INT8_MODES:
        raise CarclfError(f"--int8 {int8!r}: use static or dynamic")
    if precision_request not in precision.REQUESTS:
        raise CarclfError(f"--precision {precision_request!r}: use {', '.join(precision.REQUESTS)}")
    if precision_request == "bf16" and int8:
        raise CarclfError("--int8 with --precision bf16: choose one (or --precision auto, which makes both)")
    source, out = Path(source), Path(out)
    if kind_of(source) == EXPORT:  # its engines are ONNX graphs already: no torch model to trace
        raise CarclfError(f"'{source}' is an export folder already: export the run or ensemble it was made from")
    predictor = Predictor.open(source, device="cpu")
    _prepare_out(out, overwrite, source)
    atomic_write_text(out / EXPORT_MARKER, json.dumps({"kind": "export", "source": str(source.resolve()),
                                                       "created": datetime.now(UTC).isoformat(timespec="seconds")}))
    doc = _export_doc(predictor, source, _export_engines(predictor, out, log))
    if predictor.postprocess:
        doc["predictor"] = _ensemble_state(predictor, out)
    _write_doc(out, doc)
    sources, kind = _parity_sources(predictor, parity_photos, log)
    sources = sources[:parity_photos]
    doc["parity"] = precision.parity_check(predictor, Predictor.from_export(out, "fp32"), sources, kind, "fp32",
                                           photo_batches, log)
    _write_doc(out, doc)
    if not doc["parity"]["passed"]:
        raise CarclfError(f"parity check failed: max |p_onnx - p_torch| = {doc['parity']['max_abs_diff']:.2e} >= "
                          f"{PARITY_TOLERANCE:g}; '{out}' is marked as failed and will not load")
    opts = {"calib_photos": calib_photos, "eval_photos": eval_photos, "batch": speed_batch, "seconds": speed_seconds,
            "max_loss_increase": max_loss_increase}
    _lower_precisions(predictor, out, doc, precision_request, int8, sources, kind, opts, log)
    return out / EXPORT_FILE


def onnx_predictor(source: Path | str, threads: int | None = None, log: Callable[[str], None] = print) -> Predictor:
    """A run or an ensemble on ONNX Runtime: exported (parity-checked) to a temporary folder and loaded from there
    (``predict --engine onnx`` on a run; ``carclf export`` keeps the folder for reuse)."""
    with tempfile.TemporaryDirectory(prefix="carclf-onnx-") as tmp:
        log(f"exporting '{source}' to ONNX in a temporary folder (carclf export keeps one for reuse)")
        export_model(source, tmp, log=log)
        # ONNX Runtime reads each graph when its session is made: the folder can go afterwards.
        return Predictor.from_export(tmp, "fp32", threads)
