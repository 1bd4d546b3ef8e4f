"""Weight averages and what a fold's training chooses at its end: the EMA update, the SWA average (with its
BatchNorm pass), the final candidates scored beside the best epoch, and the input size to predict at."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from carclf.config import parse_sizes
from carclf.data.dataset import ImageDataset, make_loader
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform
from carclf.metrics import score, softmax
from carclf.models.factory import load_fold_model
from carclf.models.forward import infer_logits
from carclf.runtime import amp_dtype, seed_everything
from carclf.train.state import Fold, FoldParts
from carclf.tta import policy_views


def update_ema(parts: FoldParts, step: int) -> None:
    """After optimizer update ``step``: the EMA follows the weights (timm's warm-up counts updates)."""
    if parts.ema is not None:
        parts.ema.update(parts.model, step=step)


def update_swa(parts: FoldParts, swa_start_epoch: int, epoch: int) -> None:
    """After ``epoch``: the SWA average takes in the weights from ``train.swa_start_epoch`` on."""
    if parts.swa is not None and epoch >= swa_start_epoch:
        parts.swa.update_parameters(parts.model)


def has_swa(parts: FoldParts) -> bool:
    return parts.swa is not None and int(parts.swa.n_averaged) > 0


def swa_model(fold: Fold, train_loader: DataLoader) -> nn.Module:
    """The SWA average with its BatchNorm statistics recomputed on one more augmented pass over the training photos
    (at the size it is scored and predicted at)."""
    from torch.optim.swa_utils import update_bn

    cfg, parts, device = fold.cfg, fold.parts, fold.device
    train_loader.sampler.set_epoch(cfg.train.epochs)  # one more augmented pass, seeded like an epoch
    train_loader.sampler.set_size(0)  # at the size SWA is scored and predicted at, resumed or not
    seed_everything(cfg.train.seed * 1_000_003 + fold.fp.k * 1009 + cfg.train.epochs)
    cl = cfg.train.channels_last

    def inputs():
        for x, *_ in train_loader:
            x = parts.normalize(x.to(device, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last) if cl else x

    with torch.no_grad():
        update_bn(inputs(), parts.swa.module)
    return parts.swa.module


def final_candidates(fold: Fold, train_loader: DataLoader, history: list[dict], best: dict,
                     log: Callable[[str], None]) -> dict:
    """Score the weights beside the per-epoch ones once training ends: the raw weights (when the epochs were scored
    with the EMA) and the SWA average (BatchNorm statistics recomputed on the training photos). Whichever has the
    lowest validation log loss, the best epoch's weights included, becomes ``best.pt``; each gets a row in
    metrics.csv (``weights``) and the chosen one is marked (``chosen``)."""
    parts, cfg, fp = fold.parts, fold.cfg, fold.fp
    last_epoch = history[-1]["epoch"] if history else -1
    candidates = []
    if parts.ema is not None:
        candidates.append(("raw", parts.model))
    if has_swa(parts):
        candidates.append(("swa", swa_model(fold, train_loader)))
    for name, model in candidates:
        logits, order, ok = infer_logits(model, fold.val_loader, fold.device, parts.normalize, amp=parts.amp,
                                         channels_last=cfg.train.channels_last)
        s = score(softmax(logits[ok]), fold.val_labels[order[ok]])
        history.append({"epoch": last_epoch, "step": history[-1]["step"] if history else 0, "val_log_loss":
                        s["log_loss"], "val_accuracy": s["accuracy"], "val_top5": s["top5"], "weights": name})
        better = s["log_loss"] < best["val_log_loss"]
        log(f"fold {fp.k}: {name} weights after the last epoch: val log loss {s['log_loss']:.4f}  acc "
            f"{s['accuracy']:.3f}" + ("  * (best)" if better else ""))
        if better:
            best = {"val_log_loss": s["log_loss"], "epoch": last_epoch, "weights": name}
            best["sha256"] = fold.save_best(model, last_epoch, name, s["log_loss"])
    return best


def choose_eval_size(fold: Fold, log: Callable[[str], None]) -> tuple[int, dict[int, float], DataLoader]:
    """Score ``best.pt`` on the validation fold at the training size and at every ``predict.eval_sizes`` (with the
    Predictor's TTA); return the size with the lowest log loss, every size's log loss, and a loader at that size.
    Networks trained on random crops often do better on larger photos (the train/test resolution discrepancy)."""
    cfg, size, device = fold.cfg, fold.size, fold.device
    sizes = [size] + [s for s in parse_sizes(cfg.predict.eval_sizes) if s != size]
    if len(sizes) == 1:
        return size, {}, fold.val_loader
    model = load_fold_model(cfg, fold.fp.best, len(fold.classes), device)
    scores: dict[int, float] = {}
    loaders: dict[int, DataLoader] = {}
    val_ds, val_labels = fold.val_ds, fold.val_labels
    for s in sizes:
        dcfg = data_config_for(cfg, s)
        ds = ImageDataset(val_ds.sources, val_ds.labels, eval_transform(dcfg), s, cfg.data.draft_factor,
                          max_pixels=cfg.data.max_pixels)
        loaders[s] = fold.val_loader if s == size else make_loader(ds, cfg.predict.batch_size, cfg.data.num_workers)
        logits, order, ok = infer_logits(
            model, loaders[s], device, batch_normalize(dcfg), policy_views(cfg.predict),
            amp=amp_dtype(cfg.train.amp, device), channels_last=cfg.train.channels_last,
        )
        scores[s] = score(softmax(logits[ok]), val_labels[order[ok]])["log_loss"]
    chosen = min(scores, key=scores.get)
    log(f"fold {fold.fp.k}: validation log loss by input size: "
        + ", ".join(f"{s}px {v:.4f}" + (" *" if s == chosen else "") for s, v in scores.items()))
    return chosen, scores, loaders[chosen]


def full_fit_weights(fold: Fold, train_loader: DataLoader, weights: str) -> tuple[str, nn.Module]:
    """The full-data fit's final weights of the kind the folds chose (SWA, EMA), or the raw ones when this fit has
    none of that kind."""
    parts = fold.parts
    if weights == "swa" and has_swa(parts):
        return weights, swa_model(fold, train_loader)
    if weights == "ema" and parts.ema is not None:
        return weights, parts.ema.module
    return "raw", parts.model

