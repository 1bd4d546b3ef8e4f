"""bf16 engines of an export on OpenVINO: the fp32 ONNX graph itself, compiled by OpenVINO's CPU plugin with bf16 as
its inference precision.

ONNX Runtime has no bfloat16 kernels for convolutions on x86 (an ONNX graph with bf16 Conv does not even load), and
PyTorch's CPU bf16 was measured slower (eager) or needs a compiler and a minute of compiling at every start
(torch.compile); OpenVINO runs the same graph with AMX / AVX512-BF16 kernels, the depthwise convolutions included
(benchmarks/RESULTS.md, issue 23). The graph stays fp32 on disk: OpenVINO lowers it when it compiles it, and only
where the CPU has bf16 instructions (elsewhere it would run fp32, which is why an export records that bf16
``needs`` them).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from carclf.errors import CarclfError

OV_PRECISION = {"bf16": "bf16", "fp32": "f32"}
# Photos per inference call: OpenVINO bf16 ran the recipe's hflip engine at 133 photos/s in batches of 8 and 112 in
# batches of 32 (2-vCPU Xeon with AMX; benchmarks/RESULTS.md, issue 23): larger batches outgrow the caches.
CHUNK = 8


@functools.cache
def _core():
    """One OpenVINO Core per process, as OpenVINO advises (each Core loads its plugins and thread pools): every
    engine of an export and every export in one process share it."""
    import openvino as ov

    return ov.Core()


class OpenVinoFold:
    """One exported fold engine compiled by OpenVINO, an :class:`~carclf.infer.predictor.Engine`: :meth:`logits`
    of a uint8 NCHW batch -> float64 (batch, classes), averaged over ``views`` inside the graph."""

    engine = "openvino"

    def __init__(self, path: Path | str, dcfg: dict[str, Any], views: list[str], threads: int | None = None,
                 precision: str = "bf16", n_classes: int | None = None) -> None:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            raise CarclfError("the bf16 engines run on OpenVINO, which is not installed: pip install openvino, or "
                              "serve --precision fp32") from exc
        from carclf.runtime import physical_cores

        self.path, self.dcfg, self.views, self.precision = Path(path), dcfg, list(views), precision
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                  "INFERENCE_NUM_THREADS": int(threads or physical_cores()),
                  "PERFORMANCE_HINT": "LATENCY"}  # one request at a time on all the threads, as the service runs it
        try:
            self.compiled = _core().compile_model(str(self.path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise CarclfError(f"OpenVINO cannot load '{self.path}': {str(exc).splitlines()[0][:300]}. Export it "
                              "again with carclf export.") from exc
        self.request = self.compiled.create_infer_request()
        out = self.compiled.outputs[0].get_partial_shape()
        if n_classes is not None and out.rank.is_static and out[-1].is_static and out[-1].get_length() != n_classes:
            raise CarclfError(f"'{self.path}' outputs {out[-1].get_length()} classes, export.yaml lists {n_classes}: "
                              "export it again")

    def logits(self, x) -> np.ndarray:
        """Float64 logits (batch, classes) of a uint8 NCHW batch (a torch tensor or a numpy array)."""
        a = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        if a.dtype != np.uint8:
            raise TypeError(f"OpenVinoFold takes uint8 pixels (the eval transform's output), got {a.dtype}")
        out = []
        for i in range(0, max(len(a), 1), CHUNK):
            try:
                self.request.infer({0: np.ascontiguousarray(a[i : i + CHUNK])})
            except Exception as exc:
                raise CarclfError(f"OpenVINO failed running '{self.path}': {str(exc).splitlines()[0][:300]}") from exc
            out.append(self.request.get_output_tensor(0).data.astype(np.float64))
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"OpenVinoFold('{self.path.name}', {self.precision}, views={','.join(self.views)})"
