"""Training: ``train(cfg)`` splits the data once, then trains each requested fold into ``runs/<name>/fold<k>/``.

A fold is flat, as in torchvision's reference: ``setup_fold`` -> ``resume_fold`` -> ``train_epoch`` +
``record_epoch`` per epoch -> ``finish_fold``, over a typed state (train/state.py); the weight averages and the
end-of-training choices are train/averaging.py's. Each epoch is a pure function of (state at its start, seed,
epoch), so ``--resume`` from ``last.pt`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carclf.artifacts.checkpoint import checked_best_sha256, read_last, write_last
from carclf.artifacts.metrics_csv import write_metrics
from carclf.artifacts.oof import write_fold_oof
from carclf.artifacts.run import RunDir, fold_name
from carclf.config import Config, config_diff, effective_lr, global_batch, parse_size_schedule
from carclf.data.dataset import ImageDataset, make_loader
from carclf.data.merges import MergeMap
from carclf.data.rundata import RunData, load_run_data
from carclf.data.splits import parse_folds
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform, train_transform
from carclf.errors import CarclfError
from carclf.io import atomic_write_text, file_sha256
from carclf.metrics import score, softmax
from carclf.models.factory import load_fold_model
from carclf.models.forward import infer_logits, infer_view_logits
from carclf.runtime import (
    amp_dtype,
    autocast,
    barrier,
    configure_backends,
    gather_objects,
    init_distributed,
    on_main,
    rank_world,
    seed_everything,
    select_device,
    versions,
)
from carclf.tracking import Tracker, read_run_id, write_run_id
from carclf.train.averaging import choose_eval_size, final_candidates, update_ema, update_swa
from carclf.train.distill import DistillLoss, DistillTargets, batch_targets
from carclf.train.full import finish_full, full_fit_plan
from carclf.train.state import Fold, FoldParts, Progress, build_fold
from carclf.train.teacher import Teacher, fold_distill_targets, load_teacher, record_teacher
from carclf.tta import parse_policy, policy_views

__all__ = ["build_fold", "check_startable", "set_epoch_switches", "train", "train_fold", "train_one_epoch"]

# Keys a resumed run may change; anything else must match the run it continues.
RESUMABLE_KEYS = {("train", "folds"), ("train", "device"), ("train", "threads"), ("predict", "batch_size")}


def check_startable(rd: RunDir, cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse an existing run directory unless asked to resume (same config) or overwrite (a folder carclf made,
    holding only what it wrote); changes nothing. ``--resume`` on a run that does not exist yet starts it, so that
    one process per fold can be launched at once."""
    if resume and overwrite:
        raise CarclfError("--resume and --overwrite contradict each other: choose one")
    if not rd.exists_nonempty():
        return
    if not rd.is_run():  # a folder of the user's: neither --resume nor --overwrite may touch it
        raise rd.not_a_run()
    rd.check_format()  # a newer carclf's run: neither continued nor deleted by this one
    if overwrite:
        rd.clear(protect=[Path(cfg.data.root)], dry_run=True)
        return
    if not resume:
        raise CarclfError(
            f"run directory '{rd.path}' already exists: pass --resume to continue it, --overwrite to replace it, "
            "or choose another name=..."
        )
    if not rd.is_run() or not rd.config_path.is_file():
        raise CarclfError(
            f"--resume: '{rd.path}' is not a carclf run directory (no marker, no config.yaml): choose another name=..."
        )
    diffs = config_diff(rd.read_config().to_dict(), cfg.to_dict(), RESUMABLE_KEYS)
    if diffs:
        raise CarclfError(
            f"--resume: the config differs from the one '{rd.path}' was started with: {'; '.join(diffs)}. "
            "Resume with the same recipe and overrides, or start a new run name."
        )


def record_run_data(rd: RunDir, cfg: Config, data: RunData, resume: bool, teacher: Teacher | None = None) -> None:
    """Write run.json, folds.csv and skipped.csv (with the run lock held); on resume, refuse data that no longer
    matches the run."""
    meta = {
        "classes": data.merge.classes,
        "merge": data.merge.to_dict(),
        "data_root": str(Path(cfg.data.root).resolve()),
        "folds_file": str(data.folds_file.resolve()),
        "fold_policy": cfg.data.fold_policy,
        "n_images": len(data.trainset),
        "excluded": len(data.bad),
        "dropped_classes": data.merge.dropped,
        "lr_effective": effective_lr(cfg),
        "versions": versions(),
        **({"distill": teacher.info} if teacher is not None else {}),
    }
    if rd.meta_path.is_file():
        old = rd.read_meta()
        if "distill" in meta and "nested" in old.get("distill", {}):  # folds started by earlier calls
            meta["distill"]["nested"] = {**old["distill"]["nested"], **meta["distill"]["nested"]}
        same_folds = rd.folds_csv.is_file() and rd.folds_csv.read_bytes() == data.folds_file.read_bytes()
        # Through MergeMap, so a run.json written before a field was added still compares equal.
        old_merge = MergeMap.from_dict(old["merge"]).to_dict() if "merge" in old else None
        if old.get("classes") != meta["classes"] or old_merge != meta["merge"] or not same_folds:
            raise CarclfError(
                f"--resume: the data under '{cfg.data.root}' changed since '{rd.path}' started (photos, classes, "
                "merges or duplicate groups differ, so the folds would too). Start a new run name to train on it."
            )
    rd.write_meta(meta)
    rd.copy_folds(data.folds_file)
    rd.update_skipped(data.bad)


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the folds ``cfg.train.folds`` into ``runs/<name>/``; return the run directory.

    Several processes may train different folds of one run at once (``train.folds=k --resume`` each); a fold is
    locked while it trains. Launched by ``torchrun``, the processes train each fold together (DistributedDataParallel);
    rank 0 alone writes the run directory."""
    if not cfg.data.root:
        raise CarclfError("data.root is not set: pass data.root=PATH/TO/DATA (the folder holding train/)")
    device = select_device(cfg.train.device)
    info = init_distributed(device)
    if not info.is_main:
        log = _quiet
    rd = RunDir(cfg.run_dir)

    def start() -> tuple[RunData, Teacher | None]:
        check_startable(rd, cfg, resume, overwrite)  # before the slow data checks
        data = load_run_data(cfg, log)  # bad data fails here, before the run directory is created or emptied
        teacher = load_teacher(cfg, data, rd, log, resume)  # a bad teacher too; its targets are fixed before epoch 1
        with rd.run_lock():
            check_startable(rd, cfg, resume, overwrite)  # again: another process may have created it meanwhile
            if overwrite and rd.exists_nonempty():
                rd.clear(protect=[Path(cfg.data.root)])
                log(f"--overwrite: deleted the earlier run in '{rd.path}'")
            _log_removed(rd.remove_stale_temps(), log)  # the run lock is held: no live writer of those files
            rd.create(cfg)
            record_teacher(teacher, rd, data.classes)  # first: it refuses targets another process fixed otherwise
            record_run_data(rd, cfg, data, resume, teacher)
        return data, teacher

    data, teacher = on_main(start)
    for line in data.skipped_lines(rd.skipped_csv):  # the first 10, then "... and N more"
        log(line)
    for k in parse_folds(cfg.train.folds, cfg.data.n_folds, cfg.data.outer_fold):
        with contextlib.ExitStack() as held:

            def claim(k: int = k, held: contextlib.ExitStack = held) -> bool:
                held.enter_context(rd.fold_lock(k))  # on rank 0; released when the fold ends
                _log_removed(rd.remove_stale_temps(k), log)  # the fold lock is held: no live writer of those files
                return rd.fold(k).complete

            if on_main(claim):
                log(f"{fold_name(k)}: already complete, skipping")
                continue
            with start_tracker(cfg, rd, k, log, enabled=info.is_main) as tracker:
                summary = train_fold(cfg, k, data, rd, on_epoch_end=on_epoch_end, log=log, device=device,
                                     tracker=tracker, teacher=teacher)
                fp = rd.fold(k)
                tracker.log_metrics({key: v for key, v in summary.items() if key.startswith("oof_")},
                                    step=cfg.train.epochs)
                tracker.log_artifacts([rd.config_path, fp.metrics, fp.summary, rd.skipped_csv])
                tracker.log_curves(fp.metrics)
    barrier()
    return rd.path


def _log_removed(removed: list[Path], log: Callable[[str], None]) -> None:
    if removed:
        log(f"removed {len(removed)} temp file(s) an interrupted write left behind: "
            + ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))


def start_tracker(cfg: Config, rd: RunDir, k: int, log: Callable[[str], None], enabled: bool = True) -> Tracker:
    """The fold's MLflow run (``track.*``): a resumed fold continues the run it started. A tracking server that
    cannot be reached is one warning and no tracking, never a lost training run."""
    fp = rd.fold(k)
    tracker = Tracker.start(
        enabled=enabled and cfg.track.enabled, uri=cfg.track.uri, experiment=cfg.track.experiment,
        out_dir=rd.path.parent, run_name=f"{cfg.name}/{fp.dir.name}", params=cfg.to_dict(),
        run_id=read_run_id(fp.mlflow_run), tags={"carclf.run_dir": str(rd.path.resolve()), "carclf.fold": fp.dir.name},
        log=log,
    )
    if tracker.run_id:
        fp.dir.mkdir(parents=True, exist_ok=True)
        write_run_id(fp.mlflow_run, tracker.run_id)
    return tracker


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the group."""


def _prepare_batch(parts: FoldParts, cfg: Config, x: torch.Tensor, y: torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on ``device``: normalised, randomly erased, in the run's memory format, mixed. Distilling,
    ``y`` holds row numbers and the batch's targets come back as train/distill.py's DistillBatch."""
    rows = y  # distilling: the batch's rows of the target table, indexed on the CPU (no device sync per step)
    x = parts.normalize(x.to(device, non_blocking=True))
    if parts.erasing is not None:
        x = parts.erasing(x)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if parts.distill is not None:
        if parts.mixup is not None:
            if len(x) % 2:
                x, rows = x[:-1], rows[:-1]
            x, _ = parts.mixup(x, parts.distill.hard[rows].to(device, non_blocking=True))  # mixes x, records lam
        return x, batch_targets(parts.distill, rows, parts.criterion.base, parts.mixup, device)
    y = y.to(device, non_blocking=True)
    if parts.mixup is not None:
        if len(x) % 2:  # timm's Mixup pairs samples and needs an even batch
            x, y = x[:-1], y[:-1]
        x, y = parts.mixup(x, y)
    return x, y


def _optimizer_update(parts: FoldParts, cfg: Config, step: int) -> int:
    """Optimizer update number ``step`` from the summed gradients, then the schedule and the EMA; 1 when fp16 loss
    scaling skipped it (its gradients held inf/NaN), else 0."""
    scaler, skipped = parts.scaler, 0
    if scaler is not None:
        scaler.unscale_(parts.optimizer)
    if cfg.train.grad_clip > 0:
        nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip)
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(parts.optimizer)  # skipped inside when the scaled gradients hold inf/NaN
        scaler.update()
        skipped = int(scaler.get_scale() < scale)  # the scale drops exactly when the update was skipped
    else:
        parts.optimizer.step()
    parts.scheduler.step_update(step)
    update_ema(parts, step)
    return skipped


def train_one_epoch(
    parts: FoldParts, loader: DataLoader, cfg: Config, device: torch.device, step: int, epoch: int, desc: str
) -> dict:
    """One pass over ``loader``. Returns the mean loss, the optimizer update count after it, the indices that failed
    to decode, the micro-batches whose loss was non-finite (fp16 only), seconds, and seconds spent waiting for data.

    With ``train.accum_steps`` = A, gradients of A micro-batches are summed (each loss divided by the group's size)
    before one optimizer update; the scheduler and the EMA count updates. With fp16 loss scaling a non-finite loss is
    GradScaler's to handle (it skips the update and lowers the scale); in fp32 and bf16 it means training diverged,
    and stops with the epoch and step."""
    from tqdm.auto import tqdm

    accum, n_batches = cfg.train.accum_steps, len(loader)
    parts.model.train()
    total, count, bad, skipped = 0.0, 0, [], 0
    wait = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=None)
    for batch_i, (x, y, idx, ok) in enumerate(bar):
        wait += time.perf_counter() - tick
        bad.extend(idx[~ok].tolist())
        group_start = batch_i - batch_i % accum
        group_size = min(accum, n_batches - group_start)  # the epoch's last group may be shorter
        x, y = _prepare_batch(parts, cfg, x, y, device)
        last_of_group = batch_i == group_start + group_size - 1
        # Under DDP, gradients are all-reduced only on a group's last micro-batch.
        sync = contextlib.nullcontext() if last_of_group or parts.ddp is None else parts.ddp.no_sync()
        with sync:
            with autocast(device, parts.amp):
                loss = parts.criterion(parts.forward(x), y)
            finite = bool(torch.isfinite(loss))
            if not finite and parts.scaler is None:
                raise CarclfError(
                    f"training diverged: loss {loss.item()} in epoch {epoch + 1}, step {batch_i + 1} of {n_batches} "
                    f"(update {step + 1} of the fold): lower train.lr, raise train.warmup_epochs, or set "
                    "train.grad_clip"
                )
            if batch_i == group_start:
                parts.optimizer.zero_grad(set_to_none=True)
            part = loss / group_size
            if parts.scaler is not None:
                parts.scaler.scale(part).backward()
            else:
                part.backward()
        if last_of_group:  # the group is complete: one optimizer update
            step += 1
            skipped += _optimizer_update(parts, cfg, step)
        if finite:
            total += loss.item() * len(x)
            count += len(x)
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", refresh=False)
        tick = time.perf_counter()
    return {"loss": total / count if count else math.nan, "count": count, "step": step, "bad": bad,
            "skipped": skipped, "seconds": time.perf_counter() - start, "wait": wait}


def set_epoch_switches(parts: FoldParts, cfg: Config, epoch: int) -> dict:
    """What changes with the epoch: Mixup/CutMix off from ``aug.mixup_off_epoch``, the backbone frozen for the first
    ``train.freeze_epochs`` (only the classifier learns; BatchNorm statistics still adapt). A function of the epoch
    alone, so a resumed run sets the same switches."""
    mixup_on = parts.mixup is not None and not (cfg.aug.mixup_off_epoch and epoch >= cfg.aug.mixup_off_epoch)
    if parts.mixup is not None:
        parts.mixup.mixup_enabled = mixup_on
    frozen = epoch < cfg.train.freeze_epochs
    for p in parts.warm_frozen:
        p.requires_grad_(not frozen)
    return {"mixup": int(mixup_on), "backbone_frozen": int(frozen)}


def train_fold(
    cfg: Config,
    k: int,
    data: RunData,
    rd: RunDir,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = print,
    device: torch.device | None = None,
    tracker: Tracker | None = None,
    teacher: Teacher | None = None,
) -> dict:
    """Train fold ``k``; write metrics.csv, best.pt, last.pt and oof.npz into the run's ``fold<k>/``: set up, resume
    from last.pt (if there is one), train the epochs, then choose and write the fold's final model and OOF logits.

    Distributed (torchrun): each rank trains on its share of every batch (``data.batch_size`` per process), the
    validation logits are gathered so every rank sees the same figures (and stops early together), and rank 0 alone
    writes files and, at the end, scores the final candidates and writes the out-of-fold logits."""
    fold = setup_fold(cfg, k, data, rd, device or select_device(cfg.train.device), log, teacher)
    progress = resume_fold(fold, log)
    for epoch in range(progress.start_epoch, fold.n_epochs):
        row = train_epoch(fold, progress, epoch)
        improved, stop = record_epoch(fold, progress, row)
        log(_epoch_line(fold, row, improved))
        if tracker is not None:
            tracker.log_metrics(row, step=epoch)
        if on_epoch_end is not None:
            on_epoch_end(k, epoch, row)
        if stop:
            log(f"fold {k}: no better val log loss for {cfg.train.patience} epochs, stopping early")
            break
    progress.bad = sorted({i for part in gather_objects(progress.bad) for i in part})
    barrier()  # every rank has finished training before rank 0 alone scores and writes
    return on_main(lambda: finish_fold(fold, progress, log))


def _datasets(cfg: Config, data: RunData, tr_idx: np.ndarray, va_idx: np.ndarray,
              distill: DistillTargets | None = None,
              unlabeled: list[Path] = ()) -> tuple[ImageDataset, ImageDataset, int, dict[int, int]]:
    """The fold's training and validation photos, the training size and its progressive-resizing schedule.
    Distilling, the unlabeled photos follow the labeled ones and a photo's label is its row in ``distill``."""
    dcfg = data_config_for(cfg)
    size = dcfg["input_size"][1]
    paths, labels = np.array(data.trainset.paths, dtype=object), data.labels
    train_paths, train_labels = list(paths[tr_idx]), labels[tr_idx]
    if distill is not None:
        train_paths += list(unlabeled)
        train_labels = np.arange(len(train_paths))  # substitution for a bad photo then keeps image and targets paired
    train_ds = ImageDataset(
        train_paths, train_labels, train_transform(dcfg, cfg.aug), size, cfg.data.draft_factor, substitute=True,
        max_pixels=cfg.data.max_pixels,
    )
    val_ds = ImageDataset(
        paths[va_idx], labels[va_idx], eval_transform(dcfg), size, cfg.data.draft_factor,
        max_pixels=cfg.data.max_pixels,
    )
    schedule = parse_size_schedule(cfg.aug.size_schedule, size, cfg.train.epochs)
    for s_ in set(schedule.values()):  # progressive resizing: one training transform per size
        train_ds.transforms[s_] = train_transform(data_config_for(cfg, s_), cfg.aug)
    return train_ds, val_ds, size, schedule


def _distribute(parts: FoldParts, cfg: Config, device: torch.device) -> None:
    """Wrap the model in DistributedDataParallel (under torchrun), with SyncBatchNorm when asked."""
    from torch.nn.parallel import DistributedDataParallel

    t = cfg.train
    if t.sync_bn:
        if device.type != "cuda":
            raise CarclfError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
        parts.model = nn.SyncBatchNorm.convert_sync_batchnorm(parts.model)  # same parameters
    parts.ddp = DistributedDataParallel(
        parts.model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=t.freeze_epochs > 0,  # the warm start leaves the backbone without gradients
    )
    parts.forward = torch.compile(parts.ddp) if t.compile else parts.ddp


def setup_fold(cfg: Config, k: int, data: RunData, rd: RunDir, device: torch.device,
               log: Callable[[str], None], teacher: Teacher | None = None) -> Fold:
    """Photos, loaders and parts of fold ``k``, with last.pt read when the fold resumes; distilling, the teacher's
    targets of its photos (and its unlabeled photos, predicted by the teacher's fold-k models)."""
    t = cfg.train
    rank, world = rank_world()
    configure_backends(device, t.tf32, t.cudnn_benchmark)
    if t.threads:
        torch.set_num_threads(t.threads)
    fp = rd.fold(k)
    fp.dir.mkdir(parents=True, exist_ok=True)
    tr_idx, va_idx = data.split(k)
    if len(tr_idx) == 0 or (len(va_idx) == 0 and not fp.is_full):
        raise CarclfError(f"fold {k} has no training or no validation images after skipping unreadable ones")
    saved = read_last(fp.last, device) if fp.last.is_file() else None  # resuming
    plan = None
    if fp.is_full:  # the full-data fit: every usable photo, no validation (train/full.py); resumed: the same plan
        plan = (saved or {}).get("plan") or full_fit_plan(rd, cfg, log)
    distill, unlabeled = (None, []) if teacher is None else on_main(
        lambda: fold_distill_targets(teacher, cfg, rd, k, data, tr_idx, log))
    train_ds, val_ds, size, schedule = _datasets(cfg, data, tr_idx, va_idx, distill, unlabeled)
    per_rank = -(-len(train_ds) // world)
    bs = min(cfg.data.batch_size, per_rank)
    batches = per_rank // bs if per_rank > bs else 1
    seed_everything(t.seed * 1000 + k)
    parts = build_fold(cfg, len(data.classes), math.ceil(batches / t.accum_steps), device, data.labels[tr_idx],
                       data.classes)
    if distill is not None:
        parts.distill, parts.criterion = distill, DistillLoss(parts.criterion, distill.temperature)
    if world > 1:
        _distribute(parts, cfg, device)
    pin = device.type == "cuda"
    # One loader each for the fold, workers kept across epochs; the sampler seeds every photo from (seed, epoch).
    train_loader = make_loader(train_ds, bs, cfg.data.num_workers, shuffle=True, seed=t.seed * 1009 + k,
                               pin_memory=pin, drop_last=per_rank > bs, rank=rank, world_size=world)
    val_loader = make_loader(val_ds, cfg.predict.batch_size, cfg.data.num_workers, pin_memory=pin)
    # Per-epoch validation: each rank scores its share, the logits are gathered.
    val_shard = val_loader if world == 1 else make_loader(
        val_ds, cfg.predict.batch_size, cfg.data.num_workers, pin_memory=pin, rank=rank, world_size=world)
    return Fold(cfg=cfg, k=k, data=data, rd=rd, fp=fp, device=device, rank=rank, world=world, plan=plan,
                n_epochs=plan["epochs"] if plan else t.epochs, size=size, schedule=schedule, tr_idx=tr_idx,
                va_idx=va_idx, train_ds=train_ds, val_ds=val_ds, bs=bs, pin=pin, parts=parts,
                train_loader=train_loader, val_loader=val_loader, val_shard=val_shard, saved=saved)


def resume_fold(fold: Fold, log: Callable[[str], None]) -> Progress:
    """Where the fold starts: from scratch, or where last.pt left it (weights, optimizer, schedule, averages)."""
    cfg, parts, t = fold.cfg, fold.parts, fold.cfg.train
    progress = Progress.new(parts.primary)
    if fold.saved is not None:
        parts.load_state_dicts(fold.saved)
        progress = Progress.from_last(fold.saved, parts.primary, t.epochs)
        log(f"{fold_name(fold.k)}: resuming after epoch {fold.saved['epoch'] + 1}")
        fold.saved = None  # loaded: its tensors need not stay in memory while training
    lr_note = "" if not t.lr_base_size else (
        f" = train.lr {t.lr:g} x {t.lr_base_scale} scaling to global batch {global_batch(cfg)} from {t.lr_base_size}"
    )
    log(
        f"{fold_name(fold.k)}: {len(fold.tr_idx)} train / {len(fold.va_idx)} val images, {len(fold.classes)} "
        f"classes, {cfg.model.name} @ {fold.size}px on {fold.device}, lr {effective_lr(cfg):g}{lr_note}"
        + (f", batch {fold.bs} x {t.accum_steps} accumulated = {fold.bs * t.accum_steps}" if t.accum_steps > 1 else "")
        + (f", EMA decay {t.ema_decay:g}" + (" after timm's warm-up" if t.ema_warmup else "") if t.ema else "")
    )
    return progress


def _validate(fold: Fold, bad: list[int]) -> dict[str, float]:
    """The per-epoch validation figures of the weights scored every epoch (NaN for the full-data fit, which has no
    validation photos: the folds chose its epochs and weights); photos that failed to decode are added to ``bad``."""
    if fold.full:
        return {"log_loss": math.nan, "accuracy": math.nan, "top5": math.nan}
    parts = fold.parts
    logits, order, ok = _gather_logits(infer_logits(
        parts.eval_model(), fold.val_shard, fold.device, parts.normalize, amp=parts.amp,
        channels_last=fold.cfg.train.channels_last,
    ))
    bad.extend(int(fold.va_idx[i]) for i in order[~ok])
    return score(softmax(logits[ok]), fold.val_labels[order[ok]])


def train_epoch(fold: Fold, progress: Progress, epoch: int) -> dict:
    """Train and validate ``epoch``; its metrics.csv row. Seeded from (seed, fold, epoch, rank) alone, so a resumed
    fold draws the same Mixup, erasing and dropout."""
    cfg, parts, t, k, loader = fold.cfg, fold.parts, fold.cfg.train, fold.k, fold.train_loader
    seed_everything(t.seed * 1_000_003 + k * 1009 + epoch + fold.rank * 7919)  # Mixup, erasing, dropout here
    loader.sampler.set_epoch(epoch)
    schedule = fold.schedule
    epoch_size = schedule[max(e for e in schedule if e <= epoch)] if schedule else fold.size
    loader.sampler.set_size(epoch_size if schedule else 0)
    switches = set_epoch_switches(parts, cfg, epoch)
    out = train_one_epoch(parts, loader, cfg, fold.device, progress.step, epoch,
                          desc=f"{fold_name(k)} epoch {epoch + 1}/{t.epochs}")
    progress.step = step = out["step"]
    update_swa(parts, t.swa_start_epoch, epoch)
    # (distilling, rows past the labeled photos are unlabeled ones: not training photos, not in skipped.csv)
    progress.bad.extend(int(fold.tr_idx[i]) for i in out["bad"] if i < len(fold.tr_idx))
    s = _validate(fold, progress.bad)
    if fold.world > 1:
        out = _reduce_epoch(out)
    return {
        "epoch": epoch, "step": step, "train_loss": out["loss"], "val_log_loss": s["log_loss"],
        "val_accuracy": s["accuracy"], "val_top5": s["top5"],
        "lr": max(g["lr"] for g in parts.optimizer.param_groups),  # the head's, with layer decay
        "ema_decay": parts.ema.get_decay(step) if parts.ema is not None else math.nan,
        "skipped_steps": out["skipped"], **switches, "train_size": epoch_size,
        "images_per_s": len(loader) * fold.bs * fold.world / out["seconds"],
        "data_wait": out["wait"] / out["seconds"], "seconds": out["seconds"], "weights": parts.primary,
    }


def record_epoch(fold: Fold, progress: Progress, row: dict) -> tuple[bool, bool]:
    """Add the epoch's ``row`` to the history; on rank 0 write best.pt (when it improved), metrics.csv and last.pt.
    Whether it improved, and whether ``train.patience`` stops the fold after it."""
    parts, t, epoch, val_log_loss = fold.parts, fold.cfg.train, row["epoch"], row["val_log_loss"]
    progress.history.append(row)
    improved = val_log_loss < progress.best["val_log_loss"]
    if improved:
        progress.best = {"val_log_loss": val_log_loss, "epoch": epoch, "weights": parts.primary}
        progress.since_best = 0
        if fold.rank == 0:
            progress.best["sha256"] = fold.save_best(parts.eval_model(), epoch, parts.primary, val_log_loss)
    else:
        progress.since_best += 1
    stop = bool(t.patience) and progress.since_best >= t.patience
    if fold.rank == 0:
        write_metrics(fold.fp.metrics, progress.history)
        write_last(fold.fp.last, progress.last_state(parts, epoch, fold.cfg, stop, fold.plan))
    return improved, stop


def _epoch_line(fold: Fold, row: dict, improved: bool) -> str:
    return (
        f"{fold_name(fold.k)} epoch {row['epoch'] + 1}/{fold.n_epochs}: loss {row['train_loss']:.4f}  "
        + ("" if fold.full else f"val log loss {row['val_log_loss']:.4f}  acc {row['val_accuracy']:.3f}  "
           f"top5 {row['val_top5']:.3f}  ")
        + f"{row['images_per_s']:.1f} img/s"
        + (f"  EMA decay {row['ema_decay']:.4f}" if fold.parts.ema is not None else "")
        + (f"  {row['skipped_steps']} fp16 step(s) skipped" if row["skipped_steps"] else "")
        + ("  *" if improved else "")
    )


def finish_fold(fold: Fold, progress: Progress, log: Callable[[str], None]) -> dict:
    """On rank 0, after the last epoch: the final best.pt (the best epoch, or a better final candidate), metrics.csv
    with the chosen row marked, the input size to predict at, then summary.json and oof.npz; returns the summary."""
    cfg, t, fp = fold.cfg, fold.cfg.train, fold.fp
    # Rank 0 alone: SWA's BatchNorm pass reads every training photo, not rank 0's share.
    bn_loader = fold.train_loader if fold.world == 1 else make_loader(
        fold.train_ds, fold.bs, cfg.data.num_workers, shuffle=True, seed=t.seed * 1009 + fold.k, pin_memory=fold.pin)
    history = progress.history
    if fold.full:
        return finish_full(fold, history, bn_loader, log)
    best = final_candidates(fold, bn_loader, history, progress.best, log)
    best["sha256"] = checked_best_sha256(fp, best)  # before anything reads it again
    primary = fold.parts.primary
    for row in history:
        row["chosen"] = "*" if (row["epoch"], row.get("weights", primary)) == (best["epoch"], best["weights"]) else ""
    write_metrics(fp.metrics, history)
    if progress.bad:
        log(f"{fold_name(fold.k)}: {len(progress.bad)} photo(s) failed to decode during training (see skipped.csv)")
        paths = fold.data.trainset.paths
        fold.rd.update_skipped({str(paths[i]): "failed to decode during training" for i in progress.bad})
    eval_size, size_scores, loader = choose_eval_size(fold, log)
    return write_oof(fold, loader, best, eval_size, size_scores)


def _gather_logits(part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank's (logits, dataset indices, ok) of a sharded loader, merged by index (padding repeats dropped)."""
    parts = gather_objects(part)
    if len(parts) == 1:
        return part
    logits, order, ok = (np.concatenate(x) for x in zip(*parts, strict=True))
    _, first = np.unique(order, return_index=True)
    return logits[first], order[first], ok[first]


def _reduce_epoch(out: dict) -> dict:
    """One epoch's figures over all ranks: the loss averaged over every photo, failures and skips summed."""
    parts = gather_objects({key: out[key] for key in ("loss", "count", "skipped")})
    counted = [p for p in parts if p["count"]]
    loss = sum(p["loss"] * p["count"] for p in counted) / sum(p["count"] for p in counted) if counted else math.nan
    return {**out, "loss": loss, "skipped": sum(p["skipped"] for p in parts)}


def write_oof(fold: Fold, val_loader: DataLoader, best: dict, eval_size: int = 0,
              size_scores: dict[int, float] | None = None) -> dict:
    """Out-of-fold logits of the best checkpoint, with the same TTA the Predictor uses, into oof.npz.

    Besides the model's labels it keeps each photo's path and its original (pre-merge) label, so evaluation can
    score in the submission's columns too; the logits of every view in ``predict.oof_views`` (float16,
    ``view_logits`` with names in ``views``), so the ensemble step can measure TTA policies on out-of-fold photos;
    and (``predict.oof_features``) the penultimate features of the first view, for the report's embedding map."""
    cfg, fp, data, device = fold.cfg, fold.fp, fold.data, fold.device
    model = load_fold_model(cfg, fp.best, len(data.classes), device)
    policy = policy_views(cfg.predict)
    views = list(dict.fromkeys(policy + parse_policy(cfg.predict.oof_views)))
    view_logits, order, ok, feats = infer_view_logits(
        model, val_loader, device, batch_normalize(data_config_for(cfg, eval_size)), views,
        amp=amp_dtype(cfg.train.amp, device), channels_last=cfg.train.channels_last,
        features=cfg.predict.oof_features,
    )
    by_index = np.argsort(order)  # loader order -> dataset order (the loader does not shuffle; stay safe anyway)
    keep = by_index[ok[by_index]]
    view_logits = view_logits[:, keep]
    logits = view_logits[[views.index(v) for v in policy]].mean(0)
    idx = np.asarray(fold.va_idx)[order[keep]]
    labels = data.labels[idx]
    rel = np.array(data.trainset.relpaths(), dtype=object)[idx]
    s = score(softmax(logits), labels)
    summary = {"fold": fp.k, "best_epoch": best["epoch"], "best_weights": best.get("weights"), "eval_size": eval_size,
               "eval_size_log_loss": {str(k): v for k, v in (size_scores or {}).items()}, "tta": policy,
               "oof_views": views, "lr_effective": effective_lr(cfg), "versions": versions(),
               # what the model trained on, as recorded (a nested run's left-out fold is never among them)
               "n_train": len(fold.tr_idx), "train_folds": sorted({int(f) for f in data.folds[fold.tr_idx]}),
               **{f"oof_{m}": v for m, v in s.items()}, "best_sha256": best.get("sha256") or file_sha256(fp.best)}
    atomic_write_text(fp.summary, json.dumps(summary, indent=1))
    extra = {"features": feats[keep].astype(np.float16)} if feats is not None else {}
    write_fold_oof(  # last: its presence marks the fold complete
        fp, indices=idx, labels=labels, logits=logits.astype(np.float32),
        original_labels=np.asarray(data.trainset.labels)[idx], paths=rel.astype(str),
        view_logits=view_logits.astype(np.float16), views=np.array(views), **extra,
    )
    return summary

