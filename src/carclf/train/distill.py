"""Knowledge distillation (Hinton et al., 2015): the student's loss against its teacher's softened targets.

Per training photo::

    loss = h * hard_loss(student, label) + T^2 * s * KL(teacher_T || student_T)

with ``h = 1 - alpha`` and ``s = alpha`` for a labeled photo with a teacher row, ``h = 1, s = 0`` for one without (it
trains on its label alone), and ``h = 0, s = alpha`` (times the teacher's confidence with
``distill.unlabeled_weight=confidence``) for an unlabeled photo; ``p_T = softmax(log p / T)``. The hard loss is the
recipe's own (cross-entropy or focal, label smoothing, class weights). Mixup/CutMix mix the images once and every
target with the same ``lam`` and the same partner: the hard rows as timm does, the teacher rows and their weights
likewise (KL is linear in the teacher distribution up to its entropy, which is mixed too, so the soft term is the
mixture of the two photos' KL terms).

Written by hand: timm and torchvision ship no distillation loss for classification with per-photo weights and
Mixup-consistent soft targets. With alpha = 0 and no unlabeled photos every weight is exactly 1 or 0, so the loss is
the plain run's, bit for bit (tests/test_distill.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the teacher's (calibrated) probabilities softened by the distillation temperature;
    T = 1 returns them unchanged (renormalised), zeros stay zero."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        z = np.log(p) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class DistillTargets:
    """Per training row (the training dataset's label of a photo is its row number here)."""

    hard: torch.Tensor  # (n,) int64 model label; 0 for an unlabeled row (its hard weight is 0)
    hard_weight: torch.Tensor  # (n,) float32
    soft: torch.Tensor  # (n, K) float32 softened teacher probabilities (zero rows where soft_weight is 0)
    soft_weight: torch.Tensor  # (n,) float32
    neg_entropy: torch.Tensor  # (n,) float32: sum_c p_T log p_T of the soft row
    temperature: float

    @classmethod
    def build(cls, labels: np.ndarray, teacher_probs: np.ndarray, has_row: np.ndarray, unlabeled_probs: np.ndarray,
              alpha: float, temperature: float, confidence_weight: bool = False) -> DistillTargets:
        """Rows for the labeled photos (``labels``; ``teacher_probs`` where ``has_row``), then the unlabeled ones."""
        n_lab, n_unl = len(labels), len(unlabeled_probs)
        k = teacher_probs.shape[1] if len(teacher_probs) else unlabeled_probs.shape[1]
        soft = np.zeros((n_lab + n_unl, k), dtype=np.float64)
        if has_row.any():
            soft[:n_lab][has_row] = soften(teacher_probs[has_row], temperature)
        if n_unl:
            soft[n_lab:] = soften(unlabeled_probs, temperature)
        hard_w = np.where(has_row, 1.0 - alpha, 1.0)
        soft_w = np.where(has_row, alpha, 0.0)
        unl_w = alpha * (np.asarray(unlabeled_probs).max(axis=1) if confidence_weight and n_unl else np.ones(n_unl))
        with np.errstate(divide="ignore", invalid="ignore"):
            neg_ent = np.where(soft > 0, soft * np.log(soft), 0.0).sum(axis=1)
        return cls(
            hard=torch.from_numpy(np.concatenate([labels, np.zeros(n_unl)]).astype(np.int64)),
            hard_weight=torch.from_numpy(np.concatenate([hard_w, np.zeros(n_unl)]).astype(np.float32)),
            soft=torch.from_numpy(soft.astype(np.float32)),
            soft_weight=torch.from_numpy(np.concatenate([soft_w, unl_w]).astype(np.float32)),
            neg_entropy=torch.from_numpy(neg_ent.astype(np.float32)), temperature=float(temperature),
        )

    def __len__(self) -> int:
        return len(self.hard)


@dataclass
class DistillBatch:
    """One batch's targets, mixed as its images were: weighted hard rows, weighted teacher rows, mixed entropies."""

    hard: torch.Tensor  # (b, K)
    soft: torch.Tensor  # (b, K)
    neg_entropy: torch.Tensor  # (b,)


def _mix(t: torch.Tensor, lam: float) -> torch.Tensor:
    """timm's batch-mode pairing: photo i with photo b-1-i, ``t * lam + t.flip(0) * (1 - lam)`` as mixup_target."""
    return t * lam + t.flip(0) * (1.0 - lam)


def batch_targets(targets: DistillTargets, rows: torch.Tensor, criterion: nn.Module, mixup: object | None,
                  device: torch.device) -> DistillBatch:
    """The targets of a batch of ``rows``. ``mixup``: the fold's Mixup after it mixed this batch's images (its
    ``lam`` recorded), or None when the recipe has none."""
    rows = rows.long().cpu()  # the tables stay on the CPU: (n, K) float32 is 52 MB at 33,000 photos x 396 classes
    n_classes = targets.soft.shape[1]
    pin = device.type == "cuda"

    def take(t: torch.Tensor) -> torch.Tensor:
        part = t[rows]
        return (part.pin_memory() if pin else part).to(device, non_blocking=True)

    hw, sw, hard_idx = take(targets.hard_weight), take(targets.soft_weight), take(targets.hard)
    soft = take(targets.soft) * sw[:, None]
    ne = take(targets.neg_entropy) * sw
    if mixup is None:
        hard = criterion.soft_targets(hard_idx, n_classes) * hw[:, None]
        return DistillBatch(hard, soft, ne)
    from timm.data.mixup import one_hot

    smoothing = float(mixup.label_smoothing)
    off = smoothing / n_classes
    y1 = one_hot(hard_idx, n_classes, on_value=1.0 - smoothing + off, off_value=off) * hw[:, None]
    lam = float(mixup.lam)
    return DistillBatch(_mix(y1, lam), _mix(soft, lam), _mix(ne, lam))


class DistillLoss(nn.Module):
    """``mean(hard + T^2 * soft)`` per the module docstring; ``base`` is the recipe's ClassificationLoss."""

    def __init__(self, base: nn.Module, temperature: float) -> None:
        super().__init__()
        self.base, self.temperature = base, float(temperature)

    def forward(self, logits: torch.Tensor, target: DistillBatch) -> torch.Tensor:
        hard = self.base.per_photo(logits, target.hard)
        t = self.temperature
        log_q = F.log_softmax(logits.float() / t, dim=1)
        soft = (t * t) * (target.neg_entropy - (target.soft * log_q).sum(1))
        return (hard + soft).mean()


__all__ = ["DistillBatch", "DistillLoss", "DistillTargets", "batch_targets", "soften"]
