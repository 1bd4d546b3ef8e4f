"""Benchmark: each engine ``carclf export --precision`` can choose, on this CPU, next to the machine's limits.

    flock /tmp/carclf-bench.lock python benchmarks/precision_speed.py RUN [--views orig|orig,flip] [--batches 8,32]

For fold 0 of RUN (any weights time the same): the fp32 ONNX graph on ONNX Runtime (carclf's session options, and
with spinning threads), the same graph on OpenVINO at fp32 and at bf16, and static int8 graphs in each format
(calibrated on 64 of the fold's training photos) on ONNX Runtime. All engines run in interleaved rounds (median of
5 one-second rounds each) so a noisy neighbour on a shared host does not favour one. Also: the fp32 and bf16 matmul
rates (the CPU's practical peak), the network's FLOPs, and ONNX Runtime's own profile of the fp32 graph by kind of
operation (why fp32 stops where it does). Prints a Markdown table keyed by the CPU model and its flags, and writes
benchmarks/out/precision_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_speed import matmul_flops, model_flops  # noqa: E402

from carclf.artifacts.run import RunDir  # noqa: E402
from carclf.export.graphs import EngineModule, export_graph  # noqa: E402
from carclf.export.photos import photo_batches, training_photos  # noqa: E402
from carclf.export.quantize import INT8_FORMATS, quantize_engine  # noqa: E402
from carclf.infer.onnx_engine import OnnxFold, session_options  # noqa: E402
from carclf.infer.openvino_engine import OpenVinoFold  # noqa: E402
from carclf.models.factory import load_fold_model  # noqa: E402
from carclf.runtime import cpu_info, physical_cores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def interleaved(engines: dict, xs: dict[int, np.ndarray], rounds: int = 5, seconds: float = 1.0) -> dict:
    for e in engines.values():
        for x in xs.values():
            e(x)
            e(x)
    runs: dict = defaultdict(list)
    for _ in range(rounds):
        for name, e in engines.items():
            for b, x in xs.items():
                n, t0 = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - t0 < seconds:
                    e(x)
                    n += 1
                runs[(name, b)].append(n * b / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in runs.items()}


def ort_profile(path: Path, x: np.ndarray, threads: int) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per kind of operation (depthwise vs other convolutions told apart)."""
    import onnx
    import onnxruntime as ort

    so = session_options(threads)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "prof")
        opt = Path(tmp) / "opt.onnx"
        so.optimized_model_filepath = str(opt)
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(5):
            s.run(None, {"pixels": x})
        events = json.loads(Path(s.end_profiling()).read_text())
        groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
                  for n in onnx.load(str(opt)).graph.node}
    total: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        op = ev["args"].get("op_name", "?")
        if op in ("Conv", "FusedConv"):
            op = "Conv depthwise" if groups.get(node, 1) > 1 else "Conv (dense)"
        total[op] += ev["dur"]
    s = sum(total.values())
    return {k: v / s for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--views", default="orig", help="TTA views inside the graph (orig,flip: the recipe's)")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "precision_speed.json"))
    args = ap.parse_args()

    threads = physical_cores()
    cpu = cpu_info()
    run = RunDir.open(args.run)
    cfg = run.read_config()
    n_classes = len(run.read_meta()["classes"])
    model = load_fold_model(cfg, run.fold(0).best, n_classes, torch.device("cpu")).eval()
    views = args.views.split(",")
    from carclf.data.transforms import data_config_for

    dcfg = data_config_for(cfg)
    h, w = int(dcfg["input_size"][1]), int(dcfg["input_size"][2])
    flops = model_flops(model.to(memory_format=torch.contiguous_format), h, w) * len(views)
    peak, bpeak = matmul_flops(threads), matmul_flops(threads, reps=5, dtype=torch.bfloat16)
    print(f"{cpu['model']} ({', '.join(cpu['flags'])}), {threads} cores; fp32 matmul {peak / 1e9:.1f} GFLOP/s, bf16 "
          f"matmul {bpeak / 1e9:.1f} GFLOP/s; {h}x{w}, views {args.views}: {flops / 1e9:.3f} GFLOPs per photo",
          flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    xs = {b: np.random.default_rng(0).integers(0, 256, (b, 3, h, w), dtype=np.uint8) for b in batches}
    with tempfile.TemporaryDirectory(prefix="carclf-precision-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_graph(EngineModule(model, dcfg, views), h, w, fp32)
        calib = [x[ok] for x, ok in photo_batches(training_photos(run, 0, 64), dcfg, cfg, 32)]
        engines = {"ORT fp32": OnnxFold(fp32, dcfg, views, threads).logits}
        import onnxruntime as ort

        so = session_options(threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        spin = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
        engines["ORT fp32, spinning threads"] = lambda x: spin.run(None, {"pixels": x})
        engines["OpenVINO fp32"] = OpenVinoFold(fp32, dcfg, views, threads, "fp32").logits
        engines["OpenVINO bf16"] = OpenVinoFold(fp32, dcfg, views, threads, "bf16").logits
        for fmt in INT8_FORMATS:
            q = Path(tmp) / f"{fmt}.onnx"
            quantize_engine(fp32, q, "static", "pixels", iter(calib), fmt)
            engines[f"ORT int8 {fmt}"] = OnnxFold(q, dcfg, views, threads, "int8").logits
        speeds = interleaved(engines, xs)
        profile = ort_profile(fp32, xs[max(batches)], threads)
    rows = [{"engine": n, "batch": b, "photos_per_s": v, "share_of_fp32_peak": v * flops / peak,
             "share_of_bf16_peak": v * flops / bpeak} for (n, b), v in speeds.items()]
    result = {"cpu": cpu, "threads": threads, "matmul_gflops_fp32": peak / 1e9, "matmul_gflops_bf16": bpeak / 1e9,
              "input": [h, w], "views": views, "gflops_per_photo": flops / 1e9, "rows": rows,
              "ort_fp32_profile": profile}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    base = {b: speeds[("ORT fp32", b)] for b in batches}
    print("\n| engine | batch | photos/s | vs ORT fp32 | share of the fp32 matmul peak |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['engine']} | {r['batch']} | {r['photos_per_s']:.1f} | {r['photos_per_s'] / base[r['batch']]:.2f}x "
              f"| {100 * r['share_of_fp32_peak']:.0f}% |")
    print("\nONNX Runtime fp32 kernel time by operation: "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in profile.items()))


if __name__ == "__main__":
    main()
