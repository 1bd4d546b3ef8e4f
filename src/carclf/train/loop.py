"""Training: ``train(cfg)`` splits the data once, then trains each requested fold into ``runs/<name>/fold<k>/``.

Each epoch is a pure function of (state at its start, seed, epoch), so ``--resume`` from ``last.pt`` reproduces
an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carclf.artifacts.oof import write_fold_oof
from carclf.artifacts.run import FoldPaths, RunDir, fold_name
from carclf.config import Config, effective_lr, global_batch, parse_size_schedule, parse_sizes
from carclf.data.dataset import ImageDataset, make_loader
from carclf.data.merges import MergeMap
from carclf.data.rundata import RunData, load_run_data
from carclf.data.splits import parse_folds
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform, train_transform
from carclf.errors import CarclfError
from carclf.io import atomic_torch_save, atomic_write_text, file_sha256
from carclf.metrics import score, softmax
from carclf.models.factory import create_model, load_fold_model
from carclf.models.forward import infer_logits, infer_view_logits
from carclf.runtime import (
    amp_dtype,
    autocast,
    barrier,
    configure_backends,
    gather_objects,
    grad_scaler,
    init_distributed,
    on_main,
    rank_world,
    seed_everything,
    select_device,
    versions,
)
from carclf.tracking import Tracker, read_run_id, write_run_id
from carclf.train.full import full_fit_plan
from carclf.train.losses import ClassificationLoss, class_weights_for
from carclf.tta import parse_policy, policy_views

METRIC_FIELDS = [
    "epoch", "step", "train_loss", "val_log_loss", "val_accuracy", "val_top5", "lr", "ema_decay", "skipped_steps",
    "mixup", "backbone_frozen", "train_size", "images_per_s", "data_wait", "seconds", "weights", "chosen",
]
# Keys a resumed run may change; anything else must match the run it continues.
RESUMABLE_KEYS = {("train", "folds"), ("train", "device"), ("train", "threads"), ("predict", "batch_size")}


def _config_diff(a: dict, b: dict, prefix: tuple = ()) -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, (*prefix, key))
        elif va != vb and (*prefix, key) not in RESUMABLE_KEYS:
            diffs.append(f"{'.'.join((*prefix, key))}: {va!r} -> {vb!r}")
    return diffs


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
    diffs = _config_diff(rd.read_config().to_dict(), cfg.to_dict())
    if diffs:
        raise CarclfError(
            f"--resume: the config differs from the one '{rd.path}' was started with: {'; '.join(diffs)}. "
            "Resume with the same recipe and overrides, or start a new run name."
        )


def record_run_data(rd: RunDir, cfg: Config, data: RunData, resume: bool) -> None:
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
    }
    if rd.meta_path.is_file():
        old = rd.read_meta()
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

    def start() -> RunData:
        check_startable(rd, cfg, resume, overwrite)  # before the slow data checks
        data = load_run_data(cfg, log)  # bad data fails here, before the run directory is created or emptied
        with rd.run_lock():
            check_startable(rd, cfg, resume, overwrite)  # again: another process may have created it meanwhile
            if overwrite and rd.exists_nonempty():
                rd.clear(protect=[Path(cfg.data.root)])
                log(f"--overwrite: deleted the earlier run in '{rd.path}'")
            _log_removed(rd.remove_stale_temps(), log)  # the run lock is held: no live writer of those files
            rd.create(cfg)
            record_run_data(rd, cfg, data, resume)
        return data

    data = on_main(start)
    for line in data.skipped_lines(rd.skipped_csv):  # the first 10, then "... and N more"
        log(line)
    for k in parse_folds(cfg.train.folds, cfg.data.n_folds):
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
                                     tracker=tracker)
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


def save_best(model: nn.Module, meta: dict, cfg: Config, classes: list[str], fp: FoldPaths) -> str:
    """Write ``best.pt`` (the weights and ``meta``); return its SHA-256, recorded in last.pt's ``best`` and, once the
    fold is done, in summary.json, so that a damaged or replaced best.pt is refused wherever it is loaded."""
    atomic_torch_save({"model": model.state_dict(), **meta, "config": cfg.to_dict(), "classes": classes}, fp.best)
    return file_sha256(fp.best)


def checked_best_sha256(fp: FoldPaths, best: dict) -> str:
    """``best.pt``'s SHA-256, refused when it is not the hash recorded when the file was written (a resumed fold's
    best.pt damaged while the run was stopped); a last.pt from before hashes were recorded is taken as it is."""
    return fp.check_best(best.get("sha256") or None, fp.last.name)


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


def build_fold(
    cfg: Config, n_classes: int, steps_per_epoch: int, device: torch.device, train_labels: np.ndarray | None = None,
    classes: list[str] | None = None,
) -> dict:
    """Model, EMA, optimizer, scheduler, scaler and loss for one fold. ``steps_per_epoch`` counts optimizer updates
    (micro-batches / train.accum_steps); ``train_labels`` feed ``train.class_weights=balanced``."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    t = cfg.train
    model = create_model(cfg.model, n_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise CarclfError(f"train.grad_checkpointing: timm's {cfg.model.name} does not support it")
        model.set_grad_checkpointing(True)
    lr = effective_lr(cfg)
    # Frozen parameters stay out of the optimizer (timm's factory skips requires_grad=False). Layer decay gives each
    # layer group an lr_scale that timm's scheduler applies.
    optimizer = create_optimizer_v2(
        model, t.optimizer, lr=lr, weight_decay=t.weight_decay, momentum=t.momentum,
        layer_decay=t.layer_decay or None,
    )
    classifier = {id(p) for p in model.get_classifier().parameters()}
    warm_frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in classifier]
    total = t.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=t.min_lr,
        warmup_t=int(t.warmup_epochs * steps_per_epoch),
        warmup_lr_init=lr * 0.01,
        t_in_epochs=False,
    )
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None
    dtype = amp_dtype(t.amp, device)
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
            switch_prob=cfg.aug.mixup_switch_prob, label_smoothing=t.label_smoothing, num_classes=n_classes,
        )
    else:
        mixup = None
    weights = class_weights_for(t.class_weights, classes or [str(i) for i in range(n_classes)],
                                np.asarray(train_labels if train_labels is not None else []))
    # Mixup's targets arrive smoothed already; hard labels are smoothed by the loss.
    criterion = ClassificationLoss(t.loss, t.focal_gamma, t.focal_weight, t.label_smoothing, weights).to(device)
    erasing = None
    if cfg.aug.re_prob > 0:  # on the normalised batch, as timm's prefetcher does
        from timm.data.random_erasing import RandomErasing

        erasing = RandomErasing(cfg.aug.re_prob, mode="pixel", device=device.type)
    swa = None
    if t.swa_start_epoch:
        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(model)  # BatchNorm statistics are recomputed on the training data at the end
    return {
        "model": model, "ema": ema, "swa": swa, "optimizer": optimizer, "scheduler": scheduler,
        "forward": torch.compile(model) if t.compile else model, "warm_frozen": warm_frozen,
        "scaler": grad_scaler(device, dtype), "criterion": criterion, "mixup": mixup, "amp": dtype, "erasing": erasing,
        "normalize": batch_normalize(data_config_for(cfg)),
    }


def _eval_model(parts: dict) -> nn.Module:
    return parts["ema"].module if parts["ema"] is not None else parts["model"]


def train_one_epoch(
    parts: dict, loader: DataLoader, cfg: Config, device: torch.device, step: int, epoch: int, desc: str
) -> dict:
    """One pass over ``loader``. Returns the mean loss, the optimizer update count after it, the indices that failed
    to decode, the micro-batches whose loss was non-finite (fp16 only), seconds, and seconds spent waiting for data.

    With ``train.accum_steps`` = A, gradients of A micro-batches are summed (each loss divided by the group's size)
    before one optimizer update; the scheduler and the EMA count updates. With fp16 loss scaling a non-finite loss is
    GradScaler's to handle (it skips the update and lowers the scale); in fp32 and bf16 it means training diverged,
    and stops with the epoch and step."""
    from tqdm.auto import tqdm

    model, optimizer, scheduler, forward = parts["model"], parts["optimizer"], parts["scheduler"], parts["forward"]
    ema, scaler, criterion, mixup = parts["ema"], parts["scaler"], parts["criterion"], parts["mixup"]
    cl = cfg.train.channels_last
    accum, n_batches = cfg.train.accum_steps, len(loader)
    model.train()
    total, count, bad, skipped = 0.0, 0, [], 0
    wait = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=None)
    for batch_i, (x, y, idx, ok) in enumerate(bar):
        wait += time.perf_counter() - tick
        bad.extend(idx[~ok].tolist())
        group_start = batch_i - batch_i % accum
        group_size = min(accum, n_batches - group_start)  # the epoch's last group may be shorter
        x, y = parts["normalize"](x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        if parts["erasing"] is not None:
            x = parts["erasing"](x)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            if len(x) % 2:  # timm's Mixup pairs samples and needs an even batch
                x, y = x[:-1], y[:-1]
            x, y = mixup(x, y)
        last_of_group = batch_i == group_start + group_size - 1
        # Under DDP, gradients are all-reduced only on a group's last micro-batch.
        sync = contextlib.nullcontext() if last_of_group or "ddp" not in parts else parts["ddp"].no_sync()
        with sync:
            with autocast(device, parts["amp"]):
                loss = criterion(forward(x), y)
            finite = bool(torch.isfinite(loss))
            if not finite and scaler is None:
                raise CarclfError(
                    f"training diverged: loss {loss.item()} in epoch {epoch + 1}, step {batch_i + 1} of {n_batches} "
                    f"(update {step + 1} of the fold): lower train.lr, raise train.warmup_epochs, or set "
                    "train.grad_clip"
                )
            if batch_i == group_start:
                optimizer.zero_grad(set_to_none=True)
            part = loss / group_size
            if scaler is not None:
                scaler.scale(part).backward()
            else:
                part.backward()
        if last_of_group:  # the group is complete: one optimizer update
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped inside when the scaled gradients hold inf/NaN
                scaler.update()
                skipped += int(scaler.get_scale() < scale)  # the scale drops exactly when the update was skipped
            else:
                optimizer.step()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
        if finite:
            total += loss.item() * len(x)
            count += len(x)
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", refresh=False)
        tick = time.perf_counter()
    return {"loss": total / count if count else math.nan, "count": count, "step": step, "bad": bad,
            "skipped": skipped, "seconds": time.perf_counter() - start, "wait": wait}


def set_epoch_switches(parts: dict, cfg: Config, epoch: int) -> dict:
    """What changes with the epoch: Mixup/CutMix off from ``aug.mixup_off_epoch``, the backbone frozen for the first
    ``train.freeze_epochs`` (only the classifier learns; BatchNorm statistics still adapt). A function of the epoch
    alone, so a resumed run sets the same switches."""
    mixup_on = parts["mixup"] is not None and not (cfg.aug.mixup_off_epoch and epoch >= cfg.aug.mixup_off_epoch)
    if parts["mixup"] is not None:
        parts["mixup"].mixup_enabled = mixup_on
    frozen = epoch < cfg.train.freeze_epochs
    for p in parts["warm_frozen"]:
        p.requires_grad_(not frozen)
    return {"mixup": int(mixup_on), "backbone_frozen": int(frozen)}


def _state(parts: dict, epoch: int, step: int, best: dict, history: list, bad: list, cfg: Config) -> dict:
    return {
        "model": parts["model"].state_dict(),
        "ema": parts["ema"].state_dict() if parts["ema"] is not None else None,
        "swa": parts["swa"].state_dict() if parts["swa"] is not None else None,
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
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _load_state(path: Path, device: torch.device) -> dict:
    """``last.pt`` with ``weights_only=True``: tensors and plain containers only, so opening a run directory from
    elsewhere cannot run code from it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary; all mean "not a checkpoint carclf wrote"
        raise CarclfError(
            f"cannot resume from '{path}': {type(exc).__name__}: {exc}. It is damaged or was not written by carclf; "
            "move it away to restart this fold from scratch."
        ) from exc


def train_fold(
    cfg: Config,
    k: int,
    data: RunData,
    rd: RunDir,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = print,
    device: torch.device | None = None,
    tracker: Tracker | None = None,
) -> dict:
    """Train fold ``k``; write metrics.csv, best.pt, last.pt and oof.npz into the run's ``fold<k>/``.

    Distributed (torchrun): each rank trains on its share of every batch (``data.batch_size`` per process), the
    validation logits are gathered so every rank sees the same figures (and stops early together), and rank 0 alone
    writes files and, at the end, scores the final candidates and writes the out-of-fold logits."""
    t = cfg.train
    device = device or select_device(t.device)
    rank, world = rank_world()
    configure_backends(device, t.tf32, t.cudnn_benchmark)
    if t.threads:
        torch.set_num_threads(t.threads)
    fp = rd.fold(k)
    full = fp.is_full  # the full-data fit: every usable photo, no validation (train/full.py)
    fp.dir.mkdir(parents=True, exist_ok=True)
    ts = data.trainset
    tr_idx, va_idx = data.split(k)
    classes = data.classes
    if len(tr_idx) == 0 or (len(va_idx) == 0 and not full):
        raise CarclfError(f"fold {k} has no training or no validation images after skipping unreadable ones")
    state = _load_state(fp.last, device) if fp.last.is_file() else None  # resuming
    plan = None
    if full:
        plan = (state or {}).get("plan") or full_fit_plan(rd, cfg, log)  # resumed: the same plan
    n_epochs = plan["epochs"] if full else t.epochs
    dcfg = data_config_for(cfg)
    size = dcfg["input_size"][1]
    paths, labels = np.array(ts.paths, dtype=object), data.labels
    train_ds = ImageDataset(
        paths[tr_idx], labels[tr_idx], train_transform(dcfg, cfg.aug), size, cfg.data.draft_factor, substitute=True,
        max_pixels=cfg.data.max_pixels,
    )
    val_ds = ImageDataset(
        paths[va_idx], labels[va_idx], eval_transform(dcfg), size, cfg.data.draft_factor,
        max_pixels=cfg.data.max_pixels,
    )
    schedule = parse_size_schedule(cfg.aug.size_schedule, size, t.epochs)
    for s_ in set(schedule.values()):  # progressive resizing: one training transform per size
        train_ds.transforms[s_] = train_transform(data_config_for(cfg, s_), cfg.aug)
    per_rank = -(-len(train_ds) // world)
    bs = min(cfg.data.batch_size, per_rank)
    batches = per_rank // bs if per_rank > bs else 1
    steps = math.ceil(batches / t.accum_steps)  # optimizer updates per epoch
    seed_everything(t.seed * 1000 + k)
    parts = build_fold(cfg, len(classes), steps, device, labels[tr_idx], classes)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if t.sync_bn:
            if device.type != "cuda":
                raise CarclfError("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
            parts["model"] = nn.SyncBatchNorm.convert_sync_batchnorm(parts["model"])  # same parameters
        ddp = DistributedDataParallel(
            parts["model"], device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t.freeze_epochs > 0,  # the warm start leaves the backbone without gradients
        )
        parts["ddp"] = ddp
        parts["forward"] = torch.compile(ddp) if t.compile else ddp
    pin = device.type == "cuda"
    # One loader each for the fold, workers kept across epochs; the sampler seeds every photo from (seed, epoch).
    train_loader = make_loader(train_ds, bs, cfg.data.num_workers, shuffle=True, seed=t.seed * 1009 + k,
                               pin_memory=pin, drop_last=per_rank > bs, rank=rank, world_size=world)
    val_loader = make_loader(val_ds, cfg.predict.batch_size, cfg.data.num_workers, pin_memory=pin)
    # Per-epoch validation: each rank scores its share, the logits are gathered.
    val_shard = val_loader if world == 1 else make_loader(
        val_ds, cfg.predict.batch_size, cfg.data.num_workers, pin_memory=pin, rank=rank, world_size=world)
    start_epoch, step, history, bad = 0, 0, [], []
    primary = "ema" if parts["ema"] is not None else "raw"
    best = {"val_log_loss": math.inf, "epoch": -1, "weights": primary}
    if state is not None:
        parts["model"].load_state_dict(state["model"])
        if parts["ema"] is not None:
            parts["ema"].load_state_dict(state["ema"])
        if parts["swa"] is not None and state.get("swa"):
            parts["swa"].load_state_dict(state["swa"])
        parts["optimizer"].load_state_dict(state["optimizer"])
        parts["scheduler"].load_state_dict(state["scheduler"])
        if parts["scaler"] is not None and state["scaler"]:
            parts["scaler"].load_state_dict(state["scaler"])
        start_epoch, step, best, history, bad = (
            state["epoch"] + 1, state["step"], state["best"], state["history"], state["bad"]
        )
        best.setdefault("weights", primary)  # a last.pt from before SWA
        if state.get("stopped"):  # early-stopped before the interruption: go straight to the OOF logits
            start_epoch = t.epochs
        log(f"{fold_name(k)}: resuming after epoch {state['epoch'] + 1}")
    lr_note = "" if not t.lr_base_size else (
        f" = train.lr {t.lr:g} x {t.lr_base_scale} scaling to global batch {global_batch(cfg)} from {t.lr_base_size}"
    )
    log(
        f"{fold_name(k)}: {len(tr_idx)} train / {len(va_idx)} val images, {len(classes)} classes, "
        f"{cfg.model.name} @ {size}px on {device}, lr {effective_lr(cfg):g}{lr_note}"
        + (f", batch {bs} x {t.accum_steps} accumulated = {bs * t.accum_steps}" if t.accum_steps > 1 else "")
        + (f", EMA decay {t.ema_decay:g}" + (" after timm's warm-up" if t.ema_warmup else "") if t.ema else "")
    )
    since_best = start_epoch - 1 - best["epoch"]
    val_labels = labels[va_idx]
    for epoch in range(start_epoch, n_epochs):
        seed_everything(t.seed * 1_000_003 + k * 1009 + epoch + rank * 7919)  # Mixup, erasing, dropout here
        train_loader.sampler.set_epoch(epoch)
        epoch_size = schedule[max(e for e in schedule if e <= epoch)] if schedule else size
        train_loader.sampler.set_size(epoch_size if schedule else 0)
        switches = set_epoch_switches(parts, cfg, epoch)
        out = train_one_epoch(
            parts, train_loader, cfg, device, step, epoch, desc=f"{fold_name(k)} epoch {epoch + 1}/{t.epochs}"
        )
        step = out["step"]
        if parts["swa"] is not None and epoch >= t.swa_start_epoch:
            parts["swa"].update_parameters(parts["model"])
        bad.extend(int(tr_idx[i]) for i in out["bad"])
        if full:  # nothing to validate on: the folds chose the epochs and the weights
            s = {"log_loss": math.nan, "accuracy": math.nan, "top5": math.nan}
        else:
            logits, order, ok = _gather_logits(infer_logits(
                _eval_model(parts), val_shard, device, parts["normalize"], amp=parts["amp"],
                channels_last=t.channels_last,
            ))
            bad.extend(int(va_idx[i]) for i in order[~ok])
            s = score(softmax(logits[ok]), val_labels[order[ok]])
        if world > 1:
            out = _reduce_epoch(out)
        row = {
            "epoch": epoch, "step": step, "train_loss": out["loss"], "val_log_loss": s["log_loss"],
            "val_accuracy": s["accuracy"], "val_top5": s["top5"],
            "lr": max(g["lr"] for g in parts["optimizer"].param_groups),  # the head's, with layer decay
            "ema_decay": parts["ema"].get_decay(step) if parts["ema"] is not None else math.nan,
            "skipped_steps": out["skipped"], **switches, "train_size": epoch_size,
            "images_per_s": len(train_loader) * bs * world / out["seconds"],
            "data_wait": out["wait"] / out["seconds"], "seconds": out["seconds"], "weights": primary,
        }
        history.append(row)
        improved = s["log_loss"] < best["val_log_loss"]
        if improved:
            best = {"val_log_loss": s["log_loss"], "epoch": epoch, "weights": primary}
            since_best = 0
            if rank == 0:
                best["sha256"] = save_best(_eval_model(parts), {"epoch": epoch, "val_log_loss": s["log_loss"]}, cfg,
                                           classes, fp)
        else:
            since_best += 1
        stop = bool(t.patience) and since_best >= t.patience
        if rank == 0:
            _write_metrics(fp.metrics, history)
            atomic_torch_save({**_state(parts, epoch, step, best, history, bad, cfg), "stopped": stop,
                               **({"plan": plan} if plan else {})}, fp.last)
        log(
            f"{fold_name(k)} epoch {epoch + 1}/{n_epochs}: loss {out['loss']:.4f}  "
            + ("" if full else f"val log loss {s['log_loss']:.4f}  acc {s['accuracy']:.3f}  top5 {s['top5']:.3f}  ")
            + f"{row['images_per_s']:.1f} img/s"
            + (f"  EMA decay {row['ema_decay']:.4f}" if parts["ema"] is not None else "")
            + (f"  {out['skipped']} fp16 step(s) skipped" if out["skipped"] else "")
            + ("  *" if improved else "")
        )
        if tracker is not None:
            tracker.log_metrics(row, step=epoch)
        if on_epoch_end is not None:
            on_epoch_end(k, epoch, row)
        if stop:
            log(f"fold {k}: no better val log loss for {t.patience} epochs, stopping early")
            break
    bad = sorted({i for part in gather_objects(bad) for i in part})

    def finish(best: dict = best) -> dict:
        # Rank 0 alone: SWA's BatchNorm pass reads every training photo, not rank 0's share.
        bn_loader = train_loader if world == 1 else make_loader(
            train_ds, bs, cfg.data.num_workers, shuffle=True, seed=t.seed * 1009 + k, pin_memory=pin)
        if full:
            return finish_full(parts, cfg, fp, bn_loader, history, plan, classes, len(tr_idx), device, log)
        best = final_candidates(parts, cfg, fp, bn_loader, val_loader, val_labels, history, best, classes, device,
                                log)
        best["sha256"] = checked_best_sha256(fp, best)  # before anything reads it again
        for row in history:
            row["chosen"] = "*" if (row["epoch"], row.get("weights", primary)) == (best["epoch"], best["weights"]) \
                else ""
        _write_metrics(fp.metrics, history)
        if bad:
            log(f"{fold_name(k)}: {len(bad)} photo(s) failed to decode during training (see skipped.csv)")
            rd.update_skipped({str(ts.paths[i]): "failed to decode during training" for i in bad})
        eval_size, size_scores, loader = choose_eval_size(
            cfg, fp, val_ds, val_loader, val_labels, size, len(classes), device, log
        )
        return write_oof(cfg, fp, loader, va_idx, data, device, best, eval_size, size_scores)

    barrier()  # every rank has finished training before rank 0 alone scores and writes
    return on_main(finish)


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


def choose_eval_size(
    cfg: Config, fp: FoldPaths, val_ds: ImageDataset, val_loader: DataLoader, val_labels: np.ndarray, size: int,
    n_classes: int, device: torch.device, log: Callable[[str], None],
) -> tuple[int, dict[int, float], DataLoader]:
    """Score ``best.pt`` on the validation fold at the training size and at every ``predict.eval_sizes`` (with the
    Predictor's TTA); return the size with the lowest log loss, every size's log loss, and a loader at that size.
    Networks trained on random crops often do better on larger photos (the train/test resolution discrepancy)."""
    sizes = [size] + [s for s in parse_sizes(cfg.predict.eval_sizes) if s != size]
    if len(sizes) == 1:
        return size, {}, val_loader
    model = load_fold_model(cfg, fp.best, n_classes, device)
    scores: dict[int, float] = {}
    loaders: dict[int, DataLoader] = {}
    for s in sizes:
        dcfg = data_config_for(cfg, s)
        ds = ImageDataset(val_ds.sources, val_ds.labels, eval_transform(dcfg), s, cfg.data.draft_factor,
                          max_pixels=cfg.data.max_pixels)
        loaders[s] = val_loader if s == size else make_loader(ds, cfg.predict.batch_size, cfg.data.num_workers)
        logits, order, ok = infer_logits(
            model, loaders[s], device, batch_normalize(dcfg), policy_views(cfg.predict),
            amp=amp_dtype(cfg.train.amp, device), channels_last=cfg.train.channels_last,
        )
        scores[s] = score(softmax(logits[ok]), val_labels[order[ok]])["log_loss"]
    chosen = min(scores, key=scores.get)
    log(f"fold {fp.k}: validation log loss by input size: "
        + ", ".join(f"{s}px {v:.4f}" + (" *" if s == chosen else "") for s, v in scores.items()))
    return chosen, scores, loaders[chosen]


def final_candidates(
    parts: dict, cfg: Config, fp: FoldPaths, train_loader: DataLoader, val_loader: DataLoader,
    val_labels: np.ndarray, history: list[dict], best: dict, classes: list[str], device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Score the weights beside the per-epoch ones once training ends: the raw weights (when the epochs were scored
    with the EMA) and the SWA average (BatchNorm statistics recomputed on the training photos). Whichever has the
    lowest validation log loss, the best epoch's weights included, becomes ``best.pt``; each gets a row in
    metrics.csv (``weights``) and the chosen one is marked (``chosen``)."""
    last_epoch = history[-1]["epoch"] if history else -1
    candidates = []
    if parts["ema"] is not None:
        candidates.append(("raw", parts["model"]))
    swa = parts["swa"]
    if swa is not None and int(swa.n_averaged) > 0:
        candidates.append(("swa", swa_model(parts, cfg, fp, train_loader, device)))
    for name, model in candidates:
        logits, order, ok = infer_logits(model, val_loader, device, parts["normalize"], amp=parts["amp"],
                                         channels_last=cfg.train.channels_last)
        s = score(softmax(logits[ok]), val_labels[order[ok]])
        history.append({"epoch": last_epoch, "step": history[-1]["step"] if history else 0, "val_log_loss":
                        s["log_loss"], "val_accuracy": s["accuracy"], "val_top5": s["top5"], "weights": name})
        better = s["log_loss"] < best["val_log_loss"]
        log(f"fold {fp.k}: {name} weights after the last epoch: val log loss {s['log_loss']:.4f}  acc "
            f"{s['accuracy']:.3f}" + ("  * (best)" if better else ""))
        if better:
            best = {"val_log_loss": s["log_loss"], "epoch": last_epoch, "weights": name}
            best["sha256"] = save_best(model, {"epoch": last_epoch, "weights": name, "val_log_loss": s["log_loss"]},
                                       cfg, classes, fp)
    return best


def swa_model(parts: dict, cfg: Config, fp: FoldPaths, train_loader: DataLoader, device: torch.device) -> nn.Module:
    """The SWA average with its BatchNorm statistics recomputed on one more augmented pass over the training photos
    (at the size it is scored and predicted at)."""
    from torch.optim.swa_utils import update_bn

    swa = parts["swa"]
    train_loader.sampler.set_epoch(cfg.train.epochs)  # one more augmented pass, seeded like an epoch
    train_loader.sampler.set_size(0)  # at the size SWA is scored and predicted at, resumed or not
    seed_everything(cfg.train.seed * 1_000_003 + fp.k * 1009 + cfg.train.epochs)
    cl = cfg.train.channels_last

    def inputs():
        for x, *_ in train_loader:
            x = parts["normalize"](x.to(device, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last) if cl else x

    with torch.no_grad():
        update_bn(inputs(), swa.module)
    return swa.module


def finish_full(
    parts: dict, cfg: Config, fp: FoldPaths, train_loader: DataLoader, history: list[dict], plan: dict,
    classes: list[str], n_train: int, device: torch.device, log: Callable[[str], None],
) -> dict:
    """The full-data fit's ``best.pt``: the weights kind the folds chose (SWA, EMA or raw) after the planned epochs;
    then ``summary.json``, which marks the fit complete."""
    weights = plan["weights"]
    if weights == "swa" and parts["swa"] is not None and int(parts["swa"].n_averaged) > 0:
        model = swa_model(parts, cfg, fp, train_loader, device)
    elif weights == "ema" and parts["ema"] is not None:
        model = parts["ema"].module
    else:
        model, weights = parts["model"], "raw"
    last_epoch = history[-1]["epoch"] if history else -1
    sha256 = save_best(model, {"epoch": last_epoch, "weights": weights, "val_log_loss": math.nan}, cfg, classes, fp)
    for row in history:
        row["weights"], row["chosen"] = weights, "*" if row["epoch"] == last_epoch else ""
    _write_metrics(fp.metrics, history)
    summary = {"fold": "full", "epochs": plan["epochs"], "best_epoch": last_epoch, "best_weights": weights,
               "eval_size": plan["eval_size"], "chosen_by": plan["source"], "fold_weights": plan["fold_weights"],
               "n_train": n_train, "lr_effective": effective_lr(cfg), "versions": versions(), "best_sha256": sha256}
    atomic_write_text(fp.summary, json.dumps(summary, indent=1))  # last: marks the full-data fit complete
    log(f"full-data fit: {n_train} photos, {plan['epochs']} epoch(s), {weights} weights saved to {fp.best}")
    return summary


def write_oof(
    cfg: Config, fp: FoldPaths, val_loader: DataLoader, va_idx: np.ndarray, data: RunData, device: torch.device,
    best: dict, eval_size: int = 0, size_scores: dict[int, float] | None = None,
) -> dict:
    """Out-of-fold logits of the best checkpoint, with the same TTA the Predictor uses, into oof.npz.

    Besides the model's labels it keeps each photo's path and its original (pre-merge) label, so evaluation can
    score in the submission's columns too; the logits of every view in ``predict.oof_views`` (float16,
    ``view_logits`` with names in ``views``), so the ensemble step can measure TTA policies on out-of-fold photos;
    and (``predict.oof_features``) the penultimate features of the first view, for the report's embedding map."""
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
    idx = np.asarray(va_idx)[order[keep]]
    labels = data.labels[idx]
    rel = np.array(data.trainset.relpaths(), dtype=object)[idx]
    s = score(softmax(logits), labels)
    summary = {"fold": fp.k, "best_epoch": best["epoch"], "best_weights": best.get("weights"), "eval_size": eval_size,
               "eval_size_log_loss": {str(k): v for k, v in (size_scores or {}).items()}, "tta": policy,
               "oof_views": views, "lr_effective": effective_lr(cfg), "versions": versions(),
               **{f"oof_{m}": v for m, v in s.items()}, "best_sha256": best.get("sha256") or file_sha256(fp.best)}
    atomic_write_text(fp.summary, json.dumps(summary, indent=1))
    extra = {"features": feats[keep].astype(np.float16)} if feats is not None else {}
    write_fold_oof(  # last: its presence marks the fold complete
        fp, indices=idx, labels=labels, logits=logits.astype(np.float32),
        original_labels=np.asarray(data.trainset.labels)[idx], paths=rel.astype(str),
        view_logits=view_logits.astype(np.float16), views=np.array(views), **extra,
    )
    return summary
