"""Benchmark: can int8 be faster than fp32 on this CPU at all? Speed only, whatever the accuracy.

    flock /tmp/carclf-bench.lock python benchmarks/int8_speed_probe.py [EXPORT_DIR]

Quantises an exported fp32 engine (default: the one-view 144x272 export of the cars196 recipe run) with ONNX
Runtime's static quantiser, every Conv/MatMul/Gemm included (carclf's own int8 keeps the first convolutions and the
classifier in float for accuracy; here nothing is spared), in three formats: QDQ per-channel 7-bit weights, QOperator
per-channel 7-bit, QDQ per-tensor 8-bit. Calibration uses random pixels: ranges change the numbers, not the kernels
ONNX Runtime picks, so images/s are what real calibration would give. Prints images/s at batch 1 and 32 beside fp32,
with the same session options carclf serves with.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "benchmarks" / "out" / "export-wide-noTTA"


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from carclf.artifacts.export import read_export
    from carclf.infer.onnx_engine import session_options

    export = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    doc = read_export(export)
    fp32 = export / doc["engines"][0]["files"]["fp32"]["file"]
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    name, shape = session.get_inputs()[0].name, session.get_inputs()[0].shape
    h, w = int(shape[2]), int(shape[3])
    rng = np.random.default_rng(0)

    class Reader:  # ONNX Runtime's CalibrationDataReader protocol
        def __init__(self) -> None:
            self.batches = iter([rng.integers(0, 256, (4, 3, h, w), dtype=np.uint8) for _ in range(4)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {name: b}

    def images_per_s(path: Path, batch: int) -> float:
        s = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        x = rng.integers(0, 256, (batch, 3, h, w), dtype=np.uint8)
        for _ in range(3):
            s.run(None, {name: x})
        n = max(4, 96 // batch)
        t = time.perf_counter()
        for _ in range(n):
            s.run(None, {name: x})
        return batch * n / (time.perf_counter() - t)

    variants = {
        "QDQ, per-channel, 7-bit weights": dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True),
        "QOperator, per-channel, 7-bit weights": dict(quant_format=QuantFormat.QOperator, per_channel=True,
                                                      reduce_range=True),
        "QDQ, per-tensor, 8-bit weights": dict(quant_format=QuantFormat.QDQ, per_channel=False, reduce_range=False),
    }
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser warns per tensor
    base = [images_per_s(fp32, b) for b in (1, 32)]
    print(f"{fp32.name} {h}x{w}; images/s at batch 1 / 32")
    print(f"  fp32                                     {base[0]:6.1f} / {base[1]:6.1f}")
    with tempfile.TemporaryDirectory(prefix="carclf-int8-probe-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        for label, kw in variants.items():
            out = Path(tmp) / "int8.onnx"
            quantize_static(pre, out, Reader(), op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, **kw)
            r = [images_per_s(out, b) for b in (1, 32)]
            print(f"  int8 {label:36s}{r[0]:6.1f} / {r[1]:6.1f}   ({r[0] / base[0]:.2f}x / {r[1] / base[1]:.2f}x fp32)")


if __name__ == "__main__":
    main()
