"""Benchmark: train a recipe (default configs/cpu-lite0.yaml) on ../shared/data/cars196 for one fold and print
validation log loss (raw and temperature-calibrated), accuracy and training images/s; time a bare PyTorch loop over
the same model, resolution and batch on random tensors to show whether data loading holds training back.

    python benchmarks/cars196.py [--config configs/cpu-lite0.yaml] [--fold 0] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from carclf.analyze.evaluate import evaluate_run
from carclf.calibrate.temperature import calibrate_run
from carclf.config import Config, load_config
from carclf.data.transforms import data_config_for
from carclf.models.factory import create_model
from carclf.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cars196"


def bare_loop_images_per_s(cfg: Config, n_classes: int, steps: int = 20, warmup: int = 3) -> float:
    """Forward, backward and optimizer step on random tensors already on the device, on the recipe's device and in
    its precision (autocast, loss scaling for fp16, channels_last): the speed the model alone allows."""
    from carclf.runtime import amp_dtype, autocast, grad_scaler, select_device

    torch.manual_seed(0)
    device = select_device(cfg.train.device)
    dtype = amp_dtype(cfg.train.amp, device)
    scaler = grad_scaler(device, dtype)
    _, height, width = data_config_for(cfg)["input_size"]
    model = create_model(cfg.model, n_classes, pretrained=False).to(device).train()  # the recipe's frozen layers
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(cfg.data.batch_size, 3, height, width, device=device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (cfg.data.batch_size,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    sync()
    return steps * cfg.data.batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu-lite0.yaml"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--fold", default="0")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not Path(args.data, "train").is_dir():
        sys.exit(f"no data at {args.data}: pass --data PATH to a folder holding train/<class>/*.jpg")
    cfg = load_config(
        args.config,
        [f"data.root={args.data}", f"out_dir={args.out}", f"train.folds={args.fold}", *args.overrides],
    )
    cfg.name = f"{cfg.name}-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    n_classes = len([p for p in Path(args.data, "train").iterdir() if p.is_dir()])

    # The machine's speed drifts by 10-20% over minutes (shared host), so the bare loop is timed before and after
    # training and carclf is compared with the faster of the two: a conservative share.
    bare_before = bare_loop_images_per_s(cfg, n_classes)
    print(f"bare PyTorch loop before training: {bare_before:.1f} images/s", flush=True)
    start = time.time()
    run_dir = train(cfg)
    minutes = (time.time() - start) / 60
    bare_after = bare_loop_images_per_s(cfg, n_classes)
    print(f"bare PyTorch loop after training: {bare_after:.1f} images/s", flush=True)
    bare = max(bare_before, bare_after)
    calibrate_run(run_dir)
    row = evaluate_run(run_dir)[0]
    with open(run_dir / f"fold{args.fold}" / "metrics.csv", encoding="utf-8") as fh:
        epochs = [r for r in csv.DictReader(fh) if r["train_loss"]]  # per-epoch rows, not the final candidates
    # The first epoch includes worker start-up and allocator warm-up; report the steady state too.
    speeds = [float(e["images_per_s"]) for e in epochs]
    steady = statistics.median(speeds[1:] if len(speeds) > 1 else speeds)
    wait = statistics.median(float(e["data_wait"]) for e in epochs)
    result = {
        "recipe": Path(args.config).name, "overrides": args.overrides, "fold": args.fold,
        "model": cfg.model.name, "input_size": list(data_config_for(cfg)["input_size"][1:]), "epochs": len(epochs),
        "val_log_loss_raw": row["log_loss_raw"], "val_log_loss_calibrated": row["log_loss"],
        "temperature": row["temperature"], "val_accuracy": row["accuracy"], "val_top5": row["top5"],
        "val_ece_calibrated": row["ece"], "n_val": row["n"],
        "summary": json.loads((run_dir / f"fold{args.fold}" / "summary.json").read_text(encoding="utf-8")),
        "train_images_per_s": steady, "bare_loop_images_per_s_before": bare_before,
        "bare_loop_images_per_s_after": bare_after, "share_of_bare": steady / bare,
        "data_wait_share": wait, "wall_minutes": minutes,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=1))
    with open(Path(args.out) / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
