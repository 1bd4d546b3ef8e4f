"""evaluate scores out-of-fold probabilities exactly as the submission is scored."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from carclf.analyze.evaluate import evaluate_run
from carclf.artifacts.run import RunDir
from carclf.config import Config
from carclf.data.merges import build_merge_map, identity


def _run(root, merge, logits, labels, original, eps=1e-6):
    rd = RunDir(root)
    cfg = Config(name="x")
    cfg.predict.eps = eps
    rd.create(cfg)
    rd.write_meta({"classes": merge.classes, "merge": merge.to_dict()})
    rd.fold(0).dir.mkdir()
    rd.fold(0).best.write_bytes(b"")
    np.savez(rd.fold(0).oof, indices=np.arange(len(labels)), labels=labels, logits=logits, original_labels=original)
    return rd


def test_log_loss_is_the_clipped_submission_score(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(0, 1, (200, 4))
    logits[np.arange(200), labels] += 3
    logits[0] = [40.0, -40.0, -40.0, -40.0]  # one confidently wrong photo: clipping decides its cost
    labels[0] = 3
    rd = _run(tmp_path / "r", identity(list("abcd")), logits, labels, labels, eps=1e-4)
    row = evaluate_run(rd.path)[0]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    clipped = np.clip(p, 1e-4, 1 - 1e-4)
    clipped /= clipped.sum(1, keepdims=True)
    assert row["log_loss"] == pytest.approx(log_loss(labels, clipped, labels=range(4)), rel=1e-9)
    assert row["log_loss_model"] > row["log_loss"]  # unclipped, the wrong photo costs -log(e^-80)
    assert row["log_loss_raw"] == row["log_loss"]  # not calibrated yet: T = 1


def test_merged_classes_are_scored_in_the_original_columns(tmp_path):
    merge = build_merge_map(["a", "b", "c"], [["a", "b"]])  # model classes: a (= a + b), c
    rng = np.random.default_rng(1)
    original = rng.integers(0, 3, 300)
    labels = merge.label_map[original]
    logits = rng.normal(0, 1, (300, 2))
    logits[np.arange(300), labels] += 4
    rd = _run(tmp_path / "r", merge, logits, labels, original)
    row = evaluate_run(rd.path)[0]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cols = np.stack([p[:, 0] / 2, p[:, 0] / 2, p[:, 1]], axis=1)  # an even split of a's probability over a and b
    assert row["log_loss"] == pytest.approx(log_loss(original, np.clip(cols, 1e-6, 1), labels=range(3)), rel=1e-6)
    assert row["log_loss"] > row["log_loss_model"]  # sharing a merged class out costs log 2 on its photos
