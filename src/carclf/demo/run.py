"""``carclf demo``: synthetic fine-grained car photos -> train -> calibrate -> predict -> evaluate, offline, minutes."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from carclf.analyze.evaluate import evaluate_run, format_table
from carclf.artifacts.owned import OwnedFolder
from carclf.calibrate.temperature import calibrate_run
from carclf.config import load_config
from carclf.data.scan import nfc
from carclf.demo.synth import SynthSpec, make_dataset
from carclf.infer.predict import predict_run
from carclf.metrics import score

# The demo recipe: offline pretrained lite0, 3 folds, small photos, a few epochs (minutes on 2 CPU cores).
DEMO_OVERRIDES = [
    "name=demo",
    "model.name=tf_efficientnet_lite0",
    "model.freeze=3",
    "data.n_folds=3",
    "data.img_size=160",
    "data.num_workers=1",
    "train.folds=all",
    "train.epochs=8",
    "train.lr=2e-3",
    "train.ema_decay=0.99",
]
DEMO_SPEC = SynthSpec(n_classes=12, train_per_class=30, test_per_class=8, seed=0)
DEMO_MARKER = ".carclf-demo"
DEMO_ENTRIES = {DEMO_MARKER, "data", "runs", "submission.csv"}  # everything a demo writes into --out
DEMO_FOLDER = OwnedFolder("demo folder", DEMO_MARKER, lambda _: DEMO_ENTRIES, "a demo", flag="--out")


def read_labels(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return {r["ID"]: nfc(r["label"]) for r in csv.DictReader(fh)}


def score_submission(submission: Path, labels: dict[str, str]) -> dict[str, float]:
    """Score a submission file against known labels, as the competition would (by column name)."""
    with submission.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    cols = [nfc(c) for c in rows[0][1:]]
    probs = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    y = np.array([cols.index(labels[r[0]]) for r in rows[1:]])
    return score(probs, y)


def run_demo(
    out: Path, overwrite: bool = False, overrides: list[str] | tuple[str, ...] = (), spec: SynthSpec = DEMO_SPEC
) -> dict:
    """Generate the data, run every step, print a summary table; return the summary figures."""
    out = Path(out)
    DEMO_FOLDER.make_room(out, overwrite)
    start = time.time()
    DEMO_FOLDER.mark(out, {"kind": "carclf demo", "spec": vars(spec)})
    info = make_dataset(out / "data", spec)
    print(f"synthetic data: {len(info.classes)} classes (two of them one model: {info.merged[0]}), "
          f"{len(info.duplicates)} duplicate photos, {len(info.test_labels)} test photos -> {out / 'data'}")
    # The generator draws two class names from one model; say so, as a user would for the competition's pairs.
    names = "\n".join(f"  - ['{a}', '{b}']" for a, b in info.merged)
    (out / "data" / "merges.yaml").write_text(f"merges:\n{names}\n", encoding="utf-8")
    cfg = load_config(None, [*DEMO_OVERRIDES, f"out_dir={out / 'runs'}", f"data.root={out / 'data'}", *overrides])
    from carclf.train.loop import train

    run_dir = train(cfg)
    cal = calibrate_run(run_dir)
    sub = out / "submission.csv"
    predict_run(run_dir, out / "data", sub, overwrite=True)
    rows = evaluate_run(run_dir)
    test = score_submission(sub, read_labels(out / "data" / "test_labels.csv"))
    overall = rows[-1]
    summary = {
        "oof_log_loss_raw": overall["log_loss_raw"], "oof_log_loss_calibrated": overall["log_loss"],
        "oof_accuracy": overall["accuracy"], "test_log_loss": test["log_loss"], "test_accuracy": test["accuracy"],
        "minutes": (time.time() - start) / 60,
    }
    print()
    print("temperatures: " + ", ".join(f"fold {r['fold']}: {r['temperature']:.3f}" for r in cal))
    print(format_table(rows, ["fold", "n", "log_loss_raw", "log_loss", "log_loss_model", "accuracy", "top5", "ece"]))
    print()
    print(format_table([summary], list(summary)))
    print(f"""
files:
  data            {out / 'data'}   (train/, test/, test.csv, sample_submission.csv, merges.yaml, test_labels.csv)
  data health     {Path(cfg.out_dir) / 'prepare' / 'data'}   (manifest.csv, duplicates.csv, quarantine.csv, ...)
  run             {run_dir}   (config.yaml, folds.csv, fold*/metrics.csv best.pt last.pt oof.npz calibration.json)
  evaluation      {run_dir / 'evaluation.json'}
  submission      {sub}""")
    return summary
