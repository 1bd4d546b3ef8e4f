"""The export's traced graphs: a fold engine's whole computation as one module (:class:`EngineModule`), written as
an ONNX graph (the fp32 engine; int8 is quantised from it, bf16 compiled from it by OpenVINO)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carclf.errors import CarclfError
from carclf.infer.onnx_engine import dcfg_to_yaml
from carclf.io import atomic_write
from carclf.models.forward import apply_view

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


class EngineModule(nn.Module):
    """uint8 NCHW pixels -> logits averaged over the TTA views: a fold engine's whole computation as one module
    (the operations of :func:`carclf.models.forward.batch_logits`).

    Views of the same size (orig, flip, the crops) go through the network as one batch: one pass over the weights
    instead of one per view. Measured on the recipe's hflip engine (benchmarks/RESULTS.md, issue 23): OpenVINO bf16
    at 8 photos 103 -> 133 photos/s, ONNX Runtime fp32 unchanged."""

    def __init__(self, model: nn.Module, dcfg: dict[str, Any], views: list[str]) -> None:
        super().__init__()
        self.model, self.views = model, list(views)
        # Buffer names must not collide with the network's parameter names inside the ONNX graph.
        self.register_buffer("pixel_mean", torch.tensor([m * 255 for m in dcfg["mean"]]).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([s * 255 for s in dcfg["std"]]).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() - self.pixel_mean) / self.pixel_std
        n = x.shape[0]
        same_size: dict[tuple[int, int], list[torch.Tensor]] = {}  # sizes are fixed when the graph is traced
        for v in self.views:
            y = apply_view(x, v)
            same_size.setdefault(tuple(y.shape[-2:]), []).append(y)
        out = [self.model(torch.cat(g)).float().reshape(len(g), n, -1) for g in same_size.values()]
        return torch.cat(out).mean(0)


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


def structure(engine, module: nn.Module) -> tuple:
    """What two engines must share for one graph to serve both."""
    arch = getattr(engine.model, "pretrained_cfg", {}).get("architecture", type(engine.model).__name__)
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items())
    return arch, json.dumps(dcfg_to_yaml(engine.dcfg), sort_keys=True), tuple(engine.views), shapes
