"""Benchmark carclf's data-health step (prepare) on ../shared/data/cars196.

Prints images/s from scratch, the duplicate groups found at the near-duplicate threshold, the time of an
incremental re-run, and writes the HTML report (benchmarks/out/prepare-bench/cars196/report.html).

    python benchmarks/prepare_cars196.py [--data PATH] [--out benchmarks/out/prepare-bench] [--workers 0]
    python benchmarks/prepare_cars196.py --calibrate [--n-photos 400] [--n-classes 196]

``--calibrate`` reproduces the choice of ``carclf.data.dedup.DEFAULT_NEAR_THRESHOLD``: phash distances between real
photos and their near copies (re-encoded, resized, cropped) against distances between distinct photos of one class.
Single process, about half a minute.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cars196"


def _variants(img):
    """Near copies a data set plausibly holds: re-saves, rescales, slight crops, small exposure changes."""
    from PIL import Image, ImageEnhance

    def jpeg(im, q):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    def resize(im, f):
        return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BICUBIC)

    def crop(im, f):
        dx, dy = round(im.width * f), round(im.height * f)
        return im.crop((dx, dy, im.width - dx, im.height - dy))

    return {
        "jpeg_q95": jpeg(img, 95), "jpeg_q70": jpeg(img, 70), "jpeg_q50": jpeg(img, 50),
        "resize_90": jpeg(resize(img, 0.9), 90), "resize_75": jpeg(resize(img, 0.75), 90),
        "resize_50": jpeg(resize(img, 0.5), 90),
        "resize_90_q75": jpeg(resize(img, 0.9), 75),
        "png": img.copy(),
        "brightness_110": jpeg(ImageEnhance.Brightness(img).enhance(1.1), 90),
        "crop_1pc": jpeg(crop(img, 0.01), 90), "crop_2pc": jpeg(crop(img, 0.02), 90),
        "crop_3pc": jpeg(crop(img, 0.03), 90), "crop_5pc": jpeg(crop(img, 0.05), 90),
        "crop_2pc_resize_80_q70": jpeg(resize(crop(img, 0.02), 0.8), 70),
    }


def calibrate(data: Path, n_photos: int, n_classes: int, seed: int = 0) -> dict:
    from carclf.data.dedup import hamming, near_pairs, phash_array
    from carclf.data.imageio import load_rgb
    from carclf.data.manifest import image_hashes

    rng = np.random.default_rng(seed)
    folders = sorted(p for p in (data / "train").iterdir() if p.is_dir())
    folders = [folders[i] for i in sorted(rng.choice(len(folders), min(n_classes, len(folders)), replace=False))]
    files = [(k, f) for k, d in enumerate(folders) for f in sorted(d.glob("*.jpg"))]
    t0 = time.perf_counter()
    hashes = phash_array([image_hashes(load_rgb(f))[1] for _, f in files])
    labels = np.array([k for k, _ in files])
    # Distinct photos of one class: the pairs a too-loose threshold would merge.
    same = [hamming(hashes[i], hashes[i + 1 :][labels[i + 1 :] == labels[i]]) for i in range(len(files))]
    same_d = np.concatenate(same)
    ii, jj, dd = near_pairs(hashes, 16)
    rel = [f"{f.parent.name}/{f.name}" for _, f in files]
    close = sorted((int(d), rel[i], rel[j]) for i, j, d in zip(ii, jj, dd, strict=True) if d <= 8)

    pick = rng.choice(len(files), min(n_photos, len(files)), replace=False)
    near: dict[str, list[int]] = {}
    for i in pick:
        img = load_rgb(files[i][1])
        for name, v in _variants(img).items():
            near.setdefault(name, []).append(int(hamming(hashes[i], phash_array([image_hashes(v)[1]]))[0]))
    all_pairs = np.bincount(dd.astype(np.int64), minlength=17)  # every pair, any class, distance <= 16
    out = {
        "n_photos_hashed": len(files), "n_pairs": len(files) * (len(files) - 1) // 2,
        "n_same_class_pairs": int(len(same_d)),
        "pairs_at_or_below": {t: int(all_pairs[: t + 1].sum()) for t in range(0, 17, 2)},
        "same_class_pairs_at_or_below": {t: int((same_d <= t).sum()) for t in range(0, 17, 2)},
        "near_copies_caught_at": {
            t: {k: round(float(np.mean(np.array(v) <= t)), 3) for k, v in near.items()} for t in range(0, 17, 2)
        },
        "near_copy_distance_p50_p95_max": {
            k: [float(np.percentile(v, 50)), float(np.percentile(v, 95)), int(max(v))] for k, v in near.items()
        },
        "closest_pairs": close,
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "prepare-bench"))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--n-photos", type=int, default=400)
    ap.add_argument("--n-classes", type=int, default=196)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train").is_dir():
        sys.exit(f"{data}/train not found: this benchmark needs ../shared/data/cars196")
    if args.calibrate:
        res = calibrate(data, args.n_photos, args.n_classes)
        close = res.pop("closest_pairs")
        print(json.dumps(res, indent=1))
        print("pairs at distance <= 8 (look at them: true near copies or distinct photos?)")
        for d, a, b in close:
            print(f"  {d:2d}  {a}  |  {b}")
        return

    from carclf.analyze.prepare_report import write_report
    from carclf.data.prepare import prepare

    out = Path(args.out) / data.name
    if out.exists():
        shutil.rmtree(out)  # from scratch: only this benchmark's own folder
    t0 = time.perf_counter()
    p = prepare(data, out, workers=args.workers, log=lambda s: print(s, flush=True))
    first = time.perf_counter() - t0
    s = p.summary
    exact = sum(g.kind == "exact" for g in p.groups)
    print(f"from scratch: {s['counts']['files']} files in {first:.1f} s = {s['counts']['files'] / first:.1f} images/s "
          f"(reading alone {s['images_per_s']:.1f} images/s on {s['workers']} worker(s))")
    print(f"threshold {p.threshold}: {exact} exact and {len(p.groups) - exact} near duplicate groups, "
          f"{s['counts']['cross_class_groups']} cross-class, {s['counts']['train_test_groups']} train/test, "
          f"{len(p.excluded)} training files excluded")
    print(f"timings (s): {s['timings_s']}")
    t0 = time.perf_counter()
    p2 = prepare(data, out, workers=args.workers, log=lambda s: None)
    print(f"incremental re-run: {time.perf_counter() - t0:.1f} s ({p2.summary['n_probed']} files re-read)")
    t0 = time.perf_counter()
    html = write_report(p2, data, out / "report.html")
    print(f"report: {html} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
