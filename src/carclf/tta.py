"""Test-time augmentation policies: names and view lists, without torch (config validation uses them).

A TTA *view* is one deterministic transform of the preprocessed input batch (applied by
:func:`carclf.models.forward.apply_view`):

- ``orig``: the photo as preprocessed;
- ``flip``: its mirror image;
- ``zoom<f>`` (e.g. ``zoom1.15``): the input resampled to ``f`` times its height and width (multi-scale TTA: the
  network sees the car larger, as the train/test resolution discrepancy suggests);
- ``crop_c``, ``crop_tl``, ``crop_tr``, ``crop_bl``, ``crop_br``: the centre or a corner region of 7/8 of the
  height and width, resized back to the input size (five-crop TTA);
- any of these joined with ``+flip`` (``zoom1.15+flip``): the same, mirrored.

A *policy* is a list of views whose logits are averaged in logit space (so a temperature fitted on the averaged
logits applies unchanged). Policy names: ``none`` (``orig``), ``hflip`` (``orig,flip``), ``multiscale``
(``orig,zoom1.15``), ``fivecrop`` (the five crops), and combinations joined with ``+`` (``hflip+multiscale`` is
``orig,flip,zoom1.15,zoom1.15+flip``); or an explicit comma-separated view list.

These are a few tensor operations, written in carclf rather than taken from a TTA package (``ttach`` is
unmaintained and knows nothing of carclf's out-of-fold views).
"""

from __future__ import annotations

import re

from carclf.errors import CarclfError

CROPS = ("crop_c", "crop_tl", "crop_tr", "crop_bl", "crop_br")
CROP_FRACTION = 7 / 8
POLICIES: dict[str, list[str]] = {
    "none": ["orig"],
    "hflip": ["orig", "flip"],
    "multiscale": ["orig", "zoom1.15"],
    "fivecrop": list(CROPS),
}
_ZOOM = re.compile(r"^zoom(\d+(?:\.\d+)?)$")


def _check_view(view: str) -> str:
    base = view[: -len("+flip")] if view.endswith("+flip") else view
    ok = base in {"orig", "flip"} | set(CROPS) or (_ZOOM.match(base) and 0.5 <= float(base[4:]) <= 2.0)
    if not ok or (base == "flip" and view != base):
        raise CarclfError(
            f"unknown TTA view {view!r}: use orig, flip, zoom<f> (f in 0.5..2, e.g. zoom1.15), crop_c, crop_tl, "
            "crop_tr, crop_bl, crop_br, or any of them with '+flip'"
        )
    return view


def parse_policy(spec: str) -> list[str]:
    """A policy name (``hflip``, ``hflip+multiscale``, ...), one view, or a comma-separated view list -> views."""
    spec = str(spec).replace(" ", "")
    if not spec:
        raise CarclfError("empty TTA policy: use none, hflip, multiscale, fivecrop, a '+' combination or views")
    if "," in spec:
        return list(dict.fromkeys(_check_view(v) for v in spec.split(",") if v))
    parts = spec.split("+")
    if not all(p in POLICIES for p in parts):
        try:
            return [_check_view(spec)]
        except CarclfError:
            raise CarclfError(
                f"unknown TTA policy {spec!r}: use none, hflip, multiscale, fivecrop, combinations such as "
                "hflip+multiscale, or a comma-separated view list (orig,flip,zoom1.15,...)"
            ) from None
    views = ["orig"]
    for p in parts:
        if p == "hflip":
            views = views + [_flip(v) for v in views]
        elif p == "multiscale":
            zoom = POLICIES["multiscale"][1]
            views = views + [zoom if v == "orig" else f"{zoom}+flip" for v in views if v in {"orig", "flip"}]
        elif p == "fivecrop":
            views = [w for v in views for w in (
                list(CROPS) if v == "orig" else [f"{c}+flip" for c in CROPS] if v == "flip" else [v])]
    return list(dict.fromkeys(views))


def _flip(view: str) -> str:
    return "flip" if view == "orig" else view if view.endswith("flip") else f"{view}+flip"


def policy_views(predict_cfg) -> list[str]:
    """The views the Predictor averages for a run's ``predict`` section (``tta``; ``auto`` follows ``tta_hflip``)."""
    tta = getattr(predict_cfg, "tta", "auto")
    if tta == "auto":
        return ["orig", "flip"] if predict_cfg.tta_hflip else ["orig"]
    return parse_policy(tta)
