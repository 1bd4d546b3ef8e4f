"""Start-up cost of the commands that need no model: wall time of fresh processes, median of --repeat runs.

    python benchmarks/startup.py [--data DATA] [--repeat 5] [--src OTHER_CHECKOUT/src]

Prints the seconds for ``carclf --help``, ``carclf prepare --help``, ``carclf prepare DATA`` on an already-prepared
data set (incremental: no photo is read again) and, for scale, ``import torch, timm``; and which of torch, timm and
torchvision a ``carclf prepare`` process loaded. ``--src`` times another checkout's package instead (e.g. a git
worktree of an older commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a data root to prepare (default: a small synthetic one)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", help="time the carclf package under this src folder instead of the installed one")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    py = sys.executable
    carclf = [py, "-m", "carclf"]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            from carclf.demo.synth import SynthSpec, make_dataset

            data = str(Path(tmp) / "data")
            make_dataset(data, SynthSpec(n_classes=6, train_per_class=14, test_per_class=3, size=(160, 120), seed=5))
        out = str(Path(tmp) / "runs")
        subprocess.run([*carclf, "prepare", data, "--out-dir", out], env=env, capture_output=True, check=True)
        probe = (f"import sys; from carclf.cli import main; main(['prepare', {data!r}, '--out-dir', {out!r}]); "
                 "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'torchvision'}))")
        heavy = subprocess.run([py, "-c", probe], env=env, capture_output=True, text=True, check=True)
        heavy = heavy.stdout.strip().splitlines()[-1]
        rows = [
            ("carclf --help", wall([*carclf, "--help"], env, args.repeat)),
            ("carclf prepare --help", wall([*carclf, "prepare", "--help"], env, args.repeat)),
            ("carclf prepare DATA (incremental)", wall([*carclf, "prepare", data, "--out-dir", out], env, args.repeat)),
            ("import torch, timm (for scale)", wall([py, "-c", "import torch, timm"], env, args.repeat)),
        ]
    print(f"package: {args.src or 'installed'}; torch/timm/torchvision loaded by carclf prepare: {heavy}")
    for name, secs in rows:
        print(f"{name:40s} {secs:6.2f} s")


if __name__ == "__main__":
    main()
