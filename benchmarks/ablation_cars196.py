"""Benchmark: each training technique of the cpu-lite0 recipe switched on or off, on ../shared/data/cars196 fold 0,
at a shortened schedule this machine can afford several times (default 6 epochs, SWA over the last two).

Every variant is the recipe plus the same schedule overrides plus its own switches; the baseline is the recipe at the
same schedule, so the differences are the techniques' and not the schedule's. A trained variant is not trained again
(``--resume`` continues an interrupted one); each is calibrated (temperature on its OOF logits) and evaluated.
The runs are ordinary carclf runs, so they also serve as ensemble members (`carclf ensemble`) on fold 0.

    python benchmarks/ablation_cars196.py [--epochs 6] [--only base,mixup] [--prefix abl6]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cars196"

# name -> (what it changes, overrides on top of the recipe and the schedule)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the recipe (CE, label smoothing 0.1, no Mixup/CutMix)", []),
    "mixup": (
        "+ Mixup 0.2 / CutMix 1.0, clean last epoch",
        ["aug.mixup=0.2", "aug.cutmix=1.0", "aug.mixup_prob=1.0", "aug.mixup_switch_prob=0.5"],
    ),
    "focal": ("loss = 0.5 CE + 0.5 focal (gamma 2)", ["train.loss=ce+focal"]),
    "nols": ("label smoothing 0 (instead of 0.1)", ["train.label_smoothing=0"]),
}


def schedule(epochs: int) -> list[str]:
    # The recipe's proportions at a shorter length: SWA over the last third, Mixup (where on) off for the last epoch.
    return [f"train.epochs={epochs}", f"train.swa_start_epoch={epochs - max(1, epochs // 3)}",
            f"aug.mixup_off_epoch={epochs - 1}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu-lite0.yaml"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--fold", default="0")
    ap.add_argument("--prefix", default="abl6")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"--only: unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")

    rows = []
    for name in names:
        what, overrides = VARIANTS[name]
        run = Path(args.out) / f"{args.prefix}-{name}"
        seconds = None
        if not (run / f"fold{args.fold}" / "oof.npz").exists():
            cmd = [sys.executable, "-m", "carclf", "train", "-c", args.config, "--resume",
                   f"data.root={args.data}", f"out_dir={args.out}", f"name={run.name}", f"train.folds={args.fold}",
                   *schedule(args.epochs), *overrides]
            print("$", " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds = time.perf_counter() - start
        for step in ("calibrate", "evaluate"):
            subprocess.run([sys.executable, "-m", "carclf", step, str(run)], check=True, stdout=subprocess.DEVNULL)
        figures = json.loads((run / "evaluation.json").read_text())[0]
        rows.append({"variant": name, "what": what, "run": str(run), "seconds": seconds, **figures})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{platform.machine()}, {len(rows)} variants, {args.epochs} epochs, fold {args.fold}\n")
    print("| variant | what | calibrated log loss | raw log loss | accuracy | top-5 | ECE | T |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['what']} | {r['log_loss']:.3f} | {r['log_loss_raw']:.3f} | "
              f"{r['accuracy']:.1%} | {r['top5']:.1%} | {r['ece']:.3f} | {r['temperature']:.2f} |")


if __name__ == "__main__":
    main()
