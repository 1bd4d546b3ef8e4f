"""Classification losses: cross-entropy, focal loss, or a weighted sum of both, on hard or soft (Mixup/CutMix)
targets, with label smoothing and optional per-class weights.

Written by hand: timm's losses have no focal loss, and torchvision's ``sigmoid_focal_loss`` is the binary
(one-vs-all sigmoid) form, not the softmax form used for single-label classification.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carclf.errors import CarclfError

LOSSES = ("ce", "focal", "ce+focal")


class ClassificationLoss(nn.Module):
    """``(1 - w) * CE + w * focal`` per photo, averaged over the batch; ``w`` is 0 for "ce" and 1 for "focal".

    Targets are class indices (smoothed by ``label_smoothing`` into ``(1 - e) * onehot + e / K``) or soft target
    rows (Mixup/CutMix, already smoothed by timm's Mixup). Focal loss (Lin et al., 2017) in its softmax form:
    ``-sum_c t_c (1 - p_c)^gamma log p_c``; with gamma = 0 it equals cross-entropy. ``class_weights`` (one per
    class) scale each class's term, so rare classes can count more.
    """

    def __init__(
        self, kind: str = "ce", gamma: float = 2.0, focal_weight: float = 0.5, label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise CarclfError(f"train.loss='{kind}' must be one of {', '.join(LOSSES)}")
        self.kind, self.gamma, self.label_smoothing = kind, float(gamma), float(label_smoothing)
        self.w = {"ce": 0.0, "focal": 1.0, "ce+focal": float(focal_weight)}[kind]
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def soft_targets(self, target: torch.Tensor, n: int) -> torch.Tensor:
        if target.dim() == 2:
            return target.float()
        onehot = F.one_hot(target.long(), n).float()
        return onehot * (1 - self.label_smoothing) + self.label_smoothing / n

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_photo(logits, target).mean()

    def per_photo(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each photo (the distillation loss weighs them); target rows may be scaled (a zero row: no
        hard label)."""
        logp = F.log_softmax(logits.float(), dim=1)
        t = self.soft_targets(target, logits.shape[1])
        if self.class_weights is not None:
            t = t * self.class_weights.to(t.device)[None, :]
        loss = logits.new_zeros(len(logits), dtype=torch.float32)
        if self.w < 1:
            loss = loss + (1 - self.w) * -(t * logp).sum(1)
        if self.w > 0:
            modulation = (1 - logp.exp()).clamp_min(0) ** self.gamma
            loss = loss + self.w * -(t * modulation * logp).sum(1)
        return loss


def class_weights_for(spec: str, classes: list[str], labels: np.ndarray) -> torch.Tensor | None:
    """``train.class_weights``: "" (none), "balanced" (scikit-learn's n / (K * count), mean 1 over the photos), or a
    CSV file ``class,weight`` (classes not listed weigh 1)."""
    if not spec:
        return None
    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(labels)
        w = np.ones(len(classes))
        w[present] = compute_class_weight("balanced", classes=present, y=labels)
        return torch.tensor(w, dtype=torch.float32)
    path = Path(spec)
    if not path.is_file():
        raise CarclfError(f"train.class_weights='{spec}': use '', 'balanced' or a CSV file of class,weight")
    from carclf.data.scan import column_key, read_csv_rows

    header, rows = read_csv_rows(path)
    if [column_key(h) for h in header[:2]] != ["class", "weight"]:
        raise CarclfError(f"'{path}' must have the columns class,weight (found: {', '.join(header)})")
    index = {column_key(c): i for i, c in enumerate(classes)}
    w = np.ones(len(classes))
    for n, row in enumerate(rows, 2):
        name = column_key(row[0])
        if name not in index:
            raise CarclfError(f"'{path}' line {n}: '{row[0]}' is not one of the model's classes")
        try:
            w[index[name]] = float(row[1])
        except (IndexError, ValueError) as exc:
            raise CarclfError(f"'{path}' line {n}: the weight must be a number") from exc
    if (w <= 0).any():
        raise CarclfError(f"'{path}': every class weight must be positive")
    return torch.tensor(w, dtype=torch.float32)
