"""Benchmark: how much do duplicate photos on both sides of a fold split flatter validation log loss?

Builds a data set from some classes of ../shared/data/cars196 (originals linked, never copied into the repository):
a quarter of each class is held out as a clean "leaderboard" test set; of the rest, half the photos get a planted
near-duplicate (re-encoded at another JPEG quality and resized by 90%, the kind of copy a scraped data set holds).
The same recipe is trained twice on fold 0, keeping every copy in training (data.within_class=keep_all):

- data.fold_policy=stratified: plain StratifiedKFold; copies land on both sides of the split.
- data.fold_policy=group:      StratifiedGroupKFold over prepare's duplicate groups; every copy stays in one fold.

It prints each run's validation log loss next to its log loss on the clean held-out photos.

    python benchmarks/leak_effect.py [--classes 40] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from carclf.analyze.evaluate import evaluate_run
from carclf.calibrate.temperature import calibrate_run
from carclf.config import load_config
from carclf.infer.predictor import Predictor
from carclf.metrics import score
from carclf.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CARS = ROOT.parent / "shared" / "data" / "cars196"
RECIPE = [
    "data.img_size=128", "data.n_folds=5", "data.num_workers=1", "train.epochs=4", "train.lr=2e-3",
    "model.freeze=3", "train.ema_decay=0.99", "data.within_class=keep_all",
]


def build(out: Path, n_classes: int, seed: int = 0) -> tuple[Path, list[tuple[Path, str]]]:
    rng = random.Random(seed)
    data = out / "data"
    holdout: list[tuple[Path, str]] = []
    for folder in sorted((CARS / "train").iterdir())[:n_classes]:
        photos = sorted(folder.glob("*.jpg"))
        rng.shuffle(photos)
        n_test = len(photos) // 4
        holdout += [(p, folder.name) for p in photos[:n_test]]
        dst = data / "train" / folder.name
        dst.mkdir(parents=True)
        for i, p in enumerate(photos[n_test:]):
            (dst / p.name).symlink_to(p)
            if i % 2 == 0:  # a planted near-duplicate of every other photo
                img = Image.open(p).convert("RGB")
                img = img.resize((int(img.width * 0.9), int(img.height * 0.9)), Image.Resampling.LANCZOS)
                img.save(dst / f"copy_{p.name}", quality=rng.choice([60, 75, 85]))
    return data, holdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "leak-effect"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # benchmark scratch space under the git-ignored benchmarks/out/
    data, holdout = build(out, args.classes)
    results = []
    for policy in ("stratified", "group"):
        start = time.time()
        cfg = load_config(None, [*RECIPE, f"data.root={data}", f"out_dir={out / 'runs'}", f"name={policy}",
                                 f"data.fold_policy={policy}", *args.overrides])
        run = train(cfg, log=lambda s: None)
        calibrate_run(run)
        with (run / "folds.csv").open(encoding="utf-8") as fh:
            folds = {r["path"]: int(r["fold"]) for r in csv.DictReader(fh)}

        def copy_of(path: str) -> str:
            folder, name = path.rsplit("/", 1)
            return f"{folder}/copy_{name}"

        # Validation photos whose planted copy sits in the training folds: the leak the group policy removes.
        copies_across = sum(1 for p, f in folds.items() if f == 0 and folds.get(copy_of(p), 0) != 0)
        val = evaluate_run(run)[0]
        predictor = Predictor.open(run)
        probs, _ = predictor.predict_paths([p for p, _ in holdout])
        cls = {c: i for i, c in enumerate(predictor.output_classes)}
        test = score(probs, np.array([cls[c] for _, c in holdout]))
        results.append({
            "fold_policy": policy, "val_log_loss": round(val["log_loss"], 4), "val_accuracy": round(val["accuracy"], 4),
            "holdout_log_loss": round(test["log_loss"], 4), "holdout_accuracy": round(test["accuracy"], 4),
            "optimism": round(test["log_loss"] - val["log_loss"], 4), "val_originals_with_copy_in_train": copies_across,
            "n_val": val["n"], "n_holdout": len(holdout), "minutes": round((time.time() - start) / 60, 1),
        })
        print(json.dumps(results[-1]), flush=True)
    with open(out.parent / "leak_effect.jsonl", "a", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps({**r, "classes": args.classes, "overrides": args.overrides}) + "\n")


if __name__ == "__main__":
    main()
