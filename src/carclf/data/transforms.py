"""Preprocessing from the backbone's own timm data config (mean, std, size, crop), never from constants."""

from __future__ import annotations

from typing import Any

from carclf.config import AugConfig, Config


def backbone_data_config(
    model_name: str, img_size: int = 0, crop_pct: float = 0.0, aspect: float = 1.0,
) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for a model name, without building the model; size/crop overridable.

    ``img_size`` is the input height; the width is ``round(img_size * aspect)``. A size in carclf (``img_size``,
    ``predict.eval_sizes``, ``aug.size_schedule``) always names the height."""
    import timm
    from timm.data import resolve_data_config

    try:
        pcfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:
        pcfg = None
    args: dict[str, Any] = {}
    if img_size:
        args["input_size"] = (3, img_size, img_size)
    if crop_pct:
        args["crop_pct"] = crop_pct
    dcfg = resolve_data_config(args, pretrained_cfg=pcfg.to_dict() if pcfg else {})
    if aspect != 1.0:
        h = dcfg["input_size"][1]
        dcfg["input_size"] = (3, h, max(8, round(h * aspect)))
    return dcfg


def input_hw(dcfg: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of a data config's input."""
    return int(dcfg["input_size"][1]), int(dcfg["input_size"][2])


class BatchNormalize:
    """uint8 NCHW batch -> float, normalised by the backbone's mean and std.

    The per-image transforms stop at uint8 tensors (timm's ``use_prefetcher`` mode): a quarter of the bytes to move
    from a decode worker, and one vectorised normalisation per batch instead of one per image. On 2 CPU cores that
    is time the model gets back; on a GPU the batch is normalised on the device.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        import torch

        self.mean = torch.tensor([m * 255 for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([s * 255 for s in std]).view(1, -1, 1, 1)

    def __call__(self, x):
        if x.dtype.is_floating_point:  # already normalised (e.g. a zero placeholder of a failed photo)
            return x
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)


def batch_normalize(dcfg: dict[str, Any]) -> BatchNormalize:
    return BatchNormalize(dcfg["mean"], dcfg["std"])


def train_transform(dcfg: dict[str, Any], aug: AugConfig):
    """RandomResizedCrop + flip + RandAugment via timm's ``create_transform``, ending in a uint8 tensor (normalise
    with :class:`BatchNormalize`; RandomErasing is applied to the normalised batch by the training loop)."""
    from timm.data import create_transform

    h, w = input_hw(dcfg)
    return create_transform(
        dcfg["input_size"],
        is_training=True,
        use_prefetcher=True,
        scale=(aug.scale_min, 1.0),
        # crop shapes around the input's own shape (timm's 3/4..4/3 of a square input), so a wide input is filled
        # from a wide region of the photo instead of a stretched square
        ratio=(3 / 4 * w / h, 4 / 3 * w / h),
        hflip=aug.hflip,
        auto_augment=aug.auto_augment or None,
        # Training crops are resampled cheaply (on 2 CPU cores bicubic doubles the per-photo cost); evaluation keeps
        # the backbone's own interpolation.
        interpolation=aug.interpolation,
        mean=dcfg["mean"],
        std=dcfg["std"],
    )


def eval_transform(dcfg: dict[str, Any]):
    """Resize + centre crop by the backbone's crop_pct (or squash, where the backbone was trained so), ending in a
    uint8 tensor like :func:`train_transform`."""
    from timm.data import create_transform

    return create_transform(
        dcfg["input_size"],
        is_training=False,
        use_prefetcher=True,
        interpolation=dcfg["interpolation"],
        mean=dcfg["mean"],
        std=dcfg["std"],
        crop_pct=dcfg["crop_pct"],
        crop_mode=dcfg.get("crop_mode", "center"),
    )


def data_config_for(cfg: Config, size: int = 0) -> dict[str, Any]:
    """The run's preprocessing; ``size`` > 0 evaluates at another input height (same crop fraction and aspect)."""
    return backbone_data_config(cfg.model.name, size or cfg.data.img_size, cfg.data.crop_pct, cfg.data.aspect)
