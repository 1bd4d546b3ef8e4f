"""Preprocessing from the backbone's own timm data config (mean, std, size, crop), never from constants."""

from __future__ import annotations

from typing import Any

from carclf.config import AugConfig, Config


def backbone_data_config(model_name: str, img_size: int = 0, crop_pct: float = 0.0) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for a model name, without building the model; size/crop overridable."""
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
    return resolve_data_config(args, pretrained_cfg=pcfg.to_dict() if pcfg else {})


def train_transform(dcfg: dict[str, Any], aug: AugConfig):
    """RandomResizedCrop + flip + RandAugment (+ optional RandomErasing), via timm's ``create_transform``."""
    from timm.data import create_transform

    return create_transform(
        dcfg["input_size"],
        is_training=True,
        scale=(aug.scale_min, 1.0),
        hflip=aug.hflip,
        auto_augment=aug.auto_augment or None,
        re_prob=aug.re_prob,
        interpolation=dcfg["interpolation"],
        mean=dcfg["mean"],
        std=dcfg["std"],
    )


def eval_transform(dcfg: dict[str, Any]):
    """Resize + centre crop by the backbone's crop_pct (or squash, where the backbone was trained so)."""
    from timm.data import create_transform

    return create_transform(
        dcfg["input_size"],
        is_training=False,
        interpolation=dcfg["interpolation"],
        mean=dcfg["mean"],
        std=dcfg["std"],
        crop_pct=dcfg["crop_pct"],
        crop_mode=dcfg.get("crop_mode", "center"),
    )


def data_config_for(cfg: Config) -> dict[str, Any]:
    return backbone_data_config(cfg.model.name, cfg.data.img_size, cfg.data.crop_pct)
