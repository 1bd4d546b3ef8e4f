"""Training: ``train(cfg)`` splits the data once, then trains each requested fold into ``runs/<name>/fold<k>/``.

Each epoch is a pure function of (state at its start, seed, epoch), so ``--resume`` from ``last.pt`` reproduces
an uninterrupted run exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carclf.analyze.metrics import score, softmax
from carclf.config import Config, read_config, save_config
from carclf.data.dataset import ImageDataset
from carclf.data.merges import MergeMap, build_merge_map, identity, read_merges
from carclf.data.scan import TrainSet, scan_train
from carclf.data.splits import check_fold_counts, load_or_make_folds, parse_folds
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform, train_transform
from carclf.errors import CarclfError
from carclf.infer.engine import infer_logits
from carclf.io import atomic_savez, atomic_torch_save, atomic_write_text
from carclf.models.factory import create_model, load_fold_model
from carclf.train.runtime import amp_dtype, autocast, seed_everything, select_device

METRIC_FIELDS = [
    "epoch", "train_loss", "val_log_loss", "val_accuracy", "val_top5", "lr", "images_per_s", "data_wait", "seconds",
]
# Keys a resumed run may change; anything else must match the run it continues.
RESUMABLE_KEYS = {("train", "folds"), ("train", "device"), ("train", "threads"), ("predict", "batch_size")}


def prepare_dir(cfg: Config) -> Path:
    """Data-level artefacts (manifest, duplicate groups, folds) shared by every run on the same data."""
    return Path(cfg.out_dir) / "prepare" / Path(cfg.data.root).resolve().name


def _config_diff(a: dict, b: dict, prefix: tuple = ()) -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, (*prefix, key))
        elif va != vb and (*prefix, key) not in RESUMABLE_KEYS:
            diffs.append(f"{'.'.join((*prefix, key))}: {va!r} -> {vb!r}")
    return diffs


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse an existing run directory unless asked to resume (same config) or overwrite; changes nothing."""
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            return
        if not resume:
            raise CarclfError(
                f"run directory '{run_dir}' already exists: pass --resume to continue it, --overwrite to replace it, "
                "or choose another name=..."
            )
        diffs = _config_diff(read_config(run_dir / "config.yaml").to_dict(), cfg.to_dict())
        if diffs:
            raise CarclfError(
                f"--resume: the config differs from the one '{run_dir}' was started with: {'; '.join(diffs)}. "
                "Resume with the same recipe and overrides, or start a new run name."
            )
    elif resume:
        raise CarclfError(f"--resume: '{run_dir}' does not exist yet; run without --resume to start it")


def open_run_dir(cfg: Config, overwrite: bool) -> Path:
    """Create (or, with ``overwrite``, empty) the run directory and write the resolved config into it."""
    run_dir = cfg.run_dir
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def usable_mask(trainset: TrainSet, bad: dict[str, str]) -> np.ndarray:
    """True for the photos training may use (not quarantined, not a left-out copy or conflict)."""
    return np.array([str(p) not in bad for p in trainset.paths], dtype=bool)


@dataclass
class RunData:
    """Everything a fold needs to know about the data, computed once per ``train`` call."""

    trainset: TrainSet
    folds: np.ndarray
    merge: MergeMap
    folds_file: Path
    bad: dict[str, str] = field(default_factory=dict)  # path -> reason for photos left out of training

    @property
    def classes(self) -> list[str]:
        """The model's classes (merged groups count once)."""
        return self.merge.classes

    @property
    def labels(self) -> np.ndarray:
        return self.merge.label_map[np.asarray(self.trainset.labels)]

    def usable(self) -> np.ndarray:
        return usable_mask(self.trainset, self.bad)

    def split(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        good = self.usable()
        return np.where(good & (self.folds != k))[0], np.where(good & (self.folds == k))[0]


def merge_map_for(cfg: Config, trainset: TrainSet) -> MergeMap:
    spec = cfg.data.merges
    if spec == "auto":
        auto = Path(cfg.data.root) / "merges.yaml"
        spec = str(auto) if auto.is_file() else ""
    if not spec:
        return identity(trainset.classes)
    counts = np.bincount(np.asarray(trainset.labels), minlength=len(trainset.classes))
    return build_merge_map(trainset.classes, read_merges(spec), cfg.data.merge_split, counts, source=spec)


def run_prepare(cfg: Config, log: Callable[[str], None] = print):
    """The data-health step with the run's policies (incremental: unchanged files are not read again)."""
    from carclf.data.prepare import prepare

    return prepare(
        cfg.data.root, prepare_dir(cfg),
        near_threshold=None if cfg.data.near_threshold < 0 else cfg.data.near_threshold,
        within_class=cfg.data.within_class, cross_class=cfg.data.cross_class, max_pixels=cfg.data.max_pixels,
        log=log,
    )


def load_run_data(cfg: Config, log: Callable[[str], None] = print) -> RunData:
    """Scan, prepare (bad files, duplicates), merge classes and split into folds; writes only the prepare dir."""
    trainset = scan_train(cfg.data.root)
    merge = merge_map_for(cfg, trainset)
    pdir = prepare_dir(cfg)
    prepared = run_prepare(cfg, log)
    keys = ["train/" + r for r in trainset.relpaths()]
    bad = {
        str(p): prepared.excluded[key] for p, key in zip(trainset.paths, keys, strict=True) if key in prepared.excluded
    }
    groups = [prepared.group_of[key] for key in keys] if cfg.data.fold_policy == "group" else None
    # Count what training can use, per model class (after merges): copies and bad files do not help a fold.
    usable = usable_mask(trainset, bad)
    labels = merge.label_map[np.asarray(trainset.labels)]
    per_class_units = labels[usable] if groups is None else labels[usable][
        np.unique(np.asarray(groups)[usable], return_index=True)[1]
    ]
    check_fold_counts(merge.classes, per_class_units.tolist(), cfg.data.n_folds, counted="usable photos")
    folds, folds_file = load_or_make_folds(trainset, cfg.data.n_folds, cfg.data.fold_seed, pdir, groups)
    return RunData(trainset, folds, merge, folds_file, bad)


def record_run_data(run_dir: Path, cfg: Config, data: RunData, resume: bool) -> None:
    """Write run.json, folds.csv and skipped.csv; on resume, refuse data that no longer matches the run."""
    meta = {
        "classes": data.merge.classes,
        "merge": data.merge.to_dict(),
        "data_root": str(Path(cfg.data.root).resolve()),
        "folds_file": str(data.folds_file.resolve()),
        "fold_policy": cfg.data.fold_policy,
        "n_images": len(data.trainset),
        "excluded": len(data.bad),
    }
    if resume and (run_dir / "run.json").is_file():
        old = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        same_folds = (run_dir / "folds.csv").is_file() and (run_dir / "folds.csv").read_bytes() == \
            data.folds_file.read_bytes()
        if old.get("classes") != meta["classes"] or old.get("merge") != meta["merge"] or not same_folds:
            raise CarclfError(
                f"--resume: the data under '{cfg.data.root}' changed since '{run_dir}' started (photos, classes, "
                "merges or duplicate groups differ, so the folds would too). Start a new run name to train on it."
            )
    atomic_write_text(run_dir / "run.json", json.dumps(meta, ensure_ascii=False, indent=1))
    shutil.copyfile(data.folds_file, run_dir / "folds.csv")
    update_skipped(run_dir / "skipped.csv", data.bad)


def update_skipped(path: Path, new: dict[str, str]) -> None:
    """Add rows to ``skipped.csv`` (path, reason), keeping what earlier folds or runs recorded."""
    rows: dict[str, str] = {}
    if path.is_file():
        with path.open(encoding="utf-8", newline="") as fh:
            rows = {r["path"]: r["reason"] for r in csv.DictReader(fh)}
    rows.update(new)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    for p, reason in sorted(rows.items()):
        w.writerow([p, reason])
    atomic_write_text(path, buf.getvalue())


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the folds ``cfg.train.folds`` into ``runs/<name>/``; return the run directory."""
    if not cfg.data.root:
        raise CarclfError("data.root is not set: pass data.root=PATH/TO/DATA (the folder holding train/)")
    check_run_dir(cfg, resume, overwrite)
    data = load_run_data(cfg, log)  # bad data fails here, before the run directory is created or emptied
    run_dir = open_run_dir(cfg, overwrite)
    record_run_data(run_dir, cfg, data, resume)
    if data.bad:
        log(f"leaving {len(data.bad)} photo(s) out of training (bad files, duplicates, label conflicts), "
            f"listed in {run_dir / 'skipped.csv'}:")
        for p, reason in list(data.bad.items())[:10]:
            log(f"  {p}: {reason}")
    for k in parse_folds(cfg.train.folds, cfg.data.n_folds):
        fold_dir = run_dir / f"fold{k}"
        if (fold_dir / "oof.npz").is_file():
            log(f"fold {k}: already complete, skipping")
            continue
        train_fold(cfg, k, data, fold_dir, on_epoch_end=on_epoch_end, log=log)
    return run_dir


def _loader(ds: ImageDataset, cfg: Config, shuffle: bool, seed: int, batch_size: int | None = None) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    workers = cfg.data.num_workers
    on_cpu = select_device(cfg.train.device).type == "cpu"
    return DataLoader(
        ds,
        batch_size=batch_size or cfg.data.batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(ds) > (batch_size or cfg.data.batch_size),
        num_workers=workers,
        pin_memory=not on_cpu,
        generator=gen,
        # Workers are re-created each epoch and seeded from `gen`, so augmentation is reproducible on resume.
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def build_fold(cfg: Config, n_classes: int, steps_per_epoch: int, device: torch.device) -> dict:
    """Model, EMA, optimizer, scheduler, scaler and loss for one fold."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    t = cfg.train
    model = create_model(cfg.model, n_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = t.lr * cfg.data.batch_size / 32
    # Frozen parameters stay out of the optimizer (timm's factory skips requires_grad=False).
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=t.weight_decay)
    total = t.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=t.min_lr,
        warmup_t=int(t.warmup_epochs * steps_per_epoch),
        warmup_lr_init=lr * 0.01,
        t_in_epochs=False,
    )
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema else None
    dtype = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, label_smoothing=t.label_smoothing,
            num_classes=n_classes,
        )
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        mixup = None
        criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    erasing = None
    if cfg.aug.re_prob > 0:  # on the normalised batch, as timm's prefetcher does
        from timm.data.random_erasing import RandomErasing

        erasing = RandomErasing(cfg.aug.re_prob, mode="pixel", device=device.type)
    return {
        "model": model, "ema": ema, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
        "criterion": criterion, "mixup": mixup, "amp": dtype, "erasing": erasing,
        "normalize": batch_normalize(data_config_for(cfg)),
    }


def _eval_model(parts: dict) -> nn.Module:
    return parts["ema"].module if parts["ema"] is not None else parts["model"]


def train_one_epoch(parts: dict, loader: DataLoader, cfg: Config, device: torch.device, step: int, desc: str):
    """One pass over ``loader``; returns (mean loss, updates done, bad indices, seconds, seconds waiting for data)."""
    from tqdm.auto import tqdm

    model, optimizer, scheduler = parts["model"], parts["optimizer"], parts["scheduler"]
    ema, scaler, criterion, mixup = parts["ema"], parts["scaler"], parts["criterion"], parts["mixup"]
    cl = cfg.train.channels_last
    model.train()
    total, count, bad = 0.0, 0, []
    wait = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=None)
    for x, y, idx, ok in bar:
        wait += time.perf_counter() - tick
        bad.extend(idx[~ok].tolist())
        x, y = parts["normalize"](x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        if parts["erasing"] is not None:
            x = parts["erasing"](x)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            if len(x) % 2:  # timm's Mixup pairs samples and needs an even batch
                x, y = x[:-1], y[:-1]
            x, y = mixup(x, y)
        with autocast(device, parts["amp"]):
            loss = criterion(model(x), y)
        if not torch.isfinite(loss):
            raise CarclfError(f"training diverged (loss {loss.item()}) at update {step}: lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        scheduler.step_update(step)
        if ema is not None:
            ema.update(model, step=step)
        total += loss.item() * len(x)
        count += len(x)
        bar.set_postfix(loss=f"{total / count:.3f}", refresh=False)
        tick = time.perf_counter()
    return total / max(count, 1), step, bad, time.perf_counter() - start, wait


def _state(parts: dict, epoch: int, step: int, best: dict, history: list, bad: list, cfg: Config) -> dict:
    return {
        "model": parts["model"].state_dict(),
        "ema": parts["ema"].state_dict() if parts["ema"] is not None else None,
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": parts["scheduler"].state_dict(),
        "scaler": parts["scaler"].state_dict() if parts["scaler"] is not None else None,
        "epoch": epoch,
        "step": step,
        "best": best,
        "history": history,
        "bad": bad,
        "config": cfg.to_dict(),
    }


def _write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def train_fold(
    cfg: Config,
    k: int,
    data: RunData,
    fold_dir: Path,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train fold ``k``; write metrics.csv, best.pt, last.pt and oof.npz into ``fold_dir``."""
    t = cfg.train
    device = select_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    fold_dir.mkdir(parents=True, exist_ok=True)
    ts = data.trainset
    tr_idx, va_idx = data.split(k)
    classes = data.classes
    if len(va_idx) == 0 or len(tr_idx) == 0:
        raise CarclfError(f"fold {k} has no training or no validation images after skipping unreadable ones")
    dcfg = data_config_for(cfg)
    size = dcfg["input_size"][-1]
    paths, labels = np.array(ts.paths, dtype=object), data.labels
    train_ds = ImageDataset(
        paths[tr_idx], labels[tr_idx], train_transform(dcfg, cfg.aug), size, cfg.data.draft_factor, substitute=True,
        max_pixels=cfg.data.max_pixels,
    )
    val_ds = ImageDataset(
        paths[va_idx], labels[va_idx], eval_transform(dcfg), size, cfg.data.draft_factor,
        max_pixels=cfg.data.max_pixels,
    )
    bs = min(cfg.data.batch_size, len(train_ds))
    steps = len(train_ds) // bs if len(train_ds) > bs else 1
    seed_everything(t.seed * 1000 + k)
    parts = build_fold(cfg, len(classes), steps, device)
    cl = t.channels_last
    start_epoch, step, history, bad = 0, 0, [], []
    best = {"val_log_loss": math.inf, "epoch": -1}
    last = fold_dir / "last.pt"
    if last.is_file():
        state = torch.load(last, map_location=device, weights_only=False)
        parts["model"].load_state_dict(state["model"])
        if parts["ema"] is not None:
            parts["ema"].load_state_dict(state["ema"])
        parts["optimizer"].load_state_dict(state["optimizer"])
        parts["scheduler"].load_state_dict(state["scheduler"])
        if parts["scaler"] is not None and state["scaler"]:
            parts["scaler"].load_state_dict(state["scaler"])
        start_epoch, step, best, history, bad = (
            state["epoch"] + 1, state["step"], state["best"], state["history"], state["bad"]
        )
        if state.get("stopped"):  # early-stopped before the interruption: go straight to the OOF logits
            start_epoch = t.epochs
        log(f"fold {k}: resuming after epoch {state['epoch']}")
    log(
        f"fold {k}: {len(tr_idx)} train / {len(va_idx)} val images, {len(classes)} classes, "
        f"{cfg.model.name} @ {size}px on {device}"
    )
    since_best = start_epoch - 1 - best["epoch"]
    val_labels = labels[va_idx]
    for epoch in range(start_epoch, t.epochs):
        epoch_seed = t.seed * 1_000_003 + k * 1009 + epoch
        seed_everything(epoch_seed)
        loader = _loader(train_ds, cfg, shuffle=True, seed=epoch_seed, batch_size=bs)
        loss, step, new_bad, secs, wait = train_one_epoch(
            parts, loader, cfg, device, step, desc=f"fold {k} epoch {epoch + 1}/{t.epochs}"
        )
        bad.extend(int(tr_idx[i]) for i in new_bad)
        logits, order, ok = infer_logits(
            _eval_model(parts), _loader(val_ds, cfg, False, 0, cfg.predict.batch_size), device, parts["normalize"],
            amp=parts["amp"], channels_last=cl,
        )
        bad.extend(int(va_idx[i]) for i in order[~ok])
        s = score(softmax(logits[ok]), val_labels[order[ok]])
        row = {
            "epoch": epoch, "train_loss": loss, "val_log_loss": s["log_loss"], "val_accuracy": s["accuracy"],
            "val_top5": s["top5"], "lr": parts["optimizer"].param_groups[0]["lr"],
            "images_per_s": len(loader) * bs / secs, "data_wait": wait / secs, "seconds": secs,
        }
        history.append(row)
        improved = s["log_loss"] < best["val_log_loss"]
        if improved:
            best = {"val_log_loss": s["log_loss"], "epoch": epoch}
            since_best = 0
            atomic_torch_save(
                {"model": _eval_model(parts).state_dict(), "epoch": epoch, "config": cfg.to_dict(),
                 "classes": classes, "val_log_loss": s["log_loss"]},
                fold_dir / "best.pt",
            )
        else:
            since_best += 1
        stop = bool(t.patience) and since_best >= t.patience
        _write_metrics(fold_dir / "metrics.csv", history)
        atomic_torch_save({**_state(parts, epoch, step, best, history, bad, cfg), "stopped": stop}, last)
        log(
            f"fold {k} epoch {epoch + 1}/{t.epochs}: loss {loss:.4f}  val log loss {s['log_loss']:.4f}  "
            f"acc {s['accuracy']:.3f}  top5 {s['top5']:.3f}  {row['images_per_s']:.1f} img/s"
            + ("  *" if improved else "")
        )
        if on_epoch_end is not None:
            on_epoch_end(k, epoch, row)
        if stop:
            log(f"fold {k}: no better val log loss for {t.patience} epochs, stopping early")
            break
    if bad:
        log(f"fold {k}: {len(set(bad))} photo(s) failed to decode during training (see skipped.csv)")
        update_skipped(fold_dir.parent / "skipped.csv",
                       {str(ts.paths[i]): "failed to decode during training" for i in set(bad)})
    return write_oof(cfg, k, fold_dir, val_ds, va_idx, data, device, best)


def write_oof(
    cfg: Config, k: int, fold_dir: Path, val_ds: ImageDataset, va_idx: np.ndarray, data: RunData,
    device: torch.device, best: dict,
) -> dict:
    """Out-of-fold logits of the best checkpoint, with the same TTA the Predictor uses, into oof.npz.

    Besides the model's labels it keeps each photo's path and its original (pre-merge) label, so evaluation can
    score in the submission's columns too."""
    model = load_fold_model(cfg, fold_dir / "best.pt", len(data.classes), device)
    logits, order, ok = infer_logits(
        model, _loader(val_ds, cfg, False, 0, cfg.predict.batch_size), device, batch_normalize(data_config_for(cfg)),
        tta_hflip=cfg.predict.tta_hflip, amp=amp_dtype(cfg.train.amp, device), channels_last=cfg.train.channels_last,
    )
    by_index = np.argsort(order)  # loader order -> dataset order (the loader does not shuffle; stay safe anyway)
    logits, ok = logits[by_index][ok[by_index]], ok[by_index]
    idx = np.asarray(va_idx)[ok]
    labels = data.labels[idx]
    rel = np.array(data.trainset.relpaths(), dtype=object)[idx]
    atomic_savez(
        fold_dir / "oof.npz", indices=idx, labels=labels, logits=logits.astype(np.float32),
        original_labels=np.asarray(data.trainset.labels)[idx], paths=rel.astype(str),
    )
    s = score(softmax(logits), labels)
    summary = {"fold": k, "best_epoch": best["epoch"], **{f"oof_{m}": v for m, v in s.items()}}
    atomic_write_text(fold_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
