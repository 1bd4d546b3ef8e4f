"""Benchmark: offline inference speed of the CPU recipe's network, PyTorch eager vs ONNX Runtime fp32 vs int8, next
to the machine's limit (the network's FLOPs per image against the FLOP/s of a large fp32 matmul on the same cores).

    flock /tmp/carclf-bench.lock python benchmarks/infer_speed.py [--run RUN] [--sizes 144x272,192x192]

The network is ``tf_efficientnet_lite0`` with the cars196 run's fold-0 weights (196 classes; any weights time the
same), one view (no TTA: an engine with hflip costs twice as much per photo). int8 graphs are made as ``carclf
export --int8`` makes them (static, calibrated on 64 cars196 training photos at that size; dynamic beside it).
Prints a Markdown table and writes benchmarks/out/infer_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from carclf.artifacts.run import RunDir
from carclf.export.graphs import EngineModule, export_graph
from carclf.export.photos import photo_batches as _batches
from carclf.export.photos import training_photos
from carclf.export.quantize import quantize_engine
from carclf.infer.onnx_engine import OnnxFold, physical_cores
from carclf.infer.predictor import TorchFold
from carclf.models.factory import load_fold_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "benchmarks" / "out" / "cpu-lite0-bench-20261123-130103"


def timed(fn, batch: int, min_seconds: float = 4.0, min_iters: int = 3, warmup: int = 2) -> float:
    """Images per second of ``fn()`` on one batch, over at least ``min_seconds`` and ``min_iters`` calls."""
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - start)


def matmul_flops(threads: int, n: int = 4096, reps: int = 6, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of an n x n matmul (2 n^3 FLOPs) in ``dtype`` with ``threads`` torch threads: the practical
    ceiling of dense arithmetic of that type on these cores."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def model_flops(model: torch.nn.Module, h: int, w: int) -> float:
    """FLOPs of one image (multiply-add = 2 FLOPs), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, h, w))
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(DEFAULT_RUN))
    ap.add_argument("--sizes", default="144x272,192x192", help="HxW input sizes")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seconds", type=float, default=4.0, help="minimum timing per cell")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "infer_speed.json"))
    args = ap.parse_args()

    threads = physical_cores()
    torch.set_num_threads(threads)
    run = RunDir.open(args.run)
    cfg = run.read_config()
    n_classes = len(run.read_meta()["classes"])
    model = load_fold_model(cfg, run.fold(0).best, n_classes, torch.device("cpu"))  # channels_last per the recipe
    peak = matmul_flops(threads)
    print(f"{platform.processor() or platform.machine()}, {threads} physical cores; fp32 matmul 4096^2: "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {"threads": threads, "matmul_gflops": peak / 1e9, "rows": []}
    calib_paths = training_photos(run, 0, 64)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="carclf-speed-") as tmp:
        for size in args.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            flops = model_flops(model.to(memory_format=torch.contiguous_format), h, w)
            model = model.to(memory_format=torch.channels_last)
            dcfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, h, w),
                    "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}
            fp32 = Path(tmp) / f"{h}x{w}.onnx"
            export_graph(EngineModule(model, dcfg, ["orig"]), h, w, fp32)
            model = model.to(memory_format=torch.channels_last)
            # PyTorch as the Predictor runs it: TorchFold (channels_last, inference mode, fp32 on the CPU)
            torch_engine = TorchFold(model, dcfg, ["orig"], torch.device("cpu"), None, cfg.train.channels_last)
            calib = [x[ok] for x, ok in _batches(calib_paths, dcfg, cfg, 32)]
            graphs = {"ORT fp32": fp32}
            for mode in ("static", "dynamic"):
                path = Path(tmp) / f"{h}x{w}.{mode}.onnx"
                quantize_engine(fp32, path, mode, "pixels", iter(calib))
                graphs[f"ORT int8 {mode}"] = path
            sessions = {name: OnnxFold(p, dcfg, ["orig"], threads) for name, p in graphs.items()}
            print(f"\n{h}x{w}: {flops / 1e9:.3f} GFLOPs per image (one view)", flush=True)
            for batch in batches:
                x = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8)
                xn = x.numpy()

                cells = {"PyTorch eager": timed(lambda x=x, t=torch_engine: t.logits(x), batch, args.seconds)}
                # one OpenMP thread: immune to a busy second core (a descheduled thread stalls every op's barrier)
                torch.set_num_threads(1)
                cells["PyTorch eager, 1 thread"] = timed(lambda x=x, t=torch_engine: t.logits(x), batch, args.seconds)
                torch.set_num_threads(threads)
                for name, s in sessions.items():
                    cells[name] = timed(lambda s=s, xn=xn: s.logits(xn), batch, args.seconds)
                for name, ips in cells.items():
                    row = {"size": f"{h}x{w}", "batch": batch, "runtime": name, "images_per_s": ips,
                           "gflops_per_image": flops / 1e9, "share_of_matmul_peak": ips * flops / peak}
                    results["rows"].append(row)
                    print(f"  batch {batch:>2}  {name:<24} {ips:8.1f} images/s  "
                          f"{100 * ips * flops / peak:5.1f}% of the matmul peak", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| input | batch | runtime | images/s | share of the fp32 matmul peak |\n| --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        print(f"| {r['size']} | {r['batch']} | {r['runtime']} | {r['images_per_s']:.1f} | "
              f"{100 * r['share_of_matmul_peak']:.0f}% |")


if __name__ == "__main__":
    main()
