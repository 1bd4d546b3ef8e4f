"""The loss switches: cross-entropy, focal, their weighted sum; hard and soft targets; class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from carclf.errors import CarclfError
from carclf.train.losses import ClassificationLoss, class_weights_for


def _batch(seed=0, n=64, k=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 3, torch.randint(0, k, (n,), generator=g)


def test_ce_with_label_smoothing_equals_torch():
    logits, y = _batch()
    ours = ClassificationLoss("ce", label_smoothing=0.1)(logits, y)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-6)


def test_soft_targets_equal_timm_soft_target_ce():
    logits, y = _batch(1)
    soft = torch.softmax(torch.randn(len(y), logits.shape[1]), dim=1)
    assert ClassificationLoss("ce")(logits, soft).item() == pytest.approx(
        SoftTargetCrossEntropy()(logits, soft).item(), rel=1e-6)


def test_focal_with_gamma_zero_is_ce_and_down_weights_easy_photos():
    logits, y = _batch(2)
    assert ClassificationLoss("focal", gamma=0)(logits, y).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)
    easy = F.one_hot(y, 7).float() * 8  # confidently right: focal loss all but ignores them
    hard = -F.one_hot(y, 7).float() * 8
    ce, focal = ClassificationLoss("ce"), ClassificationLoss("focal", gamma=2)
    assert focal(easy, y) < 0.01 * ce(easy, y)
    assert focal(hard, y) > 0.9 * ce(hard, y)


def test_focal_on_soft_mixup_targets_and_the_weighted_sum():
    logits, y = _batch(3)
    soft = 0.7 * F.one_hot(y, 7).float() + 0.3 * F.one_hot(y.roll(1), 7).float()
    ce = ClassificationLoss("ce")(logits, soft)
    focal = ClassificationLoss("focal", gamma=2)(logits, soft)
    both = ClassificationLoss("ce+focal", gamma=2, focal_weight=0.25)(logits, soft)
    assert torch.isfinite(focal)
    assert both.item() == pytest.approx((0.75 * ce + 0.25 * focal).item(), rel=1e-6)


def test_class_weights_balanced_and_from_a_file(tmp_path):
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights_for("balanced", ["a", "b", "c"], labels)
    assert w[1] == pytest.approx(9 * w[0])
    assert w[2] == 1.0  # a class with no training photo keeps weight 1
    logits = torch.zeros(2, 3)
    y = torch.tensor([0, 1])
    per = ClassificationLoss("ce", class_weights=w)
    assert per(logits[:1], y[1:]).item() == pytest.approx(9 * per(logits[:1], y[:1]).item(), rel=1e-6)
    f = tmp_path / "w.csv"
    f.write_text("class,weight\nb,3\n", encoding="utf-8")
    assert class_weights_for(str(f), ["a", "b", "c"], labels).tolist() == [1.0, 3.0, 1.0]
    f.write_text("class,weight\nzz,3\n", encoding="utf-8")
    with pytest.raises(CarclfError, match="'zz' is not one of the model's classes"):
        class_weights_for(str(f), ["a", "b", "c"], labels)
    with pytest.raises(CarclfError, match="balanced"):
        class_weights_for("inverse", ["a"], labels)
