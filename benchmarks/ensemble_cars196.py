"""Benchmark: two cheap members on ../shared/data/cars196, every fold, then ``carclf ensemble`` on their
out-of-fold logits. Prints the OOF log loss of the best single member, of the equal-weight average and of the chosen
ensemble, each with and without TTA and calibration (cross-validated over the OOF rows), and the wall time of
``carclf ensemble`` (taken under ``flock /tmp/carclf-bench.lock`` so no other timing benchmark overlaps it).

    nice -n 5 python benchmarks/ensemble_cars196.py              # train what is missing (resumable), then ensemble
    python benchmarks/ensemble_cars196.py --skip-train           # ensemble step only (members must be trained)

Members (configs/cpu-lite0.yaml with the overrides in COMMON, 5 folds, short): tf_efficientnet_lite0 and
tf_efficientnet_lite1 at 96 px, 1 epoch each, one compute thread, tracking off. Training is resumable: a rerun
only trains folds that are not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cars196"
CARCLF = [sys.executable, "-m", "carclf"]
MEMBERS = {
    "ens-lite0-96": ["model.name=tf_efficientnet_lite0"],
    "ens-lite1-96": ["model.name=tf_efficientnet_lite1", "train.seed=1"],
}
# Cheap on purpose (the machine is shared): 96 px, one epoch, one compute thread (on 2 busy cores a second
# OpenMP thread mostly waits), stem and blocks 0-3 frozen (blocks 4-6 and the head train), a
# higher learning rate for the short schedule. Every fold keeps its OOF logits for views orig, flip, zoom1.15,
# zoom1.15+flip (predict.oof_views default), so the ensemble step can measure none/hflip/multiscale/both.
COMMON = ["train.folds=all", "train.epochs=1", "train.warmup_epochs=0.2", "train.lr=2e-3", "data.img_size=96",
          "data.aspect=1.0", "model.freeze=5", "train.swa_start_epoch=0", "train.threads=1", "track.enabled=false"]


def train_members(data: Path, out: Path) -> dict[str, float]:
    minutes = {}
    for name, over in MEMBERS.items():
        start = time.time()
        cmd = [*CARCLF, "train", "-c", str(ROOT / "configs" / "cpu-lite0.yaml"), f"data.root={data}",
               f"out_dir={out}", f"name={name}", *COMMON, *over, "--resume"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        minutes[name] = (time.time() - start) / 60
        print(f"{name}: {minutes[name]:.1f} min", flush=True)
    return minutes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--nested", action="store_true", help="also the nested-CV figure of the whole selection")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "train").is_dir():
        sys.exit(f"no data at {data}: pass --data PATH to a folder holding train/<class>/*.jpg")
    train_minutes = {} if args.skip_train else train_members(data, out)

    ens = out / "ens-cars196"
    cmd = ["flock", "/tmp/carclf-bench.lock", *CARCLF, "ensemble", *(str(out / n) for n in MEMBERS), "-o", str(ens),
           "--overwrite"] + (["--nested"] if args.nested else [])
    print(" ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    ensemble_s = time.time() - start  # includes the flock wait when another timing benchmark held the lock
    doc = yaml.safe_load((ens / "ensemble.yaml").read_text(encoding="utf-8"))
    result = {
        "members": list(MEMBERS), "common_overrides": COMMON, "train_minutes": train_minutes,
        "rows": doc["selection"]["rows"], "cv": doc["selection"]["cv"],
        "figures": doc["figures"], "chosen": doc["chosen"],
        "ensemble_seconds": ensemble_s, "ensemble_seconds_internal": doc["selection"]["seconds"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))
    with open(out / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"benchmark": "ensemble_cars196", **result}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
