"""``carclf export --precision``: lower-precision engines beside the fp32 graphs, what each costs, how fast each runs
here, and the choice.

- bf16: each engine's fp32 graph compiled by OpenVINO with bf16 as its inference precision (AMX or AVX512-BF16
  kernels; ONNX Runtime has no bf16 convolutions on x86). Needs those instructions.
- int8: ONNX Runtime static (or dynamic) quantisation, in the format this CPU runs fastest: on a CPU with VNNI the
  8-bit-weight formats (QDQ, QOperator) and the 7-bit one are timed on one engine and the fastest kept; without VNNI
  only 7-bit weights run correctly, so that is the format.

Every lower precision is scored like the int8 graphs always were: each fold's engine on its own OOF photos at fp32
and at the lower precision, calibrated by its temperature; the change in log loss over all of them is the figure the
choice uses. Its calibrated probabilities are also compared with PyTorch fp32 on the parity photos.

``auto`` then times every precision this CPU has the instructions for (a few seconds: one engine per distinct
architecture, at ``batch`` photos, on the physical cores) and keeps the fastest whose OOF log-loss increase is within
``max_loss_increase`` and whose parity passed; fp32 when none is. export.yaml records the CPU (model, flags), every
figure and why.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from carclf.artifacts.run import FULL
from carclf.errors import CarclfError
from carclf.export.graphs import INPUT_NAME
from carclf.export.photos import FoldPhotos, oof_photos, photo_batches, synthetic_photos, training_photos
from carclf.export.quantize import DEFAULT_INT8_FORMAT, INT8_FORMATS, quantize_engine
from carclf.infer.onnx_engine import PARITY_TOLERANCE, load_engine, physical_cores
from carclf.infer.precision import NEEDS, cpu_has, lacks

__all__ = ["DEFAULT_MAX_LOSS_INCREASE", "PARITY_TOLERANCES", "REQUESTS", "choose", "cpu_has", "int8_formats", "lacks",
           "measure_speed", "parity_check", "plan", "score_precision", "time_engines", "write_bf16", "write_int8"]
from carclf.io import file_sha256
from carclf.metrics import score, softmax

REQUESTS = ("auto", "fp32", "bf16", "int8")
DEFAULT_MAX_LOSS_INCREASE = 0.01
# max |p - p_torch_fp32| of calibrated probabilities on the parity photos, per precision
PARITY_TOLERANCES = {"fp32": PARITY_TOLERANCE, "bf16": 0.05, "int8": 0.15}
Log = Callable[[str], None]


def plan(requested: str, int8_mode: str | None, cpu: dict[str, Any], log: Log) -> list[str]:
    """The lower precisions to make: what was asked for; ``auto``: bf16 where this CPU has AVX512-BF16 or AMX, int8
    where it has VNNI (without VNNI int8 has been slower than fp32 wherever it was measured: 0.7-0.8x on an AMD Zen
    2, benchmarks/RESULTS.md), so a CPU with neither exports fp32 alone. ``--int8`` alone (the older flag) adds
    int8 graphs to an fp32 export."""
    if requested not in REQUESTS:
        raise CarclfError(f"--precision {requested!r}: use {', '.join(REQUESTS)}")
    if requested == "fp32":
        return ["int8"] if int8_mode else []
    if requested != "auto":
        return [requested]
    out = []
    for p, need in (("bf16", "bf16"), ("int8", "vnni")):
        if cpu_has(need, cpu["flags"]):
            out.append(p)
        else:
            log(f"precision auto: no {p} engines (this CPU, {cpu['model']}, lacks {NEEDS[need][1]})")
    return out


def _entry_engines(predictor, doc: dict[str, Any]):
    return zip(doc["engines"], predictor.engines, predictor.temperatures, predictor.runs, strict=True)


def write_bf16(doc: dict[str, Any]) -> None:
    """bf16 is each engine's fp32 graph compiled by OpenVINO at bf16 (carclf.infer.openvino_engine): no new file,
    an entry naming the graph, its runtime and the instructions it needs."""
    for entry in doc["engines"]:
        f = entry["files"]["fp32"]
        entry["files"]["bf16"] = {"file": f["file"], "sha256": f["sha256"], "bytes": f["bytes"],
                                  "runtime": "openvino", "needs": "bf16"}


def _calibration(predictor, entry, engine, run, calib_photos: int, data_found: bool, log: Log
                 ) -> tuple[list[np.ndarray], str]:
    calib = training_photos(run, entry["fold"], calib_photos) if run is not None and data_found else []
    source = f"{len(calib)} training photos of {entry['name']}"
    if not calib:
        calib = synthetic_photos(min(calib_photos, 32), seed=1)
        source = f"{len(calib)} synthetic photos (the run's photos are gone)"
        log(f"int8 {entry['name']}: the run's photos are gone, calibrating on synthetic photos: expect a larger loss "
            "of accuracy")
    bs = predictor.cfg.predict.batch_size
    return [x[ok] for x, ok in photo_batches(calib, engine.dcfg, predictor.cfg, bs)], source


def time_engines(engines: dict[str, Any], batch: int, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images per second of each engine on one random uint8 batch: ``rounds`` rounds in which every engine runs for
    ``seconds / rounds`` (and at least twice) in turn, the median round per engine. Interleaving keeps a noisy
    neighbour on a shared host from favouring whichever engine ran in a quiet moment."""
    import statistics

    xs = {}
    for name, engine in engines.items():
        h, w = (int(v) for v in engine.dcfg["input_size"][1:])
        xs[name] = np.random.default_rng(0).integers(0, 256, (batch, 3, h, w), dtype=np.uint8)
        for _ in range(2):  # warm-up: kernels chosen, memory arenas grown
            engine.logits(xs[name])
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < seconds / rounds:
                engine.logits(xs[name])
                n += 1
            runs[name].append(n * batch / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in runs.items()}


def int8_formats(cpu: dict[str, Any]) -> list[str]:
    """The static int8 formats that run correctly on this CPU (8-bit weights need VNNI)."""
    return [f for f, spec in INT8_FORMATS.items() if cpu_has(spec["needs"], cpu["flags"])]


def write_int8(predictor, out: Path, doc: dict[str, Any], mode: str, cpu: dict[str, Any], calib_photos: int,
               data_found: bool, batch: int, seconds: float, log: Log) -> dict[str, Any]:
    """One ``<name>.int8.onnx`` per engine; with static quantisation and several formats this CPU can run, the
    format is the fastest on the first engine. Returns what was chosen and measured."""
    formats = int8_formats(cpu) if mode == "static" else [DEFAULT_INT8_FORMAT]
    timed: dict[str, float] = {}
    chosen = formats[0]
    threads = physical_cores()
    rows = []
    for i, (entry, engine, _, run) in enumerate(_entry_engines(predictor, doc)):
        fp32_path = out / entry["files"]["fp32"]["file"]
        int8_path = out / f"{entry['name']}.int8.onnx"
        calib, source = _calibration(predictor, entry, engine, run, calib_photos, data_found, log) \
            if mode == "static" else (None, "none")
        t0 = time.perf_counter()
        if i == 0 and len(formats) > 1:
            candidates = {}
            with tempfile.TemporaryDirectory(prefix="carclf-int8-") as tmp:
                for fmt in formats:
                    path = Path(tmp) / f"{fmt}.onnx"
                    quantize_engine(fp32_path, path, mode, INPUT_NAME, iter(calib), fmt)
                    # ONNX Runtime holds the graph in memory once its session is made: the folder can go
                    candidates[fmt] = load_engine(Path(tmp), {**entry, "files": {"int8": {"file": path.name}}},
                                                  "int8", threads, verify=False)
            timed = time_engines(candidates, batch, seconds * len(formats))
            chosen = max(timed, key=timed.__getitem__)
            log(f"int8 formats on {entry['name']} at batch {batch}: " + ", ".join(
                f"{f} {v:.1f} images/s" for f, v in timed.items()) + f" -> {chosen}")
        quantize_engine(fp32_path, int8_path, mode, INPUT_NAME, None if calib is None else iter(calib), chosen)
        need = INT8_FORMATS[chosen]["needs"] if mode == "static" else None
        entry["files"]["int8"] = {"file": int8_path.name, "sha256": file_sha256(int8_path),
                                  "bytes": int8_path.stat().st_size, "mode": mode, "calibration": source,
                                  "format": chosen, "runtime": "onnxruntime", **({"needs": need} if need else {})}
        rows.append({"engine": entry["name"], "seconds": round(time.perf_counter() - t0, 1)})
    return {"mode": mode, "format": chosen, "format_images_per_s": timed, "batch": batch, "quantised": rows}


def score_precision(predictor, out: Path, doc: dict[str, Any], precision: str, eval_photos: int,
                    data_found: bool, log: Log) -> dict[str, Any]:
    """Each fold's engine at fp32 and at ``precision`` on its own OOF photos (calibrated by its temperature): log
    loss and accuracy of both, per engine and over all."""
    bs = predictor.cfg.predict.batch_size
    rows, p32, plow, all_labels = [], [], [], []
    for entry, t_engine, temp, run in _entry_engines(predictor, doc):
        fold = entry["fold"]
        row: dict[str, Any] = {"engine": entry["name"]}
        photos = (oof_photos(run, fold, eval_photos) if run is not None and data_found and fold != FULL
                  else FoldPhotos([], np.zeros(0, np.int64), 0))
        if not photos.paths:
            log(f"{precision} {entry['name']}: its change in accuracy is not measured (no OOF photos on disk)")
            rows.append(row)
            continue
        fp32 = load_engine(out, entry, "fp32")
        low = load_engine(out, entry, precision)
        l32, llow, oks = [], [], []
        for x, ok in photo_batches(photos.paths, t_engine.dcfg, predictor.cfg, bs):
            l32.append(fp32.logits(x))
            llow.append(low.logits(x))
            oks.append(ok)
        ok = np.concatenate(oks)
        a32, alow = np.concatenate(l32)[ok], np.concatenate(llow)[ok]
        labels = photos.labels[ok]
        s32, slow = score(softmax(a32, temp), labels), score(softmax(alow, temp), labels)
        row.update({"n": int(ok.sum()), "log_loss_fp32": s32["log_loss"], f"log_loss_{precision}": slow["log_loss"],
                    "accuracy_fp32": s32["accuracy"], f"accuracy_{precision}": slow["accuracy"],
                    "agreement": float((a32.argmax(1) == alow.argmax(1)).mean())})
        p32.append(softmax(a32, temp))
        plow.append(softmax(alow, temp))
        all_labels.append(labels)
        log(f"{precision} {entry['name']}: OOF log loss {s32['log_loss']:.4f} -> {slow['log_loss']:.4f} "
            f"({slow['log_loss'] - s32['log_loss']:+.4f}), accuracy {s32['accuracy']:.4f} -> {slow['accuracy']:.4f} "
            f"on {int(ok.sum())} OOF photos")
        rows.append(row)
    result: dict[str, Any] = {"engines": rows}
    if not all_labels:
        result["note"] = "no OOF photos on disk: the change in log loss and accuracy is not measured"
        return result
    labels = np.concatenate(all_labels)
    s32, slow = score(np.concatenate(p32), labels), score(np.concatenate(plow), labels)
    result.update({"n": int(len(labels)), "log_loss_fp32": s32["log_loss"], f"log_loss_{precision}": slow["log_loss"],
                   "delta_log_loss": slow["log_loss"] - s32["log_loss"], "accuracy_fp32": s32["accuracy"],
                   f"accuracy_{precision}": slow["accuracy"], "delta_accuracy": slow["accuracy"] - s32["accuracy"]})
    log(f"{precision} over {len(labels)} OOF photos (each fold's engine on its own OOF photos, calibrated): log loss "
        f"{s32['log_loss']:.4f} -> {slow['log_loss']:.4f} ({result['delta_log_loss']:+.4f}), accuracy "
        f"{s32['accuracy']:.4f} -> {slow['accuracy']:.4f} ({result['delta_accuracy']:+.4f})")
    return result


def measure_speed(out: Path, doc: dict[str, Any], precisions: list[str], groups: list[int], cpu: dict[str, Any],
                  batch: int, seconds: float, log: Log) -> dict[str, Any]:
    """Images per second of the whole export (every engine, one after another, as the Predictor runs them) at each
    precision this CPU has the instructions for, timing one engine per group of same-structure engines (all of them
    interleaved: :func:`time_engines`)."""
    threads = physical_cores()
    speed: dict[str, Any] = {"batch": batch, "threads": threads, "seconds_per_engine": seconds}
    runnable = []
    for precision in precisions:
        gap = lacks(doc["engines"][0]["files"][precision].get("needs"), cpu["flags"])
        if gap:
            speed[precision] = None
            log(f"{precision}: not timed (this CPU lacks {gap})")
            continue
        runnable.append(precision)
    first = {g: entry for entry, g in reversed(list(zip(doc["engines"], groups, strict=True)))}
    engines = {(p, g): load_engine(out, entry, p, threads) for p in runnable for g, entry in first.items()}
    per = time_engines({f"{p}/{g}": e for (p, g), e in engines.items()}, batch, seconds * len(engines))
    for p in runnable:  # the whole export: every engine in turn, as the Predictor runs them
        speed[p] = 1.0 / sum(1.0 / per[f"{p}/{g}"] for g in groups)
    return speed


def choose(doc: dict[str, Any], requested: str, made: list[str], speed: dict[str, Any], bound: float,
           cpu: dict[str, Any], log: Log) -> dict[str, Any]:
    """The precision export.yaml records as chosen, with every candidate's figures and the reason."""
    rows: dict[str, dict[str, Any]] = {"fp32": {"images_per_s": speed.get("fp32"), "delta_log_loss": 0.0,
                                                "eligible": True, "why": "the reference"}}
    for p in made:
        d, parity = doc[p].get("delta_log_loss"), doc[p].get("parity", {})
        why = ("this CPU lacks " + lacks(doc["engines"][0]["files"][p].get("needs"), cpu["flags"])
               if speed.get(p) is None and "fp32" in speed else
               "parity failed" if not parity.get("passed", False) else
               "its change in OOF log loss is not measured (no OOF photos)" if d is None else
               f"OOF log loss {d:+.4f} exceeds the bound {bound:+.4f}" if d > bound else "")
        rows[p] = {"images_per_s": speed.get(p), "delta_log_loss": d, "eligible": not why, "why": why or "eligible"}
    if requested == "auto":
        eligible = [p for p, r in rows.items() if r["eligible"] and r["images_per_s"]]
        chosen = max(eligible, key=lambda p: rows[p]["images_per_s"]) if eligible else "fp32"
        reason = (f"auto: the fastest of {', '.join(eligible)} within the OOF log-loss bound {bound:+.4f}" if eligible
                  else "auto: fp32 (nothing else was timed)")
    else:
        chosen = requested if requested in made else "fp32"
        reason = f"--precision {requested}"
        if chosen != "fp32" and not rows[chosen]["eligible"]:
            log(f"warning: --precision {requested} as asked, although {rows[chosen]['why']} (auto would not choose "
                "it)")
    base = rows["fp32"]["images_per_s"]
    for p, r in rows.items():
        ips = r["images_per_s"]
        log(f"  {p:>4}: " + (f"{ips:7.1f} photos/s" + (f" ({ips / base:.2f}x fp32)" if base else "") if ips
                             else "  not timed") + f", {r['why']}")
    log(f"precision: {chosen} ({reason}); on {cpu['model']}")
    return {"requested": requested, "chosen": chosen, "reason": reason, "max_loss_increase": bound,
            "cpu": cpu, "speed": speed, "candidates": rows}


def parity_check(predictor, export_predictor, sources: list, kind: str, precision: str, batches,
                 log: Log) -> dict[str, Any]:
    """Max |p_export - p_torch| of calibrated probabilities over ``sources`` (both Predictors' ``predict``) against
    the precision's tolerance; and per engine, the max logit difference."""
    tol = PARITY_TOLERANCES[precision]
    p_torch, bad_t = predictor.predict(sources, num_workers=0, fill_bad=False)
    p_exp, bad_o = export_predictor.predict(sources, num_workers=0, fill_bad=False)
    if bad_t != bad_o:
        raise CarclfError(f"parity: PyTorch and the export disagree on which photos decode ({bad_t} vs {bad_o})")
    ok = np.ones(len(sources), bool)
    ok[bad_t] = False
    if not ok.any():
        raise CarclfError("parity: none of the parity photos could be decoded")
    diff = float(np.abs(p_torch[ok] - p_exp[ok]).max())
    logit_diffs = []
    for t_engine, o_engine in zip(predictor.engines, export_predictor.engines, strict=True):
        x, m = next(batches(sources, t_engine.dcfg, predictor.cfg, len(sources)))
        logit_diffs.append(float(np.abs(t_engine.logits(x[m]) - o_engine.logits(x[m])).max()))
    passed = diff < tol
    label = "parity" if precision == "fp32" else f"parity of {precision}"
    log(f"{label} on {int(ok.sum())} {kind} photo(s): max |p_export - p_torch| = {diff:.2e} "
        f"({'below' if passed else 'ABOVE'} {tol:g}); max logit difference per engine: "
        + ", ".join(f"{d:.1e}" for d in logit_diffs))
    return {"photos": kind, "n": int(ok.sum()), "max_abs_diff": diff, "tolerance": tol, "passed": bool(passed),
            "max_logit_diff": logit_diffs}
