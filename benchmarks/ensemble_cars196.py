"""Benchmark: ``carclf ensemble`` on cars196 members this machine can afford, then the OOF log loss of the best single
member, of the equal-weight average and of the chosen ensemble, each with and without TTA and calibration
(cross-validated over the OOF rows), and the wall time of ``carclf ensemble`` (under ``flock
/tmp/carclf-bench.lock`` so no other timing benchmark overlaps it).

    python benchmarks/ensemble_cars196.py                      # members: the ablation runs (trained if missing)
    python benchmarks/ensemble_cars196.py --members RUN [RUN ...] [-o OUT]

Default members: the four fold-0 runs of ``benchmarks/ablation_cars196.py`` (cpu-lite0 at 6 epochs: the recipe,
+Mixup/CutMix, CE+focal, no label smoothing). One backbone, four training recipes: the diversity a team gets from
its own ablations for free. Every run keeps its OOF logits for views orig, flip, zoom1.15, zoom1.15+flip
(``predict.oof_views`` default), so the ensemble step measures none/hflip/multiscale/both per member.
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
ABLATION = ["abl6-base", "abl6-mixup", "abl6-focal", "abl6-nols"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--members", nargs="*", help="run directories (default: the ablation runs in --out)")
    ap.add_argument("-o", "--ensemble", default="", help="ensemble folder (default: OUT/ens-cars196)")
    ap.add_argument("--nested", action="store_true", help="also the nested-CV figure of the whole selection")
    args = ap.parse_args()
    out = Path(args.out)
    members = [Path(m) for m in args.members] if args.members else [out / n for n in ABLATION]
    missing = [m for m in members if not m.is_dir()]
    if missing and not args.members:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation_cars196.py"), "--data", args.data,
                        "--out", str(out)], check=True)
    elif missing:
        sys.exit(f"--members: no run directory at {', '.join(map(str, missing))}")

    ens = Path(args.ensemble) if args.ensemble else out / "ens-cars196"
    cmd = ["flock", "/tmp/carclf-bench.lock", *CARCLF, "ensemble", *map(str, members), "-o", str(ens),
           "--overwrite"] + (["--nested"] if args.nested else [])
    print(" ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    ensemble_s = time.time() - start  # includes the flock wait when another timing benchmark held the lock
    doc = yaml.safe_load((ens / "ensemble.yaml").read_text(encoding="utf-8"))
    result = {
        "members": [m.name for m in members],
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
