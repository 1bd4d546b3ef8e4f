"""A fold's training state, typed: :class:`FoldParts` (model, averages, optimizer, ... built by :func:`build_fold`),
:class:`Fold` (what the fold trains and validates on, fixed once set up) and :class:`Progress` (where training stands,
which last.pt records besides the weights)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carclf.artifacts.checkpoint import write_best
from carclf.artifacts.run import FoldPaths, RunDir
from carclf.config import Config, effective_lr
from carclf.data.dataset import ImageDataset
from carclf.data.rundata import RunData
from carclf.data.transforms import batch_normalize, data_config_for
from carclf.errors import CarclfError
from carclf.models.factory import create_model
from carclf.runtime import amp_dtype, grad_scaler
from carclf.train.losses import ClassificationLoss, class_weights_for


@dataclass
class FoldParts:
    """What trains one fold. ``forward`` is ``model`` as called in training (compiled, wrapped in DDP); ``ddp`` the
    DistributedDataParallel wrapper under torchrun; ``warm_frozen`` the parameters ``train.freeze_epochs`` freezes."""

    model: nn.Module
    ema: Any  # timm's ModelEmaV3, or None
    swa: Any  # torch.optim.swa_utils.AveragedModel, or None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm's CosineLRScheduler, stepped per optimizer update
    forward: Callable
    warm_frozen: list[nn.Parameter]
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    criterion: Callable
    mixup: Any  # timm's Mixup, or None
    amp: torch.dtype | None
    erasing: Callable | None
    normalize: Callable
    ddp: nn.Module | None = None
    distill: Any = None  # train/distill.py's DistillTargets (the batch's labels are their row numbers), or None

    @property
    def primary(self) -> str:
        """The weights scored every epoch: the EMA when there is one."""
        return "ema" if self.ema is not None else "raw"

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state_dicts(self) -> dict[str, Any]:
        """last.pt's weights and optimizer state (None for a part the recipe has not)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dicts(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None and state.get("swa"):
            self.swa.load_state_dict(state["swa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def _optimizer_and_schedule(cfg: Config, model: nn.Module, steps_per_epoch: int) -> tuple[Any, Any]:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    t = cfg.train
    lr = effective_lr(cfg)
    # Frozen parameters stay out of the optimizer (timm's factory skips requires_grad=False). Layer decay gives each
    # layer group an lr_scale that timm's scheduler applies.
    optimizer = create_optimizer_v2(
        model, t.optimizer, lr=lr, weight_decay=t.weight_decay, momentum=t.momentum,
        layer_decay=t.layer_decay or None,
    )
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=t.epochs * steps_per_epoch,
        lr_min=t.min_lr,
        warmup_t=int(t.warmup_epochs * steps_per_epoch),
        warmup_lr_init=lr * 0.01,
        t_in_epochs=False,
    )
    return optimizer, scheduler


@functools.cache
def _recording_mixup() -> type:
    from timm.data import Mixup

    class RecordingMixup(Mixup):
        """timm's Mixup (batch mode), remembering the last batch's ``lam`` so distillation mixes the teacher's
        targets with the same weight and partner (train/distill.py). Draws exactly what Mixup draws."""

        lam = 1.0

        def _mix_batch(self, x):  # noqa: ANN001, ANN202 - timm's signature
            self.lam = super()._mix_batch(x)
            return self.lam

    return RecordingMixup


def RecordingMixup(**kwargs: Any) -> Any:  # noqa: N802 - a class, built on first use (timm imports lazily)
    return _recording_mixup()(**kwargs)


def _augmentations(cfg: Config, n_classes: int, device: torch.device) -> tuple[Any, Any]:
    """timm's Mixup/CutMix and RandomErasing, each None when the recipe has it off."""
    mixup = erasing = None
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        mixup = RecordingMixup(
            mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
            switch_prob=cfg.aug.mixup_switch_prob, label_smoothing=cfg.train.label_smoothing, num_classes=n_classes,
        )
    if cfg.aug.re_prob > 0:  # on the normalised batch, as timm's prefetcher does
        from timm.data.random_erasing import RandomErasing

        erasing = RandomErasing(cfg.aug.re_prob, mode="pixel", device=device.type)
    return mixup, erasing


def build_fold(
    cfg: Config, n_classes: int, steps_per_epoch: int, device: torch.device, train_labels: np.ndarray | None = None,
    classes: list[str] | None = None,
) -> FoldParts:
    """Model, EMA, optimizer, scheduler, scaler and loss for one fold. ``steps_per_epoch`` counts optimizer updates
    (micro-batches / train.accum_steps); ``train_labels`` feed ``train.class_weights=balanced``."""
    from timm.utils import ModelEmaV3

    t = cfg.train
    model = create_model(cfg.model, n_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise CarclfError(f"train.grad_checkpointing: timm's {cfg.model.name} does not support it")
        model.set_grad_checkpointing(True)
    optimizer, scheduler = _optimizer_and_schedule(cfg, model, steps_per_epoch)
    classifier = {id(p) for p in model.get_classifier().parameters()}
    warm_frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in classifier]
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None
    dtype = amp_dtype(t.amp, device)
    mixup, erasing = _augmentations(cfg, n_classes, device)
    weights = class_weights_for(t.class_weights, classes or [str(i) for i in range(n_classes)],
                                np.asarray(train_labels if train_labels is not None else []))
    # Mixup's targets arrive smoothed already; hard labels are smoothed by the loss.
    criterion = ClassificationLoss(t.loss, t.focal_gamma, t.focal_weight, t.label_smoothing, weights).to(device)
    swa = None
    if t.swa_start_epoch:
        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(model)  # BatchNorm statistics are recomputed on the training data at the end
    return FoldParts(
        model=model, ema=ema, swa=swa, optimizer=optimizer, scheduler=scheduler,
        forward=torch.compile(model) if t.compile else model, warm_frozen=warm_frozen,
        scaler=grad_scaler(device, dtype), criterion=criterion, mixup=mixup, amp=dtype, erasing=erasing,
        normalize=batch_normalize(data_config_for(cfg)),
    )


@dataclass
class Fold:
    """One fold as set up for training: its photos, loaders, sizes and parts; on rank 0 it alone writes files.

    ``plan`` is the full-data fit's (train/full.py), None for a cross-validated fold; ``schedule`` maps an epoch to
    its progressive-resizing training size (empty: always ``size``); ``val_shard`` is this rank's share of the
    validation photos; ``saved`` is last.pt when the fold resumes."""

    cfg: Config
    k: int
    data: RunData
    rd: RunDir
    fp: FoldPaths
    device: torch.device
    rank: int
    world: int
    plan: dict | None
    n_epochs: int
    size: int
    schedule: dict[int, int]
    tr_idx: np.ndarray
    va_idx: np.ndarray
    train_ds: ImageDataset
    val_ds: ImageDataset
    bs: int
    pin: bool
    parts: FoldParts
    train_loader: DataLoader
    val_loader: DataLoader
    val_shard: DataLoader
    saved: dict | None = None

    @property
    def full(self) -> bool:
        """The full-data fit: every usable photo, no validation."""
        return self.fp.is_full

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def val_labels(self) -> np.ndarray:
        return self.data.labels[self.va_idx]

    def save_best(self, model: nn.Module, epoch: int, weights: str, val_log_loss: float) -> str:
        """Write ``model`` as best.pt; its SHA-256."""
        return write_best(self.fp.best, model.state_dict(), epoch=epoch, val_log_loss=val_log_loss, weights=weights,
                          config=self.cfg.to_dict(), classes=self.classes)


@dataclass
class Progress:
    """Where a fold's training stands; last.pt records it with the weights, and a resumed fold starts from it.
    ``best``: the best epoch so far (``val_log_loss``, ``epoch``, ``weights`` and best.pt's ``sha256``)."""

    best: dict
    start_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)  # dataset indices of photos that failed to decode
    since_best: int = 0  # epochs since the best one, for train.patience

    @classmethod
    def new(cls, primary: str) -> Progress:
        return cls(best={"val_log_loss": math.inf, "epoch": -1, "weights": primary})

    @classmethod
    def from_last(cls, state: dict, primary: str, epochs: int) -> Progress:
        """The progress last.pt recorded; an early-stopped fold goes straight to its end (``epochs``)."""
        best = state["best"]
        best.setdefault("weights", primary)  # a last.pt from before SWA
        start = epochs if state.get("stopped") else state["epoch"] + 1
        return cls(best=best, start_epoch=start, step=state["step"], history=state["history"], bad=state["bad"],
                   since_best=start - 1 - best["epoch"])

    def last_state(self, parts: FoldParts, epoch: int, cfg: Config, stopped: bool, plan: dict | None) -> dict:
        """last.pt's contents after ``epoch``."""
        return {**parts.state_dicts(), "epoch": epoch, "step": self.step, "best": self.best,
                "history": self.history, "bad": self.bad, "config": cfg.to_dict(), "stopped": stopped,
                **({"plan": plan} if plan else {})}
