"""Penultimate features of out-of-fold photos for the report's embedding map and feature-space groups.

Runs trained before ``oof.npz`` kept ``features`` get them computed once from their fold models (each fold on its
own validation photos, at its chosen input size, first TTA view: what training stores now) and cached in the
report folder; the cache is used again while the fold checkpoints and the photo list are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from carclf.artifacts.oof import OofSet
from carclf.errors import CarclfError
from carclf.io import atomic_savez

MAX_TSNE_POINTS = 5000  # t-SNE (Barnes-Hut) of 8,000 photos takes minutes on 2 cores; a stratified sample shows
#                         the same structure


def _fingerprint(run_dir: Path, folds: list[int], paths: np.ndarray) -> str:
    from carclf.artifacts.run import RunDir

    rd = RunDir.open(run_dir)
    parts = []
    for k in folds:
        st = rd.fold(k).best.stat()
        parts.append([k, st.st_size, st.st_mtime_ns, rd.eval_size(k)])
    digest = hashlib.sha1("\n".join(map(str, paths.tolist())).encode()).hexdigest()
    return json.dumps({"folds": parts, "paths": digest})


def cached_features(cache: Path, run_dir: Path, oof: OofSet) -> np.ndarray | None:
    if not cache.is_file():
        return None
    folds = sorted(set(oof.folds.tolist()))
    try:
        with np.load(cache) as z:
            if str(z["key"]) != _fingerprint(run_dir, folds, oof.paths):
                return None
            return z["features"].astype(np.float32)
    except (OSError, KeyError, ValueError):
        return None  # a damaged cache is computed again


def compute_features(run_dir: Path, oof: OofSet, data_root: Path, cache: Path, device: str = "auto",
                     log: Callable[[str], None] = print) -> tuple[np.ndarray, int]:
    """(features (n, dim) float32 with NaN rows for photos that could not be read, count of such photos), from
    the cache when it is current."""
    hit = cached_features(cache, run_dir, oof)
    if hit is not None:
        log(f"features: from the cache {cache}")
        n_bad = int((~np.isfinite(hit).all(axis=1)).sum())
        return hit, n_bad
    from carclf.artifacts.photos import DataDisk
    from carclf.data.dataset import ImageDataset, make_loader
    from carclf.data.transforms import eval_transform
    from carclf.infer.predictor import Predictor
    from carclf.models.forward import infer_view_logits

    pred = Predictor.from_run(run_dir, device=device, folds=sorted(set(oof.folds.tolist())))
    cfg = pred.cfg
    disk = DataDisk(data_root)
    out: np.ndarray | None = None
    for engine, k, size in zip(pred.engines, pred.folds, pred.eval_sizes, strict=True):
        rows = np.where(oof.folds == k)[0]
        log(f"features: fold {k}, {len(rows)} photos at {size} px (the run predates stored features; cached in "
            f"{cache.parent})")
        sources = [disk.photo(str(oof.paths[i])) for i in rows]
        ds = ImageDataset(sources, None, eval_transform(engine.dcfg), size, cfg.data.draft_factor,
                          max_pixels=cfg.data.max_pixels)
        loader = make_loader(ds, cfg.predict.batch_size, cfg.data.num_workers)
        _, idx, ok, feats = infer_view_logits(engine.model, loader, engine.device, engine.normalize,
                                              engine.views[:1], engine.amp, engine.channels_last, features=True)
        if out is None:
            out = np.full((len(oof), feats.shape[1]), np.nan, dtype=np.float32)
        f = feats.astype(np.float32)
        f[~ok] = np.nan
        out[rows[idx]] = f
    if out is None:
        raise CarclfError(f"'{run_dir}': no completed fold to compute features with")
    atomic_savez(cache, key=np.array(_fingerprint(run_dir, pred.folds, oof.paths)), paths=oof.paths.astype(str),
                 features=out.astype(np.float16))
    out = out.astype(np.float16).astype(np.float32)  # what the cache will give next time
    return out, int((~np.isfinite(out).all(axis=1)).sum())


def tsne_map(features: np.ndarray, labels: np.ndarray, seed: int = 0,
             max_points: int = MAX_TSNE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(2-D t-SNE coordinates, the row indices they belong to): PCA to 50 dimensions first (scikit-learn's advice
    for t-SNE), at most ``max_points`` rows (a sample stratified by class)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rows = np.where(np.isfinite(features).all(axis=1))[0]
    if len(rows) > max_points:  # the same share of every class
        rng = np.random.default_rng(seed)
        frac = max_points / len(rows)
        keep = [rng.permutation(rows[labels[rows] == c])[: max(1, round(frac * (labels[rows] == c).sum()))]
                for c in np.unique(labels[rows])]
        rows = np.sort(np.concatenate(keep))
    from threadpoolctl import threadpool_limits

    x = features[rows].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_comp = min(50, x.shape[0], x.shape[1])
    perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
    # One thread: in a process that has run torch, torch's OpenMP runtime and scikit-learn's spin against each
    # other, and t-SNE's gradient loop slows down 5-100x (measured: 1,500 photos 96 s with 2 threads, 22 s with 1).
    with threadpool_limits(limits=1):
        x = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    return xy, rows
