"""``carclf export``: a run's (or an ensemble's) fold engines as ONNX graphs, with everything the Predictor needs
beside them.

One graph per fold engine (an ensemble: per fold of every member with a weight above 0, named ``m<i>.fold<k>``):
uint8 NCHW pixels -> normalisation -> the TTA views -> the network -> logits averaged over the views (what
:class:`~carclf.infer.predictor.TorchFold` computes), with a dynamic batch axis. ``export.yaml`` holds the
preprocessing (timm data config per engine), class names and merges, temperatures, the run's config, each graph's
checksum, the parity figure and (with ``--int8``) the int8 graphs' change in OOF log loss and accuracy. An ensemble's
post-processing (member weights, space, member merges, final calibration, clipping) is plain data in export.yaml
(vector / matrix calibration arrays in ``calibration.npz``, checksummed), applied by the same numpy code.
:meth:`carclf.infer.predictor.Predictor.from_export` rebuilds the Predictor from that directory alone, and
:func:`onnx_predictor` is "this run on ONNX Runtime" through an export in a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from carclf.artifacts.ensemble import save_calibration
from carclf.artifacts.export import EXPORT_FILE, EXPORT_FOLDER, EXPORT_FORMAT, EXPORT_MARKER, SPEC_KEY, spec_checksum
from carclf.artifacts.resolve import EXPORT, kind_of
from carclf.artifacts.run import FULL
from carclf.errors import CarclfError
from carclf.export.photos import FoldPhotos, oof_photos, synthetic_photos, training_photos
from carclf.export.quantize import INT8_MODES, quantize_engine
from carclf.infer.onnx_engine import PARITY_TOLERANCE, OnnxFold, dcfg_to_yaml
from carclf.infer.predictor import Predictor
from carclf.io import atomic_write, atomic_write_text, file_sha256
from carclf.metrics import score, softmax
from carclf.models.forward import apply_view

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


class EngineModule(nn.Module):
    """uint8 NCHW pixels -> logits averaged over the TTA views: a fold engine's whole computation as one module
    (the same operations, in the same order, as :func:`carclf.models.forward.batch_logits`)."""

    def __init__(self, model: nn.Module, dcfg: dict[str, Any], views: list[str]) -> None:
        super().__init__()
        self.model, self.views = model, list(views)
        # Buffer names must not collide with the network's parameter names inside the ONNX graph.
        self.register_buffer("pixel_mean", torch.tensor([m * 255 for m in dcfg["mean"]]).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([s * 255 for s in dcfg["std"]]).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() - self.pixel_mean) / self.pixel_std
        return torch.stack([self.model(apply_view(x, v)).float() for v in self.views]).mean(0)


def export_graph(module: nn.Module, height: int, width: int, path: Path) -> int:
    """``module`` as an ONNX graph with a dynamic batch axis, written atomically to ``path``; returns the opset.

    The torch.export-based exporter (onnxscript) is used: the TTA views compute sizes from the input's shape
    (zoom, crops), which the legacy TorchScript exporter cannot trace, and it is deprecated."""
    module = module.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros((2, 3, height, width), dtype=torch.uint8)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}}, report=False, verbose=False,
            )
    except Exception as exc:  # exporter failures come in many types; all mean "this graph cannot be exported"
        raise CarclfError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    opset = program.model.opset_imports.get("", 0)
    atomic_write(path, lambda fh: fh.write(program.model_proto.SerializeToString()), "wb")
    return int(opset)


def retarget_graph(template: Path, module: nn.Module, path: Path,
                   template_state: dict[str, torch.Tensor] | None = None) -> bool:
    """Write ``template`` (the graph of another engine of the same architecture, input size and views) with
    ``module``'s weights to ``path``: the exporter names every initialiser after its parameter or buffer, so one
    trace serves every fold of a run (each export takes 10-20 s on 2 cores, a copy well under one). False, and
    nothing written, when any weight's name, shape or dtype does not line up; the parity check then compares every
    engine with PyTorch either way."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(template))
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    seen = set()
    for init in proto.graph.initializer:
        if init.name not in state:
            continue
        new = np.ascontiguousarray(state[init.name].detach().cpu().numpy())
        if tuple(init.dims) != new.shape or onnx.helper.tensor_dtype_to_np_dtype(init.data_type) != new.dtype:
            return False
        init.CopyFrom(numpy_helper.from_array(new, init.name))
        seen.add(init.name)
    # Weights the exporter folded into constants (frozen BatchNorm layers of a frozen stem) are not initialisers:
    # the copy is right only if they equal the template's (frozen pretrained layers are the same in every fold and
    # member); otherwise trace.
    folded = {k for k in state if k.startswith("model.")} - seen
    if folded and (template_state is None
                   or any(k not in template_state or not torch.equal(state[k], template_state[k]) for k in folded)):
        return False
    atomic_write(path, lambda fh: fh.write(proto.SerializeToString()), "wb")
    return True


def _structure(engine, module: nn.Module) -> tuple:
    """What two engines must share for one graph to serve both."""
    arch = getattr(engine.model, "pretrained_cfg", {}).get("architecture", type(engine.model).__name__)
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items())
    return arch, json.dumps(dcfg_to_yaml(engine.dcfg), sort_keys=True), tuple(engine.views), shapes


def _batches(sources: list, dcfg: dict[str, Any], cfg, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 NCHW batch, ok mask) over ``sources``, decoded and transformed as the Predictor does."""
    from carclf.data.dataset import ImageDataset, eval_batches
    from carclf.data.transforms import eval_transform

    ds = ImageDataset(sources, None, eval_transform(dcfg), int(dcfg["input_size"][1]), cfg.data.draft_factor,
                      max_pixels=cfg.data.max_pixels)
    for x, _, _, ok in eval_batches(ds, batch_size):
        yield x.numpy(), ok.numpy().astype(bool)


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


def _parity(predictor, out: Path, sources: list, kind: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Max |p_onnx - p_torch| of calibrated probabilities over ``sources``, through both Predictors' ``predict``;
    and per engine, the max logit difference."""
    onnx_pred = Predictor.from_export(out)
    p_torch, bad_t = predictor.predict(sources, num_workers=0, fill_bad=False)
    p_onnx, bad_o = onnx_pred.predict(sources, num_workers=0, fill_bad=False)
    if bad_t != bad_o:
        raise CarclfError(f"parity: PyTorch and the export disagree on which photos decode ({bad_t} vs {bad_o})")
    ok = np.ones(len(sources), bool)
    ok[bad_t] = False
    if not ok.any():
        raise CarclfError("parity: none of the parity photos could be decoded")
    diff = float(np.abs(p_torch[ok] - p_onnx[ok]).max())
    logit_diffs = []
    for t_engine, o_engine in zip(predictor.engines, onnx_pred.engines, strict=True):
        x, m = next(_batches(sources, t_engine.dcfg, predictor.cfg, len(sources)))
        logit_diffs.append(float(np.abs(t_engine.logits(x[m]) - o_engine.logits(x[m])).max()))
    passed = diff < PARITY_TOLERANCE
    log(f"parity on {int(ok.sum())} {kind} photo(s): max |p_onnx - p_torch| = {diff:.2e} "
        f"({'below' if passed else 'ABOVE'} {PARITY_TOLERANCE:g}); max logit difference per engine: "
        + ", ".join(f"{d:.1e}" for d in logit_diffs))
    return {"photos": kind, "n": int(ok.sum()), "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE,
            "passed": bool(passed), "max_logit_diff": logit_diffs}


def _oof_logits(engine, photos: list[Path], cfg, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    out, oks = [], []
    for x, ok in _batches(photos, engine.dcfg, cfg, batch_size):
        out.append(engine.logits(x))
        oks.append(ok)
    return np.concatenate(out), np.concatenate(oks)


def _int8(predictor: Predictor, out: Path, doc: dict[str, Any], mode: str, calib_photos: int, eval_photos: int,
          data_found: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Quantise every engine; score fp32 and int8 on the fold's OOF photos (calibrated by its temperature)."""
    cfg = predictor.cfg
    bs = cfg.predict.batch_size
    rows, all32, all8, all_labels = [], [], [], []
    for entry, t_engine, temp, run in zip(doc["engines"], predictor.engines, predictor.temperatures, predictor.runs,
                                          strict=True):
        fold = entry["fold"]
        fp32_path = out / entry["files"]["fp32"]["file"]
        int8_path = out / f"{entry['name']}.int8.onnx"
        calib_source = "none"
        calibration = None
        if mode == "static":
            calib = training_photos(run, fold, calib_photos) if run is not None and data_found else []
            calib_source = f"{len(calib)} training photos of {entry['name']}"
            if not calib:
                calib = synthetic_photos(min(calib_photos, 32), seed=1)
                calib_source = f"{len(calib)} synthetic photos (the run's photos are gone)"
                log(f"int8 {entry['name']}: the run's photos are gone, calibrating on synthetic photos: expect a "
                    "larger loss of accuracy")
            calibration = (x[ok] for x, ok in _batches(calib, t_engine.dcfg, cfg, bs))
        t0 = time.perf_counter()
        quantize_engine(fp32_path, int8_path, mode, INPUT_NAME, calibration)
        entry["files"]["int8"] = {"file": int8_path.name, "sha256": file_sha256(int8_path),
                                  "bytes": int8_path.stat().st_size, "mode": mode, "calibration": calib_source}
        row: dict[str, Any] = {"engine": entry["name"], "mode": mode, "seconds": round(time.perf_counter() - t0, 1)}
        photos = (oof_photos(run, fold, eval_photos) if run is not None and data_found and fold != FULL
                  else FoldPhotos([], np.zeros(0, np.int64), 0))
        if photos.paths:
            fp32 = OnnxFold(fp32_path, t_engine.dcfg, t_engine.views)
            int8 = OnnxFold(int8_path, t_engine.dcfg, t_engine.views, precision="int8")
            l32, ok = _oof_logits(fp32, photos.paths, cfg, bs)
            l8, _ = _oof_logits(int8, photos.paths, cfg, bs)
            labels = photos.labels[ok]
            s32, s8 = score(softmax(l32[ok], temp), labels), score(softmax(l8[ok], temp), labels)
            row.update(n=int(ok.sum()), log_loss_fp32=s32["log_loss"], log_loss_int8=s8["log_loss"],
                       accuracy_fp32=s32["accuracy"], accuracy_int8=s8["accuracy"],
                       agreement=float((l32[ok].argmax(1) == l8[ok].argmax(1)).mean()))
            all32.append(softmax(l32[ok], temp))
            all8.append(softmax(l8[ok], temp))
            all_labels.append(labels)
            log(f"int8 {entry['name']} ({mode}): OOF log loss {s32['log_loss']:.4f} -> {s8['log_loss']:.4f} "
                f"({s8['log_loss'] - s32['log_loss']:+.4f}), accuracy {s32['accuracy']:.4f} -> {s8['accuracy']:.4f} "
                f"({s8['accuracy'] - s32['accuracy']:+.4f}) on {int(ok.sum())} OOF photos")
        else:
            log(f"int8 {entry['name']} ({mode}): written; its change in accuracy is not measured (no OOF photos "
                "on disk)")
        rows.append(row)
    result: dict[str, Any] = {"mode": mode, "engines": rows}
    if all_labels:
        labels = np.concatenate(all_labels)
        s32, s8 = score(np.concatenate(all32), labels), score(np.concatenate(all8), labels)
        result.update(n=int(len(labels)), log_loss_fp32=s32["log_loss"], log_loss_int8=s8["log_loss"],
                      delta_log_loss=s8["log_loss"] - s32["log_loss"], accuracy_fp32=s32["accuracy"],
                      accuracy_int8=s8["accuracy"], delta_accuracy=s8["accuracy"] - s32["accuracy"])
        log(f"int8 over {len(labels)} OOF photos (each fold's engine on its own OOF photos, calibrated): log loss "
            f"{s32['log_loss']:.4f} -> {s8['log_loss']:.4f} ({result['delta_log_loss']:+.4f}), accuracy "
            f"{s32['accuracy']:.4f} -> {s8['accuracy']:.4f} ({result['delta_accuracy']:+.4f})")
    else:
        result["note"] = "no OOF photos on disk: the change in log loss and accuracy is not measured"
    return result


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
        key = _structure(engine, module)
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


def export_model(
    source: Path | str, out: Path | str, int8: str | None = None, overwrite: bool = False, parity_photos: int = 8,
    calib_photos: int = 64, eval_photos: int = 256, log: Callable[[str], None] = print,
) -> Path:
    """Export a run's (or an ensemble's) fold engines to ``out``; returns the path of ``export.yaml``.

    ``int8``: ``static`` or ``dynamic`` also writes an int8 graph per engine and measures its change in OOF log
    loss and accuracy on up to ``eval_photos`` OOF photos per fold. ``parity_photos`` OOF photos (synthetic ones
    when the run's data is gone) check that the export's calibrated probabilities match PyTorch's."""
    if int8 is not None and int8 not in INT8_MODES:
        raise CarclfError(f"--int8 {int8!r}: use static or dynamic")
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
    doc["parity"] = _parity(predictor, out, sources[:parity_photos], kind, log)
    _write_doc(out, doc)
    if not doc["parity"]["passed"]:
        raise CarclfError(f"parity check failed: max |p_onnx - p_torch| = {doc['parity']['max_abs_diff']:.2e} >= "
                          f"{PARITY_TOLERANCE:g}; '{out}' is marked as failed and will not load")
    if int8:
        doc["int8"] = _int8(predictor, out, doc, int8, calib_photos, eval_photos, kind == "out-of-fold", log)
        _write_doc(out, doc)
    return out / EXPORT_FILE


def onnx_predictor(source: Path | str, threads: int | None = None, log: Callable[[str], None] = print) -> Predictor:
    """A run or an ensemble on ONNX Runtime: exported (parity-checked) to a temporary folder and loaded from there
    (``predict --engine onnx`` on a run; ``carclf export`` keeps the folder for reuse)."""
    with tempfile.TemporaryDirectory(prefix="carclf-onnx-") as tmp:
        log(f"exporting '{source}' to ONNX in a temporary folder (carclf export keeps one for reuse)")
        export_model(source, tmp, log=log)
        # ONNX Runtime reads each graph when its session is made: the folder can go afterwards.
        return Predictor.from_export(tmp, "fp32", threads)
