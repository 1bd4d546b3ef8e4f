"""int8 graphs of exported engines (ONNX Runtime's quantisation tools) and what they cost in OOF log loss."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from carclf.errors import CarclfError

INT8_MODES = ("static", "dynamic")
# Static int8 formats: ONNX Runtime's quantiser settings, and the instructions a graph of that format needs
# (carclf.infer.precision.NEEDS). 8-bit weights need VNNI: the AVX2 kernels of a CPU without it multiply u8 x s8
# pairs into saturating 16-bit sums, which 7-bit weights (reduce_range) cannot overflow. ``carclf export`` times the
# formats the CPU can run on one engine and keeps the fastest.
INT8_FORMATS: dict[str, dict] = {
    "qdq-7bit": {"quant_format": "QDQ", "reduce_range": True, "needs": None},
    "qdq": {"quant_format": "QDQ", "reduce_range": False, "needs": "vnni"},
    "qoperator": {"quant_format": "QOperator", "reduce_range": False, "needs": "vnni"},
}
DEFAULT_INT8_FORMAT = "qdq-7bit"
# Only the heavy ops are quantised: the TTA views (Resize, Slice, flips), the normalisation and the view average
# stay in float, so int8 changes the network's arithmetic and nothing else.
QUANT_OPS = ["Conv", "MatMul", "Gemm"]


class _BatchReader:
    """ONNX Runtime's CalibrationDataReader protocol over uint8 batches (``get_next`` -> feed dict or None)."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name, self.batches = input_name, iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self):  # not needed by one calibration pass
        raise NotImplementedError


def _kept_in_float(model) -> list[str]:
    """Nodes left in float: each view's first convolution (it sees raw pixel statistics) and the classifier
    (Gemm/MatMul producing the logits). On cars196 lite0 this halves int8's loss in OOF log loss (RESULTS.md)."""
    producer = {out: n for n in model.graph.node for out in n.output}

    def after_conv(name: str, seen: set) -> bool:
        node = producer.get(name)
        if node is None or node.name in seen:
            return False
        seen.add(node.name)
        return node.op_type == "Conv" or any(after_conv(i, seen) for i in node.input)

    first = [n.name for n in model.graph.node if n.op_type == "Conv" and not after_conv(n.input[0], set())]
    return first + [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]


def quantize_engine(fp32: Path, out: Path, mode: str, input_name: str,
                    calibration: Iterator[np.ndarray] | None = None, fmt: str = DEFAULT_INT8_FORMAT) -> None:
    """Write the int8 version of the graph ``fp32`` to ``out``.

    ``static``: QDQ format, int8 weights per output channel, uint8 activations whose ranges are measured on
    ``calibration`` batches (photos the fold trained on); ONNX Runtime runs the convolutions as integer kernels.
    ``dynamic``: int8 weights, activation ranges computed per batch at run time (ONNX Runtime has dynamic integer
    kernels for MatMul/Gemm and ConvInteger; usually little faster for a convolutional network: the benchmark
    measures it). ``fmt``: one of :data:`INT8_FORMATS` (static only; dynamic graphs always use 7-bit weights)."""
    if mode not in INT8_MODES:
        raise CarclfError(f"unknown int8 mode {mode!r}: use static or dynamic")
    if fmt not in INT8_FORMATS:
        raise CarclfError(f"unknown int8 format {fmt!r}: use {', '.join(INT8_FORMATS)}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a warning per tensor on the root logger
    try:
        _quantize(fp32, out, mode, input_name, calibration, INT8_FORMATS[fmt])
    finally:
        root.setLevel(level)


def _quantize(fp32: Path, out: Path, mode: str, input_name: str, calibration: Iterator[np.ndarray] | None,
              fmt: dict) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="carclf-quant-") as tmp:
        # ONNX Runtime's recommended pre-processing: shape inference and graph optimisation (BatchNorm folded into
        # the convolutions), so each quantised Conv is the whole fused op.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        import onnx

        keep = _kept_in_float(onnx.load(str(pre)))
        # reduce_range: 7-bit weights, so the u8 x s8 products of AVX2 kernels without VNNI cannot saturate
        # (ONNX Runtime's advice for x86 CPUs without VNNI, such as an AMD Zen 2).
        if mode == "dynamic":
            quantize_dynamic(pre, out, op_types_to_quantize=QUANT_OPS, per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=keep)
            return
        if calibration is None:
            raise CarclfError("static int8 needs calibration photos")
        quantize_static(
            pre, out, _BatchReader(input_name, calibration), quant_format=getattr(QuantFormat, fmt["quant_format"]),
            op_types_to_quantize=QUANT_OPS, per_channel=True, reduce_range=fmt["reduce_range"], nodes_to_exclude=keep,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
