"""Test-time augmentation on a run's out-of-fold photos: log loss and accuracy of each policy the stored views
allow, raw and temperature-calibrated (the temperature fitted on one half of the photos and scored on the other,
both ways, so no figure is scored on the rows it was fitted on).

    python benchmarks/tta_ablation.py benchmarks/out/<run>
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.model_selection import StratifiedKFold

from carclf.artifacts.run import RunDir
from carclf.calibrate.temperature import fit_temperature, nll
from carclf.metrics import score, softmax
from carclf.tta import parse_policy

POLICIES = ["none", "hflip", "multiscale", "hflip+multiscale"]


def held_out_temperature_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean log loss with a temperature fitted on the other half (2-fold, stratified where classes allow)."""
    try:
        splits = list(StratifiedKFold(2, shuffle=True, random_state=0).split(logits, labels))
    except ValueError:
        idx = np.random.default_rng(0).permutation(len(labels))
        splits = [(idx[: len(idx) // 2], idx[len(idx) // 2 :]), (idx[len(idx) // 2 :], idx[: len(idx) // 2])]
    total = 0.0
    for fit_rows, score_rows in splits:
        t = fit_temperature(logits[fit_rows], labels[fit_rows])
        total += nll(logits[score_rows], labels[score_rows], t) * len(score_rows)
    return total / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    a = ap.parse_args()
    rd = RunDir.open(a.run)
    print("| fold | policy | views | log loss raw | log loss, held-out temperature | accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in rd.completed_folds():
        with np.load(rd.fold(k).oof) as z:
            if "view_logits" not in z.files:
                print(f"| {k} | - | run predates per-view OOF logits | | | |")
                continue
            views = [str(v) for v in z["views"]]
            vl, labels = z["view_logits"].astype(np.float64), z["labels"]
        for policy in POLICIES:
            want = parse_policy(policy)
            if not set(want) <= set(views):
                continue
            logits = vl[[views.index(v) for v in want]].mean(0)
            s = score(softmax(logits), labels)
            print(f"| {k} | {policy} | {','.join(want)} | {s['log_loss']:.4f} | "
                  f"{held_out_temperature_nll(logits, labels):.4f} | {s['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
