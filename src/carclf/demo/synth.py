"""Procedural synthetic fine-grained car dataset in the Dacon "Hecto" competition layout.

Each class is a side-view "car model" drawn with PIL from a seeded parameter vector. Classes come in families
(same model/generation, hence same silhouette) whose members differ in only one or two details (wheel size, rim
style, window count, headlight shape, grille, spoiler, stripe), so the task is fine-grained. Colour, background,
scale, position, facing direction, rotation, blur, exposure and JPEG quality vary per photo and carry no label.

Layout written under ``root``::

    train/<class name>/<NNNN>.jpg
    test/TEST_00000.jpg ...
    test.csv                 ID,img_path
    sample_submission.csv    ID,<class columns in a shuffled, non-sorted order>
    test_labels.csv          ID,label   (not part of the competition; true labels for scoring the demo)
"""

from __future__ import annotations

import csv
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SynthSpec", "SynthInfo", "make_dataset", "class_names"]

# (model, generation, first year, last year, body type). Body types are interleaved so that even a small dataset
# mixes sedans, SUVs and hatchbacks.
_FAMILIES: list[tuple[str, str, int, int, str]] = [
    ("그랜저", "6세대", 2016, 2019, "sedan"),
    ("싼타페", "TM", 2019, 2020, "suv"),
    ("i30", "PD", 2017, 2020, "hatch"),
    ("쏘나타", "DN8", 2020, 2023, "sedan"),
    ("투싼", "NX4", 2021, 2023, "suv"),
    ("모닝", "JA", 2018, 2020, "hatch"),
    ("K5", "3세대", 2020, 2022, "sedan"),
    ("쏘렌토", "MQ4", 2021, 2023, "suv"),
    ("레이", "TAM", 2018, 2022, "hatch"),
    ("아반떼", "CN7", 2021, 2023, "sedan"),
    ("스포티지", "NQ5", 2022, 2024, "suv"),
    ("코나", "OS", 2018, 2020, "hatch"),
    ("K3", "2세대", 2019, 2021, "sedan"),
    ("팰리세이드", "LX2", 2019, 2022, "suv"),
]
# Variant 0 is the plain model; the others are trims/facelifts of the same family (same silhouette).
_TRIMS = ["", "하이브리드", "N라인", "페이스리프트", "LPG"]
# Family members are handed out three at a time first so small datasets still have several families of ~3.
_ROUNDS = ((0, 1, 2), (3, 4))

# Class-defining details and their number of states.
_DETAILS: dict[str, int] = {"wheel": 2, "rim": 4, "windows": 2, "light": 3, "grille": 3, "spoiler": 2, "stripe": 3}

# Silhouette ranges (car length = 1, y up from the ground) per body type: (low, high) for each of _SHAPE_KEYS.
# clear: ground clearance, belt: top of the lower body, drop: how much lower the roof ends at the rear,
# hood/deck: hood and trunk lengths, ws/rw: horizontal run of windscreen/rear window, wb0/wb1: axles, r: wheel radius.
_SHAPE_KEYS = ("clear", "belt", "roof", "drop", "hood", "deck", "ws", "rw", "wb0", "wb1", "r")
_BODY_RANGES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "sedan": (
        (0.035, 0.19, 0.29, 0.0, 0.24, 0.17, 0.14, 0.13, 0.17, 0.79, 0.066),
        (0.045, 0.21, 0.315, 0.025, 0.30, 0.23, 0.19, 0.19, 0.21, 0.83, 0.074),
    ),
    "suv": (
        (0.05, 0.235, 0.37, 0.0, 0.19, 0.03, 0.11, 0.03, 0.17, 0.80, 0.078),
        (0.06, 0.26, 0.40, 0.02, 0.24, 0.06, 0.15, 0.07, 0.20, 0.83, 0.085),
    ),
    "hatch": (
        (0.04, 0.21, 0.33, 0.0, 0.17, 0.04, 0.15, 0.08, 0.16, 0.80, 0.07),
        (0.05, 0.23, 0.36, 0.035, 0.22, 0.08, 0.20, 0.13, 0.19, 0.84, 0.077),
    ),
}

# Body colours are drawn per photo from one shared palette, so colour never identifies a class.
_PALETTE = np.array(
    [
        (235, 235, 232),
        (190, 192, 196),
        (120, 122, 128),
        (35, 36, 40),
        (170, 25, 30),
        (30, 60, 150),
        (20, 30, 70),
        (30, 80, 50),
        (200, 185, 150),
        (100, 65, 40),
        (230, 120, 20),
        (225, 195, 40),
        (90, 150, 200),
        (120, 20, 60),
    ],
    dtype=np.float64,
)


@dataclass
class SynthSpec:
    """What to generate; see the module docstring for the layout."""

    n_classes: int = 12  # distinct class *names* (including the alias pair)
    train_per_class: int = 30
    test_per_class: int = 8
    size: tuple[int, int] = (192, 144)  # (width, height) of each photo
    n_duplicates: int = 4  # exact byte-copies of train photos placed inside the same class folder under a new name
    merged_pair: bool = True  # the last two class names are "really one model": drawn from identical parameters
    nfd_names: bool = False  # write class folder names NFD-normalised (as from a macOS zip)
    seed: int = 0


@dataclass
class SynthInfo:
    """What was written."""

    root: Path
    classes: list[str]  # NFC class names, in sorted order
    merged: list[tuple[str, str]] = field(default_factory=list)  # the pairs of names that are one model
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (original, copy) train files
    test_labels: dict[str, str] = field(default_factory=dict)  # test ID -> NFC class name


# ----------------------------------------------------------------------------------------------------------- names


def _family_name(f: int, v: int) -> str:
    model, gen, y0, y1, _ = _FAMILIES[f]
    trim = _TRIMS[v]
    if trim == "페이스리프트":  # a facelift follows the original generation
        y0, y1 = y1, y1 + 2
    parts = [model, gen] + ([trim] if trim else []) + [str(y0), str(y1)]
    return "_".join(parts)


def _catalog() -> list[tuple[str, int, int]]:
    """All (name, family, variant) in hand-out order."""
    return [(_family_name(f, v), f, v) for rnd in _ROUNDS for f in range(len(_FAMILIES)) for v in rnd]


def _alias(f: int, v: int) -> str:
    """A second name for the same model, in the style of the real competition's duplicate labels
    (e.g. ``K5_3세대_하이브리드_2020_2022`` vs ``K5_하이브리드_3세대_2020_2023``)."""
    model, gen, y0, y1, _ = _FAMILIES[f]
    trim = _TRIMS[v]
    if trim == "페이스리프트":
        y0, y1 = y1, y1 + 2
    parts = [model] + ([trim, gen] if trim else [gen]) + [str(y0), str(y1 + 1)]
    return "_".join(parts)


def class_names(n: int) -> list[str]:
    """The first ``n`` deterministic Korean-style class names (unique, folder-safe, NFC)."""
    cat = _catalog()
    if not 0 <= n <= len(cat):
        raise ValueError(f"class_names supports 0..{len(cat)} names, got {n}")
    return [name for name, _, _ in cat[:n]]


def _class_table(n: int, merged_pair: bool) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """(name, family, variant) for every class, plus the merged pairs. An alias reuses its partner's (f, v)."""
    if merged_pair:
        if n < 2:
            raise ValueError("merged_pair needs n_classes >= 2")
        table = _catalog()[: n - 1] if n - 1 <= len(_catalog()) else None
        if table is None:
            raise ValueError(f"n_classes must be <= {len(_catalog()) + 1}")
        name, f, v = table[-1]
        alias = _alias(f, v)
        return table + [(alias, f, v)], [(name, alias)]
    if n > len(_catalog()):
        raise ValueError(f"n_classes must be <= {len(_catalog())}")
    return _catalog()[:n], []


# ---------------------------------------------------------------------------------------------------------- models


def _family_models(seed: int, f: int) -> list[dict]:
    """Parameters of every variant of family ``f``: a shared silhouette, details differing from variant 0 in 1-2."""
    rng = np.random.default_rng([seed, 1, f])
    body = _FAMILIES[f][4]
    lo, hi = _BODY_RANGES[body]
    shape = {k: float(rng.uniform(a, b)) for k, a, b in zip(_SHAPE_KEYS, lo, hi, strict=True)}
    keys = list(_DETAILS)
    base = {k: int(rng.integers(_DETAILS[k])) for k in keys}
    base["windows"] += 2  # 2 or 3 side windows
    details = [base]
    while len(details) < len(_TRIMS):
        d = dict(base)
        for k in rng.choice(keys, size=int(rng.integers(1, 3)), replace=False):
            lo = 2 if k == "windows" else 0
            choices = [x for x in range(lo, lo + _DETAILS[k]) if x != base[k]]
            d[k] = int(rng.choice(choices))
        if d not in details:
            details.append(d)
    return [{"body": body, **shape, **d} for d in details]


# -------------------------------------------------------------------------------------------------------- drawing


def _shade(c: np.ndarray, k: float) -> tuple[int, int, int]:
    return tuple(int(x) for x in np.clip(c * k, 0, 255))


def _draw_car(m: dict, colour: np.ndarray, length_px: int, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """Draw the car facing right on a transparent canvas (length ``length_px``). Returns (RGBA, ground row)."""
    # Small per-photo proportion jitter so photos of one class are not pixel-identical silhouettes.
    p = {k: (m[k] * (1 + rng.normal(0, 0.02)) if k in _SHAPE_KEYS else m[k]) for k in m}
    r = p["r"] * (1.12 if p["wheel"] else 1.0)
    S = float(length_px)
    mx, top = 0.04, p["roof"] + 0.06
    W, H = int(S * (1 + 2 * mx)) + 2, int(S * (top + 0.03)) + 2
    ground = H - int(S * 0.03)
    im = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    dr = ImageDraw.Draw(im)

    def P(x: float, y: float) -> tuple[float, float]:
        return (S * (mx + x), ground - S * y)

    def poly(pts, fill) -> None:
        dr.polygon([P(x, y) for x, y in pts], fill=fill)

    def rect(x0, y0, x1, y1, fill) -> None:
        (a, b), (c, d) = P(x0, y1), P(x1, y0)
        dr.rectangle([a, b, c, d], fill=fill)

    lw = max(1, round(S * 0.006))
    body, dark, light = _shade(colour, 1.0), _shade(colour, 0.7), _shade(colour + 40, 1.0)
    clear, belt, roof, hood, deck = p["clear"], p["belt"], p["roof"], p["hood"], p["deck"]
    roof_r = roof - p["drop"]
    rtx, ftx = deck + p["rw"], 1 - hood - p["ws"]  # rear / front ends of the roof line

    # Soft ground shadow (semi-transparent; later opaque strokes simply overwrite it).
    (a, b), (c, d) = P(0.03, 0.02), P(0.97, -0.015)
    dr.ellipse([a, b, c, d], fill=(0, 0, 0, 90))

    poly(
        [
            (0.015, clear),
            (0.0, clear + 0.03),
            (0.0, belt - 0.02),
            (0.02, belt + 0.005),
            (deck, belt + 0.01),
            (rtx, roof_r),
            (ftx, roof),
            (1 - hood, belt + 0.005),
            (0.97, belt - 0.005),
            (1.0, belt - 0.03),
            (1.0, clear + 0.03),
            (0.985, clear),
        ],
        body,
    )
    poly([(0.015, clear), (0.985, clear), (0.995, clear + 0.022), (0.005, clear + 0.022)], dark)  # rocker
    dr.line([P(0.02, belt - 0.006), P(0.97, belt - 0.012)], fill=light, width=lw)  # shoulder highlight

    if p["stripe"]:
        sc = (245, 245, 245) if colour.mean() < 140 else (25, 25, 25)
        bands = (
            [(belt - 0.075, belt - 0.058)]
            if p["stripe"] == 1
            else [(belt - 0.085, belt - 0.075), (belt - 0.065, belt - 0.055)]
        )
        for y0, y1 in bands:
            rect(0.01, y0, 0.9, y1, sc)

    # Glass, split into 2 or 3 side windows by pillars placed along the (shorter) roof span.
    gb, gt = belt + 0.012, 0.018
    glass = (int(40 + rng.integers(0, 25)), int(55 + rng.integers(0, 25)), int(70 + rng.integers(0, 30)))
    poly([(deck + 0.03, gb), (rtx + 0.02, roof_r - gt), (ftx - 0.012, roof - gt), (1 - hood - 0.035, gb)], glass)
    fracs = [0.52] if p["windows"] == 2 else [0.3, 0.66]
    doors = [1 - hood - 0.01]
    for fr in fracs:
        x = rtx + 0.02 + fr * (ftx - rtx - 0.032)
        yt = roof_r + (roof - roof_r) * fr
        poly([(x - 0.011, yt), (x + 0.011, yt), (x + 0.001, gb - 0.01), (x - 0.021, gb - 0.01)], dark)
        doors.append(x - 0.01)
    for x in doors:  # door shut lines and handles
        dr.line([P(x, belt - 0.005), P(x, clear + 0.03)], fill=dark, width=lw)
        rect(x - 0.07, belt - 0.03, x - 0.045, belt - 0.022, dark)
    poly([(1 - hood - 0.02, gb), (1 - hood + 0.01, gb), (1 - hood - 0.005, gb + 0.025)], (30, 30, 30))  # mirror

    if p["spoiler"]:
        if deck > 0.12:  # trunk wing
            x1 = 0.01 + min(0.1, deck * 0.6)
            rect(0.005, belt + 0.028, x1, belt + 0.04, (35, 35, 35))
            rect(0.02, belt + 0.005, 0.03, belt + 0.03, (35, 35, 35))
            rect(x1 - 0.025, belt + 0.005, x1 - 0.015, belt + 0.03, (35, 35, 35))
        else:  # roof spoiler overhanging the tailgate
            poly(
                [
                    (rtx - 0.03, roof_r + 0.004),
                    (rtx + 0.08, roof_r + 0.012),
                    (rtx + 0.08, roof_r - 0.006),
                    (rtx - 0.02, roof_r - 0.016),
                ],
                (35, 35, 35),
            )

    # Lights and grille at the nose.
    hl = (250, 245, 205)
    if p["light"] == 0:
        (a, b), (c, d) = P(0.94, belt - 0.012), P(0.985, belt - 0.057)
        dr.ellipse([a, b, c, d], fill=hl, outline=(60, 60, 60), width=lw)
    elif p["light"] == 1:
        (a, b), (c, d) = P(0.935, belt - 0.018), P(0.99, belt - 0.05)
        dr.rectangle([a, b, c, d], fill=hl, outline=(60, 60, 60), width=lw)
    else:
        rect(0.915, belt - 0.034, 0.997, belt - 0.024, hl)
    rect(0.003, belt - 0.06, 0.03, belt - 0.03, (190, 20, 25))  # tail light
    if p["grille"]:
        gx0, gx1, gy0, gy1 = 0.93, 0.994, clear + 0.03, belt - 0.065
        rect(gx0, gy0, gx1, gy1, (30, 30, 32))
        if p["grille"] == 1:  # horizontal bars
            for y in np.linspace(gy0, gy1, 5)[1:-1]:
                dr.line([P(gx0, y), P(gx1, y)], fill=(175, 175, 180), width=2 * lw)
        else:  # mesh
            for y in np.linspace(gy0, gy1, 7)[1:-1]:
                dr.line([P(gx0, y), P(gx1, y)], fill=(150, 150, 155), width=lw)
            for x in np.linspace(gx0, gx1, 6)[1:-1]:
                dr.line([P(x, gy0), P(x, gy1)], fill=(150, 150, 155), width=lw)

    # Wheels: arch, tyre, rim with the class's spoke pattern at a random rotation.
    phase = rng.uniform(0, 2 * np.pi)
    for wx in (p["wb0"], p["wb1"]):
        cx, cy = P(wx, r)
        for rad, fill in ((1.15 * r, (22, 22, 24)), (r, (12, 12, 12))):
            dr.ellipse([cx - S * rad, cy - S * rad, cx + S * rad, cy + S * rad], fill=fill)
        rr = S * r * 0.66
        if p["rim"] == 0:  # solid hubcap
            dr.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(185, 185, 190))
            dr.ellipse([cx - rr * 0.6, cy - rr * 0.6, cx + rr * 0.6, cy + rr * 0.6], outline=(110, 110, 115), width=lw)
        else:
            n_sp, width = {1: (3, 0.32), 2: (5, 0.2), 3: (10, 0.09)}[p["rim"]]
            dr.ellipse(
                [cx - rr, cy - rr, cx + rr, cy + rr],
                fill=(55, 55, 58),
                outline=(190, 190, 195),
                width=max(1, int(rr * 0.14)),
            )
            for k in range(n_sp):
                a = phase + 2 * np.pi * k / n_sp
                dr.line(
                    [(cx, cy), (cx + rr * 0.92 * np.cos(a), cy + rr * 0.92 * np.sin(a))],
                    fill=(190, 190, 195),
                    width=max(1, int(rr * width)),
                )
        hr = rr * 0.22
        dr.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=(150, 150, 155))
    return im, ground


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """One of four cheap random backgrounds (numpy, final resolution)."""
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient at a random angle
        th = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(th) + yy * np.sin(th)
        t = (t - t.min()) / max(1e-6, np.ptp(t))
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
    elif kind == 1:  # sky over ground
        hz = int(h * rng.uniform(0.35, 0.75))
        t = (yy / h)[..., None]
        sky_top, sky_low = rng.uniform([60, 110, 170], [150, 190, 255]), rng.uniform([170, 190, 200], [235, 240, 255])
        arr = sky_top * (1 - t) + sky_low * t
        g = rng.uniform([60, 60, 50], [150, 150, 130]) * rng.uniform(0.6, 1.2, 3)
        arr[hz:] = g * (1 - 0.4 * t[hz:]) + rng.normal(0, 6, (h - hz, w, 1))
    elif kind == 2:  # smooth noise texture
        lo = rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255
        base = np.asarray(Image.fromarray(lo.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        arr = base * rng.uniform(0.4, 1.0) + rng.uniform(0, 120) + rng.normal(0, 8, (h, w, 1))
    else:  # random rectangles ("buildings", signs)
        arr = np.broadcast_to(rng.uniform(0, 255, 3), (h, w, 3)).copy()
        for _ in range(int(rng.integers(4, 14))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
            arr[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _render(m: dict, rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, int]:
    """One photo of model ``m``: returns (RGB image, JPEG quality)."""
    w, h = size
    img = _background(rng, w, h)
    colour = np.clip(_PALETTE[rng.integers(len(_PALETTE))] + rng.normal(0, 10, 3), 0, 255)
    length = int(w * rng.uniform(0.6, 1.0))
    # Draw at 2x and LANCZOS-downsample for anti-aliasing (Pillow premultiplies alpha for RGBA). Rotating after
    # the downsample costs a quarter of the pixels and looks the same.
    car, ground = _draw_car(m, colour, 2 * length, rng)
    car = car.resize(((car.size[0] + 1) // 2, (car.size[1] + 1) // 2), Image.LANCZOS)
    ground //= 2
    angle = float(np.clip(rng.normal(0, 2.5), -6, 6))
    ch0 = car.size[1]
    car = car.rotate(angle, resample=Image.BICUBIC, expand=True)
    ground += (car.size[1] - ch0) // 2
    if rng.random() < 0.5:
        car = car.transpose(Image.FLIP_LEFT_RIGHT)
    cw = car.size[0]
    # Ground line low in the frame, keeping the roof mostly inside it.
    lo, hi = max(0.7 * h, ground - 2), 0.95 * h
    gy = int(rng.uniform(min(lo, hi), hi))
    x0 = int((w - cw) / 2 + rng.uniform(-1, 1) * max(4, (w - cw) / 2))
    img.paste(car, (x0, gy - ground), car)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    arr = np.asarray(img, np.float32)
    mean = arr.mean()
    gain = (rng.uniform(0.75, 1.25) * rng.uniform(0.93, 1.07, 3)).astype(np.float32)  # contrast x white balance
    arr = (arr - mean) * gain + np.float32(mean + rng.uniform(-25, 25))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img, int(rng.integers(60, 96))


# ------------------------------------------------------------------------------------------------------------ API


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(header)
        wr.writerows(rows)


def make_dataset(root: Path | str, spec: SynthSpec | None = None) -> SynthInfo:
    """Generate the dataset under ``root`` (must be missing or empty). Deterministic for ``spec.seed``."""
    spec = spec or SynthSpec()
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"refusing to overwrite non-empty {root}")
    table, merged = _class_table(spec.n_classes, spec.merged_pair)
    n_train = spec.n_classes * spec.train_per_class
    if spec.n_duplicates > n_train:
        raise ValueError(f"n_duplicates={spec.n_duplicates} exceeds the {n_train} train photos")
    w, h = spec.size
    fams: dict[int, list[dict]] = {}
    models = []
    for _, f, v in table:
        if f not in fams:
            fams[f] = _family_models(spec.seed, f)
        models.append(fams[f][v])  # the alias shares (f, v), hence identical parameters

    def folder(name: str) -> str:
        return unicodedata.normalize("NFD", name) if spec.nfd_names else name

    train_dir, test_dir = root / "train", root / "test"
    test_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[int, Path]] = []
    for k, (name, _, _) in enumerate(table):
        d = train_dir / folder(name)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(spec.train_per_class):
            # Streams are keyed by class index, so the alias's photos differ from its partner's.
            img, q = _render(models[k], np.random.default_rng([spec.seed, 2, k, i]), (w, h))
            path = d / f"{i:04d}.jpg"
            img.save(path, "JPEG", quality=q)
            files.append((k, path))

    duplicates: list[tuple[Path, Path]] = []
    extra = [spec.train_per_class] * len(table)
    pick = np.random.default_rng([spec.seed, 5]).choice(len(files), size=spec.n_duplicates, replace=False)
    for j in sorted(int(x) for x in pick):
        k, src = files[j]
        dst = src.parent / f"{extra[k]:04d}.jpg"
        extra[k] += 1
        shutil.copyfile(src, dst)
        duplicates.append((src, dst))

    order = [(k, j) for k in range(len(table)) for j in range(spec.test_per_class)]
    order = [order[i] for i in np.random.default_rng([spec.seed, 4]).permutation(len(order))]
    test_labels: dict[str, str] = {}
    for idx, (k, j) in enumerate(order):
        tid = f"TEST_{idx:05d}"
        img, q = _render(models[k], np.random.default_rng([spec.seed, 3, k, j]), (w, h))
        img.save(test_dir / f"{tid}.jpg", "JPEG", quality=q)
        test_labels[tid] = table[k][0]

    classes = sorted(name for name, _, _ in table)
    # Column order deliberately differs from sorted so consumers must match columns by name.
    cols = [classes[i] for i in np.random.default_rng([spec.seed, 6]).permutation(len(classes))]
    if cols == classes and len(cols) > 1:
        cols = cols[1:] + cols[:1]
    ids = list(test_labels)
    _write_csv(root / "test.csv", ["ID", "img_path"], [[t, f"./test/{t}.jpg"] for t in ids])
    u = repr(1.0 / len(cols))
    _write_csv(root / "sample_submission.csv", ["ID", *cols], [[t, *([u] * len(cols))] for t in ids])
    _write_csv(root / "test_labels.csv", ["ID", "label"], [[t, test_labels[t]] for t in ids])
    return SynthInfo(root=root, classes=classes, merged=merged, duplicates=duplicates, test_labels=test_labels)
