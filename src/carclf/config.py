"""Typed configuration: defaults, then a YAML recipe, then ``key.sub=value`` overrides (in that order).

Unknown keys fail loudly with a suggestion, so a typo never silently trains the wrong recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carclf.errors import CarclfError


@dataclass
class DataConfig:
    root: str = ""  # competition layout: train/<class>/*.jpg, test/, test.csv, sample_submission.csv
    n_folds: int = 5  # stratified K-fold; saved once per data set and reused by every run
    fold_seed: int = 42  # seed of the split (separate from the training seed so runs share folds)
    img_size: int = 0  # input height in pixels (the width too, unless data.aspect); 0: the backbone's default
    aspect: float = 1.0  # input width / height: cars photos are wide (cars196's median is 1.88), see README
    crop_pct: float = 0.0  # 0: the backbone's own default eval crop fraction
    batch_size: int = 32
    num_workers: int = 2  # DataLoader workers; 0 decodes in the training process
    draft_factor: float = 2.0  # JPEGs larger than this many times the input size are decoded at reduced scale
    fold_policy: str = "group"  # group: duplicate groups never straddle folds (StratifiedGroupKFold) | stratified
    near_threshold: int = -1  # phash Hamming distance for near duplicates; -1: the calibrated default (2)
    within_class: str = "keep_one"  # copies of one photo inside a class: keep_one | keep_all
    cross_class: str = "exclude"  # one photo filed under several classes (label conflict): exclude | keep
    max_pixels: int = 90_000_000  # decompression-bomb guard: larger photos are quarantined; 0 disables
    merges: str = "auto"  # merges.yaml listing class names that are one model; auto: DATA/merges.yaml if present
    merge_split: str = "even"  # how predict shares a merged class's probability among its names: even | prior
    empty_class: str = "error"  # a class left with no usable photo: error | drop (train without it; see below)
    dropped_class_prob: float = 1e-4  # with empty_class=drop: the probability a dropped class's column gets
    outer_fold: int = -1  # nested cross-validation: fold k is left out entirely (neither trained nor validated
    #                       on); the other folds keep their numbers. carclf nest sets it (README "Distillation")


@dataclass
class ModelConfig:
    name: str = "tf_efficientnet_lite0"  # any timm model name
    pretrained: bool = True
    weights: str = ""  # a local checkpoint file; overrides every other source of pretrained weights
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.1  # stochastic depth
    freeze: int = 0  # freeze the stem and the first stages: this many of timm's coarse layer groups (stem = 1)


@dataclass
class AugConfig:
    scale_min: float = 0.35  # RandomResizedCrop lower area bound
    hflip: float = 0.5
    interpolation: str = "bilinear"  # RandomResizedCrop resampling in training: bilinear costs half of bicubic
    auto_augment: str = "rand-m7-mstd0.5-inc1"  # timm RandAugment spec; "" disables
    re_prob: float = 0.0  # RandomErasing (Cutout) probability
    mixup: float = 0.0  # mixup alpha; 0 disables
    cutmix: float = 0.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0  # share of batches that get Mixup or CutMix (when either alpha is set)
    mixup_switch_prob: float = 0.5  # with both set: share of those batches that get CutMix instead of Mixup
    size_schedule: str = ""  # progressive resizing, e.g. "128:0,160:4,192:8": the training input size from each
    #                          (0-based) epoch on; validation and prediction use data.img_size
    mixup_off_epoch: int = 0  # 0: never; N: from the N-th epoch (0-based) on train on clean photos (a clean tail)


@dataclass
class TrainConfig:
    folds: str = "0"  # "0", "0,2", "all"; add "full" ("all,full" or "full") for the full-data fit
    full_epochs: int = 0  # epochs of the full-data fit; 0: the epochs the run's completed folds chose (median)
    epochs: int = 10
    lr: float = 1e-3  # peak learning rate, used as given unless lr_base_size is set
    lr_base_size: int = 0  # 0: no scaling; N: lr is for a batch of N and is scaled to data.batch_size
    lr_base_scale: str = "linear"  # with lr_base_size: linear (lr * batch / N) | sqrt (lr * sqrt(batch / N))
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    loss: str = "ce"  # ce | focal | ce+focal  (soft Mixup/CutMix targets and label smoothing work with each)
    focal_gamma: float = 2.0  # focal loss's focusing parameter; 0 makes it cross-entropy
    focal_weight: float = 0.5  # with loss=ce+focal: loss = (1 - w) * CE + w * focal
    class_weights: str = ""  # "" | balanced (inverse class frequency) | a CSV file class,weight
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum)
    momentum: float = 0.9  # SGD momentum
    layer_decay: float = 0.0  # 0: off; e.g. 0.75: each layer group further from the head gets lr x 0.75 (timm)
    accum_steps: int = 1  # gradient accumulation: effective batch = data.batch_size x accum_steps
    grad_checkpointing: bool = False  # recompute activations in backward (timm): less memory, ~30% slower
    compile: bool = False  # torch.compile the training forward (opt in: compiling costs minutes up front)
    freeze_epochs: int = 0  # warm start: train only the classifier for this many epochs, then the whole model
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the whole batch of all ranks
    swa_start_epoch: int = 0  # 0: off; N: average the weights after every epoch from epoch N (0-based) on (SWA)
    ema: bool = True  # evaluate and keep an exponential moving average of the weights
    ema_decay: float = 0.998  # the EMA's decay (its ceiling while ema_warmup ramps it up)
    ema_warmup: bool = True  # timm's EMA warm-up: decay = min(ema_decay, 1 - (1 + step)^(-2/3)), logged per epoch
    patience: int = 0  # early stopping after this many epochs without a better val log loss; 0 disables
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    amp: str = "auto"  # auto | bf16 | fp16 | off  (only used on CUDA)
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CUDA and on x86 CPUs alike
    device: str = "auto"  # auto | cpu | cuda | cuda:1  (auto under torchrun: the process's local GPU)
    tf32: bool = True  # CUDA: float32 matmuls and convolutions may use TF32 (Ampere+); false for full fp32
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time and pick the fastest kernels for the fixed input size
    seed: int = 0
    threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default


@dataclass
class PredictConfig:
    tta_hflip: bool = True  # with tta=auto: average logits over the photo and its mirror image
    tta: str = "auto"  # TTA policy (carclf.tta): none | hflip | multiscale | fivecrop | combos with + | view list;
    #                    auto: hflip if tta_hflip else none. An ensemble's own policy overrides it.
    oof_views: str = "hflip+multiscale"  # views whose out-of-fold logits each fold keeps (the ensemble step
    #                    measures every TTA policy on them); the policy's own views are always kept
    full: str = "beside"  # the full-data fit (train.folds=full), where present: beside the folds | instead | off
    oof_features: bool = True  # keep the penultimate features of the out-of-fold photos (the report's map)
    eps: float = 1e-6  # probabilities are clipped to [eps, 1-eps] and renormalised
    batch_size: int = 64
    eval_sizes: str = ""  # e.g. "224,256": input sizes to try besides the training size; each fold keeps the one
    #                       with the lowest validation log loss (train/test resolution discrepancy)


def parse_size_schedule(spec: str, final: int, epochs: int) -> dict[int, int]:
    """``aug.size_schedule`` "128:0,160:4" -> {0: 128, 4: 160}: the training input size from each epoch on."""
    out: dict[int, int] = {}
    for item in str(spec).replace(" ", "").split(","):
        if not item:
            continue
        try:
            size, epoch = (int(v) for v in item.split(":"))
        except ValueError as exc:
            raise CarclfError(f"aug.size_schedule='{spec}': write SIZE:EPOCH pairs, e.g. 128:0,160:4") from exc
        if size < 32 or not 0 <= epoch < epochs:
            raise CarclfError(f"aug.size_schedule='{spec}': sizes >= 32 px, epochs 0..{epochs - 1}")
        out[epoch] = size
    if out and 0 not in out:
        out[0] = final
    return dict(sorted(out.items()))


def parse_sizes(spec: str) -> list[int]:
    """``predict.eval_sizes``: "" -> []; "224,256" -> [224, 256]."""
    try:
        sizes = [int(v) for v in str(spec).replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise CarclfError(f"predict.eval_sizes='{spec}' must be input sizes in pixels, e.g. 224,256") from exc
    if any(v < 32 for v in sizes):
        raise CarclfError(f"predict.eval_sizes='{spec}': sizes must be at least 32 pixels")
    return sizes


@dataclass
class TrackConfig:
    enabled: bool = True  # MLflow tracking of every fold: params, per-epoch metrics, summaries, artefacts
    uri: str = ""  # "": a local SQLite store in <out_dir>/mlruns; or http://HOST:5000, sqlite:///PATH, ...
    experiment: str = "carclf"


@dataclass
class DistillConfig:
    teacher: str = ""  # a run or an ensemble of k-fold runs (same folds): the student learns from its OOF rows
    alpha: float = 0.5  # loss = (1 - alpha) * hard-label loss + alpha * T^2 * KL(teacher_T || student_T) (Hinton)
    temperature: float = 2.0  # T: both distributions are softened by it before the KL term
    unlabeled: str = ""  # "" | test (the data's test photos) | a folder of photos: they train on soft targets only
    unlabeled_weight: str = "uniform"  # an unlabeled photo's soft term weighs alpha (uniform) or alpha x the
    #                                    teacher's top probability (confidence)
    min_confidence: float = 0.0  # unlabeled photos whose teacher top probability is below this are left out
    allow_partial: bool = False  # a teacher with unfinished folds: train those folds' photos on the hard label alone
    targets: str = "nested"  # nested: student fold k learns from teacher models that never saw fold k (carclf nest)
    #                          | oof: from the teacher's OOF rows (no extra models; the student's OOF is optimistic)


@dataclass
class Config:
    name: str = "run"  # runs/<name>/
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{prefix}{close[0]}'?"
    return f" Valid keys: {', '.join(prefix + c for c in sorted(choices))}."


class RawOverride:
    """A command-line value parsed as YAML, with its text kept: a string field (a path, a name) takes the text
    as typed, so a folder called ``on`` or ``1e5`` stays a string instead of becoming True or 100000.0."""

    def __init__(self, value: Any, raw: str) -> None:
        self.value, self.raw = value, raw


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a value against a dataclass field type; ints become floats where a float is expected."""
    if isinstance(value, RawOverride):
        value = value.raw if typ is str else value.value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. train.folds=0 parsed by YAML as an int
    if typ in (int, float, str, bool) and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CarclfError(f"config key '{key}' must be {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(updates, dict):
        raise CarclfError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = prefix + str(key)
        if key not in names:
            raise CarclfError(f"{source}: unknown config key '{full}'." + _suggest(str(key), names, prefix))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, RawOverride):
                value = value.value
            _merge(current, value, full + ".", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise CarclfError(f"override '{text}' must look like key.sub=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 3e-4 as a string; users mean a number
            value = float(value)
    # The text exactly as typed: a stray space is refused by validate(), never silently removed.
    return key.strip(), RawOverride(value, raw)


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, an optional YAML recipe and ``key.sub=value`` overrides."""
    cfg = Config()
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise CarclfError(f"recipe '{path}' not found (see configs/ for the shipped recipes)")
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise CarclfError(f"recipe '{path}' is not valid YAML: {exc}") from exc
        _merge(cfg, doc, "", str(path))
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), "", "command line")
    validate(cfg)
    return cfg


def config_from_dict(doc: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    _merge(cfg, doc, "", source)
    return cfg


def config_diff(a: dict, b: dict, ignore: set[tuple[str, ...]] = frozenset(), prefix: tuple = ()) -> list[str]:
    """The keys two configs (as dicts) set differently, as ``key: old -> new`` lines; ``ignore``: key paths."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_diff(va, vb, ignore, (*prefix, key))
        elif va != vb and (*prefix, key) not in ignore:
            diffs.append(f"{'.'.join((*prefix, key))}: {va!r} -> {vb!r}")
    return diffs


def _distill_checks(d: DistillConfig) -> list[tuple[bool, str]]:
    return [
        (0 <= d.alpha <= 1, "distill.alpha must be in [0, 1] (0: hard labels alone, 1: teacher alone)"),
        (0 < d.temperature <= 20, "distill.temperature must be in (0, 20] (Hinton's T, typically 1-4)"),
        (d.unlabeled_weight in {"uniform", "confidence"}, "distill.unlabeled_weight must be 'uniform' or 'confidence'"),
        (0 <= d.min_confidence < 1, "distill.min_confidence must be in [0, 1)"),
        (d.targets in {"nested", "oof"}, "distill.targets must be 'nested' or 'oof'"),
        (bool(d.teacher) or not d.unlabeled,
         "distill.unlabeled needs distill.teacher: the teacher gives the unlabeled photos their targets"),
    ]


def validate(cfg: Config) -> None:
    """Range checks that a type check cannot express."""
    checks = [
        (cfg.data.n_folds >= 2, "data.n_folds must be at least 2"),
        (cfg.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (cfg.predict.batch_size >= 1, "predict.batch_size must be at least 1"),
        (cfg.data.draft_factor >= 1, "data.draft_factor must be at least 1 (1: decode at the smallest size >= input)"),
        (cfg.model.freeze >= 0, "model.freeze must be 0 or more"),
        (0 <= cfg.aug.hflip <= 1, "aug.hflip must be in [0, 1]"),
        (cfg.aug.interpolation in {"bilinear", "bicubic", "random"}, "aug.interpolation: bilinear, bicubic or random"),
        (0 <= cfg.aug.re_prob <= 1, "aug.re_prob must be in [0, 1]"),
        (cfg.aug.mixup >= 0 and cfg.aug.cutmix >= 0, "aug.mixup and aug.cutmix must be 0 (off) or positive"),
        (cfg.train.warmup_epochs >= 0, "train.warmup_epochs must be 0 or more"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be 0 (off) or positive"),
        (cfg.train.patience >= 0, "train.patience must be 0 (off) or more"),
        (cfg.train.threads >= 0, "train.threads must be 0 (torch default) or more"),
        (cfg.data.num_workers >= 0, "data.num_workers must be 0 or more"),
        (cfg.data.img_size >= 0, "data.img_size must be 0 (backbone default) or a size in pixels"),
        (0 <= cfg.data.crop_pct <= 1, "data.crop_pct must be in [0, 1]"),
        (0.25 <= cfg.data.aspect <= 4, "data.aspect (input width / height) must be in [0.25, 4]"),
        (0 < cfg.aug.scale_min <= 1, "aug.scale_min must be in (0, 1]"),
        (cfg.data.fold_policy in {"group", "stratified"}, "data.fold_policy must be 'group' or 'stratified'"),
        (cfg.data.within_class in {"keep_one", "keep_all"}, "data.within_class must be 'keep_one' or 'keep_all'"),
        (cfg.data.cross_class in {"exclude", "keep"}, "data.cross_class must be 'exclude' or 'keep'"),
        (-1 <= cfg.data.near_threshold <= 32, "data.near_threshold must be -1 (default) or 0..32 bits"),
        (cfg.data.max_pixels >= 0, "data.max_pixels must be 0 (no guard) or a pixel count"),
        (cfg.data.merge_split in {"even", "prior"}, "data.merge_split must be 'even' or 'prior'"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.train.lr > 0, "train.lr must be positive"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (0 < cfg.train.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
        (cfg.train.amp in {"auto", "bf16", "fp16", "off"}, "train.amp must be one of auto, bf16, fp16, off"),
        (0 < cfg.predict.eps < 0.01, "predict.eps must be in (0, 0.01)"),
        (cfg.predict.full in {"beside", "instead", "off"}, "predict.full must be beside, instead or off"),
        (cfg.data.empty_class in {"error", "drop"}, "data.empty_class must be 'error' or 'drop'"),
        (0 < cfg.data.dropped_class_prob < 0.01, "data.dropped_class_prob must be in (0, 0.01)"),
        (cfg.train.lr_base_size >= 0, "train.lr_base_size must be 0 (no scaling) or a batch size"),
        (cfg.train.lr_base_scale in {"linear", "sqrt"}, "train.lr_base_scale must be 'linear' or 'sqrt'"),
        (0 <= cfg.aug.mixup_prob <= 1, "aug.mixup_prob must be in [0, 1]"),
        (0 <= cfg.aug.mixup_switch_prob <= 1, "aug.mixup_switch_prob must be in [0, 1]"),
        (cfg.aug.mixup_off_epoch >= 0, "aug.mixup_off_epoch must be 0 (never) or an epoch number"),
        (cfg.train.loss in {"ce", "focal", "ce+focal"}, "train.loss must be one of ce, focal, ce+focal"),
        (cfg.train.focal_gamma >= 0, "train.focal_gamma must be 0 or more"),
        (0 <= cfg.train.focal_weight <= 1, "train.focal_weight must be in [0, 1]"),
        (cfg.train.optimizer in {"adamw", "sgd"}, "train.optimizer must be 'adamw' or 'sgd'"),
        (0 <= cfg.train.momentum < 1, "train.momentum must be in [0, 1)"),
        (0 <= cfg.train.layer_decay <= 1, "train.layer_decay must be 0 (off) or in (0, 1]"),
        (cfg.train.accum_steps >= 1, "train.accum_steps must be at least 1"),
        (cfg.train.freeze_epochs >= 0, "train.freeze_epochs must be 0 or more"),
        (0 <= cfg.train.full_epochs <= cfg.train.epochs,
         "train.full_epochs must be 0 (the folds' choice) or at most train.epochs (its schedule's length)"),
        (0 <= cfg.train.swa_start_epoch < max(cfg.train.epochs, 1),
         "train.swa_start_epoch must be 0 (off) or an epoch before train.epochs"),
        (-1 <= cfg.data.outer_fold < cfg.data.n_folds,
         f"data.outer_fold must be -1 (off) or a fold number 0..{cfg.data.n_folds - 1}"),
        *_distill_checks(cfg.distill),
    ]
    for ok, message in checks:
        if not ok:
            raise CarclfError(message)
    check_folder_name(cfg.name, "name")
    _check_stray_spaces(cfg)
    if cfg.name in RESERVED_NAMES:
        raise CarclfError(f"name={cfg.name!r} is reserved: {RESERVED_NAMES[cfg.name]}; choose another run name")
    parse_sizes(cfg.predict.eval_sizes)
    from carclf.tta import parse_policy, policy_views

    try:
        policy_views(cfg.predict)
        parse_policy(cfg.predict.oof_views)
    except CarclfError as exc:
        raise CarclfError(f"predict.tta / predict.oof_views: {exc}") from None
    parse_size_schedule(cfg.aug.size_schedule, cfg.data.img_size, cfg.train.epochs)
    check_settings(cfg.track.enabled, cfg.track.uri, cfg.track.experiment)


URI_SCHEMES = {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "file"}


def check_settings(enabled: bool, uri: str, experiment: str) -> None:
    """Validate the ``track`` section without importing MLflow (MLflow's URI schemes): raise CarclfError."""
    if not enabled:
        return
    if not str(experiment).strip():
        raise CarclfError("track.experiment is empty: name the MLflow experiment, e.g. track.experiment=carclf")
    if uri:
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if scheme.split("+", 1)[0] not in URI_SCHEMES:
            raise CarclfError(
                f"track.uri={uri!r} is not a tracking URI: use '' (a local store under out_dir), a server such as "
                "http://127.0.0.1:5000, or a database such as sqlite:///PATH/mlflow.db; track.enabled=false turns "
                "tracking off"
            )


# Folders of out_dir that are not runs.
RESERVED_NAMES = {"prepare": "out_dir/prepare holds the data checks", "mlruns": "out_dir/mlruns is the MLflow store"}


_QUOTES = "'\"`"
_NAME_ALLOWED = "letters (Korean too), digits, '-', '_', '.' and spaces inside the name are fine"


def check_folder_name(name: str, key: str) -> None:
    """A run name is one plain folder name: never '', '.', '..', a path, hidden (a leading dot), with stray spaces
    or with quote marks (a shell removes the quotes around a word; quotes that reach carclf were typed inside it)."""
    if not name or not name.strip():
        raise CarclfError(f"{key} is empty: give the run a name, e.g. {key}=lite0-192")
    if name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise CarclfError(
            f"{key}={name!r} is not a plain folder name: use letters, digits, '-' or '_' (no '/', '\\', leading '.', "
            "'.' or '..'); out_dir=... chooses where runs go"
        )
    if any(c in _QUOTES for c in name):
        plain = "".join(c for c in name if c not in _QUOTES).strip() or "lite0-192"
        raise CarclfError(
            f"{key}={name!r} holds quote marks, which would become part of the folder name: write {key}={plain} "
            f"({_NAME_ALLOWED}; for spaces quote the whole word, e.g. \"{key}=my run\")"
        )
    if name != name.strip() or any(ord(c) < 32 for c in name):
        raise CarclfError(
            f"{key}={name!r} has leading/trailing spaces or control characters: remove them "
            f"({_NAME_ALLOWED})"
        )


def _check_stray_spaces(obj: Any, prefix: str = "") -> None:
    """A text value with a leading or trailing space was mistyped (``out_dir=" runs"`` would make a folder named
    " runs"): refuse it, naming the key, instead of guessing."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_stray_spaces(value, f"{prefix}{f.name}.")
        elif isinstance(value, str) and value != value.strip():
            raise CarclfError(f"{prefix}{f.name}={value!r} has a leading or trailing space: remove it")


def global_batch(cfg: Config, world_size: int | None = None) -> int:
    """Photos per optimizer update: data.batch_size x train.accum_steps x processes (WORLD_SIZE under torchrun)."""
    import os

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1) or 1)
    return cfg.data.batch_size * cfg.train.accum_steps * world


def effective_lr(cfg: Config, world_size: int | None = None) -> float:
    """The learning rate the optimizer gets: ``train.lr``, scaled to the global batch (:func:`global_batch`) only
    when ``train.lr_base_size`` is set (timm's lr_base convention)."""
    t = cfg.train
    if not t.lr_base_size:
        return t.lr
    ratio = global_batch(cfg, world_size) / t.lr_base_size
    return t.lr * (ratio if t.lr_base_scale == "linear" else ratio**0.5)


def save_config(cfg: Config, path: Path) -> None:
    from carclf.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def read_config(path: Path) -> Config:
    if not path.is_file():
        raise CarclfError(f"'{path}' not found: is this a carclf run directory?")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    distill = doc.get("distill") if isinstance(doc.get("distill"), dict) else {}
    if distill.get("teacher") and "targets" not in distill:
        distill["targets"] = "oof"  # a run distilled before distill.targets existed learnt from the OOF rows
    return config_from_dict(doc, str(path))


__all__ = [
    "AugConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "PredictConfig",
    "TrackConfig",
    "TrainConfig",
    "check_folder_name",
    "config_from_dict",
    "effective_lr",
    "load_config",
    "parse_override",
    "read_config",
    "save_config",
]
