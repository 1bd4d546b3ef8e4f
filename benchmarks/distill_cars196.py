"""Benchmark: knowledge distillation on cars196: a teacher ensemble, a lite0 student at one view without and with
the teacher, with and without unlabeled photos; OOF and held-out figures, training time and peak memory, and the
distilled student's one-model export under load.

    python benchmarks/distill_cars196.py                 # everything; resumable: run it again after an interruption
    python benchmarks/distill_cars196.py --epochs 4 --folds 3 --student-size 112 --teacher-size 128  # the defaults

How the data are carved (deterministic): of each cars196 class, a seeded 20% of its photos go to a *pool* folder
(flat, renamed ``<n>.jpg``, so no file or folder name gives the class away); the other 80% are the labeled training
data (``train/<class>/``, symlinks). The pool is (a) the unlabeled photos of the last student
(``distill.unlabeled=POOL``) and (b), for every other model, photos no model trained on: a held-out check that
the OOF figures are honest. Its labels live beside it in ``pool_labels.csv``, outside the data root.

Steps (each skipped when its output is complete, so a rerun continues where an interrupted one stopped):
  1. ``plain``     the student without a teacher: lite0 at S px (x 1.89 wide), no TTA, K folds x E epochs
  2. ``teacher``   lite0 at T px with hflip TTA, same folds and schedule; both calibrated
  3. ``ens``       ``carclf ensemble teacher plain``: the teacher ensemble
  4. ``distill``   the student with ``distill.teacher=ens distill.targets=oof`` (``--student-folds``: fold 0 by
                   default, to fit a session): targets from the teacher's own OOF rows (optimistic OOF figure)
  5. ``distill-u`` the same plus ``distill.unlabeled=POOL``
  6. ``nest``      ``carclf nest ens --outer <student folds>``: each member's nested runs (``<run>-outer<k>``, fold
                   k left out, K-1 models each) and the nested ensembles ``ens-outer<k>``
  7. ``distill-nested``, ``distill-u-nested``: 4 and 5 with the honest nested targets (distill.targets=nested)
Every model is scored on the out-of-fold rows of fold 0 (the students' validation photos: like for like) and, where
it has them, on all folds; and on the pool, a fold-0 student by its fold-0 model alone.
  8. a fold-0 export: of ``distill-u`` through a one-member ensemble (``serve``; it chose hflip TTA, two views), and
     of the ``distill-u-nested`` run itself at its one view (``serve-nested``), served under
     ``benchmarks/serve_load.py``
Training commands run under ``/usr/bin/time`` (wall seconds, peak RSS of the largest process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cars196"
CARCLF = [sys.executable, "-m", "carclf"]


def carve(src: Path, out: Path, share: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """data/train/<class>/ (symlinks, 80%) and pool/<n>.jpg (symlinks, 20%) + pool_labels.csv; once."""
    data, pool, labels = out / "data", out / "pool", out / "pool_labels.csv"
    if labels.is_file():
        return data, pool
    for p in (data, pool):
        if p.exists():
            shutil.rmtree(p)
    rng = np.random.default_rng(seed)
    rows, n = [], 0
    for cls in sorted(d for d in (src / "train").iterdir() if d.is_dir()):
        photos = sorted(p for p in cls.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        chosen = set(rng.choice(len(photos), size=max(1, round(share * len(photos))), replace=False).tolist())
        (data / "train" / cls.name).mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(photos):
            if i in chosen:
                pool.mkdir(parents=True, exist_ok=True)
                name = f"{n:05d}{p.suffix.lower()}"
                (pool / name).symlink_to(p.resolve())
                rows.append((name, cls.name))
                n += 1
            else:
                (data / "train" / cls.name / p.name).symlink_to(p.resolve())
    with open(labels.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("file", "class"), *rows])
    os.replace(labels.with_suffix(".tmp"), labels)
    return data, pool


def run(cmd: list[str], timing: Path | None = None) -> dict:
    """Run a command (under /usr/bin/time when ``timing``); its wall seconds and peak RSS."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    if timing is None:
        subprocess.run(cmd, check=True)
        return {}
    subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *map(str, cmd)], check=True)
    wall, rss_kb = timing.read_text().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_mib": round(int(rss_kb) / 1024, 1)}


def trained(run_dir: Path, folds: list[int]) -> bool:
    return all((run_dir / f"fold{k}" / "oof.npz").is_file() for k in folds)


def score_oof(path: Path) -> dict:
    """OOF log loss / accuracy (calibrated) over fold 0's rows, and over every fold's where all are there."""
    from carclf.artifacts.oof import load_oof
    from carclf.metrics import score

    oof = load_oof(path)
    out = {}
    for name, mask in (("fold0", oof.folds == 0), ("all", np.ones(len(oof), bool))):
        if name == "all" and len(np.unique(oof.folds)) < 2:
            continue
        s = score(oof.probs[mask], oof.labels[mask])
        out.update({f"oof_{name}_log_loss": round(s["log_loss"], 4), f"oof_{name}_accuracy": round(s["accuracy"], 4),
                    f"oof_{name}_rows": int(mask.sum())})
    return out


def score_pool(path: Path, pool: Path, labels_csv: Path, folds: list[int] | None = None, tag: str = "pool") -> dict:
    from carclf.infer.predictor import Predictor
    from carclf.metrics import score

    with open(labels_csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    predictor = Predictor.open(path, device="cpu", folds=folds)
    probs, bad = predictor.predict_paths([pool / r["file"] for r in rows])
    index = {c: i for i, c in enumerate(predictor.output_classes)}
    y = np.array([index[r["class"]] for r in rows])
    s = score(probs, y)
    return {f"{tag}_log_loss": round(s["log_loss"], 4), f"{tag}_accuracy": round(s["accuracy"], 4),
            f"{tag}_rows": len(y), f"{tag}_bad": len(bad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "distill"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--student-size", type=int, default=112)
    ap.add_argument("--teacher-size", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--student-folds", default="0", help="folds the distilled students train (0, or all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, pool = carve(Path(args.data), out)
    runs = out / "runs"
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()}
    results["settings"] = vars(args)

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))

    common = [f"data.root={data}", f"out_dir={runs}", f"data.n_folds={args.folds}",
              f"train.epochs={args.epochs}", "train.swa_start_epoch=0", "train.warmup_epochs=0.3",
              "predict.oof_views=hflip", "predict.oof_features=false", "track.enabled=false"]
    student = [f"data.img_size={args.student_size}", "predict.tta=none"]
    distill = [f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}"]
    sf = f"train.folds={args.student_folds}"
    taught = [*student, sf, f"distill.teacher={out / 'ens'}", *distill]
    steps = {
        "plain": [*student, "train.folds=all"],
        "teacher": [f"data.img_size={args.teacher_size}", "predict.tta=hflip", "train.folds=all"],
        "distill": [*taught, "distill.targets=oof"],
        "distill-u": [*taught, "distill.targets=oof", f"distill.unlabeled={pool}"],
        "distill-nested": [*taught, "distill.targets=nested"],
        "distill-u-nested": [*taught, "distill.targets=nested", f"distill.unlabeled={pool}"],
    }
    all_folds = list(range(args.folds))
    student_folds = all_folds if args.student_folds == "all" else [int(k) for k in args.student_folds.split(",")]
    for name, extra in steps.items():
        if name.startswith("distill") and not (out / "ens" / "ensemble.yaml").is_file():
            for member in ("plain", "teacher"):
                run([*CARCLF, "calibrate", runs / member])
            run([*CARCLF, "ensemble", runs / "teacher", runs / "plain", "-o", out / "ens", "--overwrite"])
            results["ens"] = {**score_oof(out / "ens"), **score_pool(out / "ens", pool, out / "pool_labels.csv")}
            save()
        if name.endswith("-nested") and "nest" not in results:
            t = run([*CARCLF, "nest", out / "ens", "--outer", args.student_folds], out / "nest.time")
            results["nest"] = {**t, **score_nested(out, student_folds)}
            save()
        rd = runs / name
        folds = student_folds if name.startswith("distill") else all_folds
        if not trained(rd, folds):
            resume = ["--resume"] if rd.is_dir() else []
            recipe = ROOT / "configs" / "cpu-lite0.yaml"
            t = run([*CARCLF, "train", "-c", recipe, f"name={name}", *common, *extra, *resume], out / f"{name}.time")
            # a resumed run's wall time is not the run's; its peak memory still is a fold's
            results.setdefault(name, {}).update(t if not resume else {f"resumed_{k}": v for k, v in t.items()})
            run([*CARCLF, "calibrate", rd])
        if "oof_fold0_log_loss" not in results.get(name, {}):
            if not (rd / "fold0" / "calibration.json").is_file():
                run([*CARCLF, "calibrate", rd])
            results.setdefault(name, {}).update(score_oof(rd))
            results[name].update(score_pool(rd, pool, out / "pool_labels.csv", [0], "pool_fold0"))
            if folds == all_folds:
                results[name].update(score_pool(rd, pool, out / "pool_labels.csv"))
            results[name]["epoch_seconds"] = _epoch_seconds(rd, folds)
            save()
        print(name, results[name], flush=True)
    if "serve" not in results:
        one = out / "ens-distill-u-fold0"
        if not (one / "ensemble.yaml").is_file():
            run([*CARCLF, "ensemble", f"{runs / 'distill-u'}:0", "-o", one, "--overwrite"])
        exp = out / "exp-distill-u-fold0"
        if not (exp / "export.yaml").is_file():
            run([*CARCLF, "export", one, "-o", exp, "--overwrite"])
        load = out / "serve.json"
        run([sys.executable, ROOT / "benchmarks" / "serve_load.py", exp, "--photos-from", runs / "distill-u",
             "--requests", str(args.requests), "--concurrency", "16", "--out", load])
        results["serve"] = json.loads(load.read_text())
        save()
    if "serve-nested" not in results:
        exp = out / "exp-distill-u-nested-fold0"
        if not (exp / "export.yaml").is_file():
            run([*CARCLF, "export", runs / "distill-u-nested", "-o", exp, "--overwrite"])
        load = out / "serve-nested.json"
        run([sys.executable, ROOT / "benchmarks" / "serve_load.py", exp, "--photos-from", runs / "distill-u-nested",
             "--requests", str(args.requests), "--concurrency", "16", "--out", load])
        results["serve-nested"] = json.loads(load.read_text())
        save()
    print(json.dumps(results, indent=1))


def score_nested(out: Path, folds: list[int]) -> dict:
    """Each nested ensemble ``ens-outer<k>`` on its rows (every fold but k), beside the full ensemble on the same
    rows: what leaving a fold out costs the teacher (its models trained on (K-2)/K of the photos, not (K-1)/K)."""
    from carclf.artifacts.oof import load_oof
    from carclf.metrics import score

    full = load_oof(out / "ens")
    at = {p: i for i, p in enumerate(full.paths)}
    res = {}
    for k in folds:
        nested = load_oof(out / f"ens-outer{k}")
        rows = [at[p] for p in nested.paths]
        a, b = score(nested.probs, nested.labels), score(full.probs[rows], full.labels[rows])
        res[f"outer{k}"] = {"rows": len(rows), "nested_log_loss": round(a["log_loss"], 4),
                            "nested_accuracy": round(a["accuracy"], 4), "ens_log_loss": round(b["log_loss"], 4),
                            "ens_accuracy": round(b["accuracy"], 4)}
    return res


def _epoch_seconds(rd: Path, folds: list[int]) -> float:
    """Mean seconds per training epoch over the folds (metrics.csv)."""
    secs = []
    for k in folds:
        with open(rd / f"fold{k}" / "metrics.csv", encoding="utf-8") as fh:
            secs += [float(r["seconds"]) for r in csv.DictReader(fh) if r.get("seconds")]
    return round(float(np.mean(secs)), 1)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
