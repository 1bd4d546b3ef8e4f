"""Check: folders written by an earlier carclf (a git revision) load with this one and give the same figures.

An earlier revision's code (``git archive REV src``) makes a tiny run on synthetic photos (train, calibrate,
evaluate), an ensemble of it, an ONNX export, and three submissions (run, ensemble, export). This checkout then
evaluates the same run and ensemble, predicts with all three, writes a report, and prints how far its figures are
from the earlier ones. Everything runs through the CLI, the interface both revisions share.

    python benchmarks/format_compat.py --old ddea015 [--work benchmarks/out/format-compat] [--phase both|old|new]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.n_folds=2", "data.img_size=64", "data.batch_size=16", "data.num_workers=0", "train.epochs=4",
        "train.folds=all", "train.warmup_epochs=0", "predict.batch_size=32", "train.threads=2", "track.enabled=false",
        "name=compat"]


def carclf(args: list[str], src: Path | None, log: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = subprocess.run([sys.executable, "-m", "carclf", *map(str, args)], env=env, capture_output=True, text=True,
                         cwd=log.parent)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ carclf {' '.join(map(str, args))}\n{out.stdout}{out.stderr}\n")
    if out.returncode:
        raise SystemExit(f"carclf {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def old_phase(rev: str, work: Path) -> None:
    old = work / "old-src"
    old.mkdir(parents=True, exist_ok=True)
    subprocess.run(f"git -C {ROOT} archive {rev} src | tar -x -C {old}", shell=True, check=True)
    src = old / "src"
    found = subprocess.run([sys.executable, "-c", "import carclf; print(carclf.__file__)"], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(src))).stdout.strip()
    if not Path(found).is_relative_to(src):
        raise SystemExit(f"PYTHONPATH={src} still imports carclf from {found}: the check would compare a revision "
                         "with itself")
    log = work / "old.log"
    data = work / "data"
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from carclf.demo.synth import SynthSpec, make_dataset; "
                    f"make_dataset(Path({str(data)!r}), SynthSpec(n_classes=6, train_per_class=12, test_per_class=3, "
                    "size=(128, 96), seed=1))"], env=dict(os.environ, PYTHONPATH=str(src)), check=True)
    runs = work / "runs"
    carclf(["train", f"data.root={data}", f"out_dir={runs}", *TINY], src, log)
    run = runs / "compat"
    carclf(["calibrate", run], src, log)
    carclf(["evaluate", run], src, log)
    carclf(["ensemble", run, "-o", work / "ens", "--cv-folds", "2"], src, log)
    carclf(["evaluate", work / "ens"], src, log)
    carclf(["export", run, "-o", work / "exp", "--parity-photos", "4"], src, log)
    for name, source in (("run", run), ("ens", work / "ens"), ("exp", work / "exp")):
        carclf(["predict", source, "--data", data, "-o", work / f"old-{name}.csv", "--overwrite"], src, log)
    for f in (run / "evaluation.json", work / "ens" / "evaluation.json"):
        (work / f"old-{f.parent.name}-evaluation.json").write_text(f.read_text())
    (work / "rev.txt").write_text(rev)


def _submission(path: Path) -> np.ndarray:
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    return np.array([[float(v) for v in r[1:]] for r in rows])


def _evaluation_gap(old: Path, new: Path) -> float:
    a, b = json.loads(old.read_text()), json.loads(new.read_text())
    assert [r["fold"] for r in a] == [r["fold"] for r in b], "evaluation rows differ"
    return max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b, strict=True) for k in x
               if isinstance(x[k], float) and x[k] == x[k])


def new_phase(work: Path) -> list[tuple[str, str]]:
    log = work / "new.log"
    log.write_text("")
    data, run, ens, exp = work / "data", work / "runs" / "compat", work / "ens", work / "exp"
    rows = []
    for name, source in (("run", run), ("ensemble", ens)):
        carclf(["evaluate", source], None, log)
        gap = _evaluation_gap(work / f"old-{source.name}-evaluation.json", source / "evaluation.json")
        rows.append((f"evaluate {name}: max |change| of a figure", f"{gap:.2e}"))
    for name, source in (("run", run), ("ens", ens), ("exp", exp)):
        carclf(["predict", source, "--data", data, "-o", work / f"new-{name}.csv", "--overwrite"], None, log)
        diff = np.abs(_submission(work / f"old-{name}.csv") - _submission(work / f"new-{name}.csv")).max()
        rows.append((f"predict {name}: max |p_new - p_old|", f"{diff:.2e}"))
    carclf(["report", run, "-o", work / "report", "--overwrite"], None, log)
    rows.append(("report of the old run", "written" if (work / "report" / "report.html").is_file() else "MISSING"))
    def temperatures() -> list[float]:
        return [json.loads(f.read_text())["temperature"] for f in sorted(run.glob("fold*/calibration.json"))]

    before = temperatures()
    carclf(["calibrate", run], None, log)  # the temperature fit is the numeric core's now (numpy Newton)
    gap = max(abs(a - b) / a for a, b in zip(before, temperatures(), strict=True))
    rows.append(("calibrate again: max relative change of T", f"{gap:.2e}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="ddea015", help="git revision whose code writes the folders")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "format-compat")
    ap.add_argument("--phase", choices=["both", "old", "new"], default="both")
    args = ap.parse_args()
    work = args.work.resolve()
    if args.phase in ("both", "old"):
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"{work} is not empty: choose another --work, or --phase new to reuse it")
        work.mkdir(parents=True, exist_ok=True)
        old_phase(args.old, work)
    if args.phase in ("both", "new"):
        rev = (work / "rev.txt").read_text()
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        print(f"folders written by carclf at {rev}, read by this checkout ({head}):")
        for what, value in new_phase(work):
            print(f"  {what:<48} {value}")


if __name__ == "__main__":
    main()
