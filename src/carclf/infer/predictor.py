"""``Predictor``: the one way to turn images into calibrated probabilities (``predict`` and the demo use it; serving
and export are to go through it too, so training-time and serving-time preprocessing cannot drift apart)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from carclf.calibrate.temperature import fold_dirs, fold_number, read_temperature
from carclf.config import read_config
from carclf.data.dataset import ImageDataset
from carclf.data.imageio import to_rgb
from carclf.data.merges import MergeMap, identity
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform
from carclf.errors import CarclfError
from carclf.infer.engine import batch_logits
from carclf.models.factory import load_fold_model
from carclf.train.runtime import amp_dtype, select_device


class Predictor:
    """Every trained fold of a run, its temperature, and the run's eval preprocessing.

    Per fold: logits (averaged over the photo and its mirror when ``predict.tta_hflip``) / T -> softmax; the folds'
    probabilities are averaged.
    """

    def __init__(self, run_dir: Path | str, device: str = "auto", folds: list[int] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = read_config(self.run_dir / "config.yaml")
        meta = self.run_dir / "run.json"
        if not meta.is_file():
            raise CarclfError(f"'{meta}' not found: '{self.run_dir}' was never trained")
        run_meta = json.loads(meta.read_text(encoding="utf-8"))
        self.classes: list[str] = run_meta["classes"]  # the model's outputs
        self.merge = MergeMap.from_dict(run_meta["merge"]) if "merge" in run_meta else identity(self.classes)
        # What predict_* return: every original class name, merged groups shared out by data.merge_split.
        self.output_classes: list[str] = self.merge.original
        self.device = select_device(device)
        # Only completed folds (with out-of-fold logits): an interrupted fold's best.pt is not a finished model.
        dirs = fold_dirs(self.run_dir)
        if folds is not None:
            dirs = [d for d in dirs if fold_number(d) in folds]
            if not dirs:
                raise CarclfError(f"'{self.run_dir}' has none of the folds {folds} completed")
        self.folds = [fold_number(d) for d in dirs]
        self.temperatures = [read_temperature(d) for d in dirs]
        self.models = [load_fold_model(self.cfg, d / "best.pt", len(self.classes), self.device) for d in dirs]
        self.data_config = data_config_for(self.cfg)
        self.transform = eval_transform(self.data_config)
        self.normalize = batch_normalize(self.data_config)
        self.amp = amp_dtype(self.cfg.train.amp, self.device)

    @property
    def calibrated(self) -> bool:
        return any(t != 1.0 for t in self.temperatures)

    @property
    def partly_calibrated(self) -> bool:
        return self.calibrated and any(t == 1.0 for t in self.temperatures)

    @torch.inference_mode()
    def _probs(self, loader, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """One pass over the photos, every fold model on each batch (decoding once, not once per fold)."""
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc="predict", leave=False, dynamic_ncols=True, disable=None)
        probs, idx, oks = [], [], []
        for x, _, i, ok in loader:
            p = 0.0
            for model, t in zip(self.models, self.temperatures, strict=True):
                logits = batch_logits(model, x, self.device, self.normalize, self.cfg.predict.tta_hflip, self.amp,
                                      self.cfg.train.channels_last)
                p = p + torch.softmax(logits.double() / t, dim=1).cpu().numpy()
            probs.append(p / len(self.models))
            idx.append(i.numpy())
            oks.append(ok.numpy().astype(bool))
        order = np.argsort(np.concatenate(idx))
        return self.merge.expand(np.concatenate(probs)[order]), np.concatenate(oks)[order]

    def predict_paths(self, paths: list[Path], progress: bool = False, num_workers: int | None = None):
        """Probabilities (rows = paths, columns = ``self.output_classes``) and the list of photos that failed to decode.

        A failed photo gets the mean prediction of the others (the class prior the model sees), never a crash."""
        size = self.data_config["input_size"][-1]
        ds = ImageDataset(paths, None, self.transform, size, self.cfg.data.draft_factor,
                          max_pixels=self.cfg.data.max_pixels)
        workers = self.cfg.data.num_workers if num_workers is None else num_workers
        loader = DataLoader(ds, batch_size=self.cfg.predict.batch_size, num_workers=workers)
        probs, ok = self._probs(loader, progress)
        bad = [str(paths[i]) for i in np.where(~ok)[0]]
        if bad:
            n = len(self.output_classes)
            prior = probs[ok].mean(axis=0) if ok.any() else np.full(n, 1 / n)
            probs[~ok] = prior
        return probs, bad

    def predict_images(self, images: list) -> np.ndarray:
        """Probabilities for PIL images already in memory (the serving path)."""
        x = torch.stack([self.transform(to_rgb(img)) for img in images])
        loader = [(x, torch.zeros(len(x)), torch.arange(len(x)), torch.ones(len(x), dtype=torch.bool))]
        return self._probs(loader, progress=False)[0]
