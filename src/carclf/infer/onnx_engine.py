"""ONNX Runtime engines for the :class:`~carclf.infer.predictor.Predictor` (an :class:`~carclf.infer.predictor.Engine`
each), read from an export folder (``carclf export`` writes it; no torch checkpoint is read):
:meth:`Predictor.from_export <carclf.infer.predictor.Predictor.from_export>` builds the Predictor around them.

An exported engine is one graph per fold: uint8 NCHW pixels (the eval transform's output) -> normalisation -> every
TTA view -> the fold's network -> logits averaged over the views, exactly what :class:`TorchFold` computes. Decoding
and the timm eval transform stay in Python, and everything after the engines' logits is the Predictor's own numpy
code, so PyTorch and ONNX Runtime give the same probabilities (to the parity figure stored in ``export.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carclf.artifacts.export import EXPORT_FILE, engine_classes, read_export
from carclf.errors import CarclfError
from carclf.infer.precision import PRECISIONS, check_precision
from carclf.io import file_sha256
from carclf.runtime import physical_cores

PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| of calibrated probabilities an fp32 export must stay below


def session_options(threads: int | None = None):
    """ONNX Runtime session options: ``threads`` intra-op threads (default: the physical cores) that sleep when
    idle, one inter-op thread, sequential execution, every graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning. A spinning pool keeps every core busy between runs, starving
    # whatever else this process does on the same cores: decoding the next photos, the service's event loop, a
    # DataLoader's workers. Measured on 2 cores (benchmarks/RESULTS.md): the service went from 91 to 105 requests/s
    # and p99 268 -> 183 ms; a lone session's images/s did not change (within 4%).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initialisers etc. are noise to a user
    return so


class OnnxFold:
    """One exported fold engine in ONNX Runtime, an :class:`~carclf.infer.predictor.Engine` as
    :class:`~carclf.infer.predictor.TorchFold` is:
    :meth:`logits` of a uint8 NCHW batch -> float64 (batch, classes), averaged over ``views`` inside the graph."""

    engine = "onnx"

    def __init__(self, path: Path | str, dcfg: dict[str, Any], views: list[str], threads: int | None = None,
                 precision: str = "fp32", n_classes: int | None = None) -> None:
        import onnxruntime as ort

        self.path, self.dcfg, self.views, self.precision = Path(path), dcfg, list(views), precision
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise CarclfError(f"ONNX Runtime cannot load '{self.path}': {exc}. Export it again with carclf "
                              "export.") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise CarclfError(f"'{self.path}' has {len(inputs)} input(s) and {len(outputs)} output(s), not the one "
                              "of each carclf exports: export it again")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        # The graph's fixed sizes against the spec's, now rather than as ONNX Runtime's error on the first photo.
        shape, out = list(inputs[0].shape), list(outputs[0].shape)
        want = [3, int(dcfg["input_size"][1]), int(dcfg["input_size"][2])]
        if len(shape) != 4 or any(isinstance(a, int) and a != b for a, b in zip(shape[1:], want, strict=True)):
            raise CarclfError(f"'{self.path}' takes input {shape}, export.yaml's data_config says "
                              f"[batch, {', '.join(map(str, want))}]: export it again")
        if n_classes is not None and (len(out) != 2 or (isinstance(out[1], int) and out[1] != n_classes)):
            raise CarclfError(f"'{self.path}' outputs {out[-1] if out else '?'} classes, export.yaml lists "
                              f"{n_classes}: the classes do not belong to this graph; export it again")

    def logits(self, x) -> np.ndarray:
        """Float64 logits (batch, classes) of a uint8 NCHW batch (a torch tensor or a numpy array)."""
        a = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        if a.dtype != np.uint8:
            raise TypeError(f"OnnxFold takes uint8 pixels (the eval transform's output), got {a.dtype}")
        try:
            out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(a)})[0]
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
            raise CarclfError(f"ONNX Runtime failed running '{self.path}': {str(exc).splitlines()[0][:300]}. "
                              "Export it again with carclf export.") from exc
        return out.astype(np.float64)

    def __repr__(self) -> str:
        return f"OnnxFold('{self.path.name}', {self.precision}, views={','.join(self.views)})"


def dcfg_from_yaml(d: dict[str, Any]) -> dict[str, Any]:
    """A timm data config as stored in export.yaml (lists) -> the tuples timm uses."""
    out = dict(d)
    for key in ("input_size", "mean", "std"):
        out[key] = tuple(out[key])
    return out


def dcfg_to_yaml(dcfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple | list) else v) for k, v in dcfg.items()}


def engine_file(export_dir: Path, entry: dict[str, Any], precision: str, verify: bool = True) -> Path:
    """The ONNX graph of one engine entry at ``precision`` (bf16 names the fp32 graph), its checksum verified."""
    check_precision(precision)
    files = entry.get("files", {})
    if precision not in files:
        how = "export it again" if precision == "fp32" else f"export it with --precision {precision}"
        raise CarclfError(f"'{export_dir}' has no {precision} file for engine {entry.get('name')}: {how}")
    f = files[precision]
    path = export_dir / f["file"]
    if not path.is_file():
        raise CarclfError(f"'{path}' is missing: the export directory is incomplete; export it again")
    if verify and file_sha256(path) != f["sha256"]:
        raise CarclfError(f"'{path}' does not match the checksum in {EXPORT_FILE} (changed after export): export "
                          "it again")
    return path


def load_engine(export_dir: Path, entry: dict[str, Any], precision: str = "fp32", threads: int | None = None,
                n_classes: int | None = None, verify: bool = True):
    """One engine entry at ``precision``, on the runtime its file names: ONNX Runtime (fp32 and int8 graphs; the
    default) or OpenVINO (bf16: the fp32 graph compiled at bf16)."""
    path = engine_file(export_dir, entry, precision, verify)
    dcfg = dcfg_from_yaml(entry["data_config"])
    runtime = entry["files"][precision].get("runtime", "onnxruntime")
    if runtime == "openvino":
        from carclf.infer.openvino_engine import OpenVinoFold

        return OpenVinoFold(path, dcfg, entry["views"], threads, precision, n_classes)
    if runtime != "onnxruntime":
        raise CarclfError(f"'{export_dir}': engine {entry.get('name')} runs on '{runtime}', which this carclf does "
                          "not know: upgrade carclf")
    return OnnxFold(path, dcfg, entry["views"], threads, precision, n_classes)


def load_engines(export_dir: Path | str, doc: dict[str, Any] | None = None, precision: str = "fp32",
                 threads: int | None = None) -> list:
    export_dir = Path(export_dir)
    doc = doc or read_export(export_dir)
    return [load_engine(export_dir, e, precision, threads, n)
            for e, n in zip(doc["engines"], engine_classes(doc), strict=True)]


def swap_engines(predictor, export_dir: Path | str, precision: str = "fp32", threads: int | None = None):
    """Replace a torch Predictor's fold engines with the ONNX Runtime engines of ``export_dir`` (the export of the
    same run or ensemble: same classes, engines in the same order with the same preprocessing and views)."""
    doc = read_export(export_dir)
    entries = doc["engines"]
    if doc["classes"] != list(predictor.classes):
        raise CarclfError(f"'{export_dir}' was exported from a model with other classes than '{predictor.source}'")
    if len(entries) != len(predictor.engines):
        raise CarclfError(f"'{export_dir}' holds {len(entries)} engines, the predictor {len(predictor.engines)}: "
                          "export this run again")
    engines = load_engines(export_dir, doc, precision, threads)
    for k, (old, new) in enumerate(zip(predictor.engines, engines, strict=True)):
        if list(old.views) != new.views or dcfg_to_yaml(old.dcfg) != dcfg_to_yaml(new.dcfg):
            raise CarclfError(f"engine {k} of '{export_dir}' has other views or preprocessing than the run's: "
                              "export this run again")
    predictor.engines = engines
    return predictor


__all__ = [
    "OnnxFold", "PARITY_TOLERANCE", "PRECISIONS", "dcfg_from_yaml", "dcfg_to_yaml", "engine_file", "load_engine",
    "load_engines",
    "physical_cores", "session_options", "swap_engines",
]
