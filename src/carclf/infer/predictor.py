"""``Predictor``: the one way to turn images into calibrated probabilities. ``predict``, the demo and (to come)
serving and export all go through it, so training-time and serving-time preprocessing cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from carclf.analyze.metrics import softmax
from carclf.data.dataset import ImageDataset, make_loader
from carclf.data.imageio import ImageSource
from carclf.data.merges import MergeMap, identity
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform
from carclf.errors import CarclfError
from carclf.models.factory import load_fold_model
from carclf.models.forward import batch_logits
from carclf.rundir import RunDir
from carclf.runtime import amp_dtype, select_device
from carclf.tta import policy_views


class TorchFold:
    """One fold's PyTorch model as an engine: a uint8 batch -> logits averaged over the TTA views.

    The Predictor only talks to engines through :meth:`logits`, so another runtime (ONNX Runtime) or another
    member of an ensemble plugs in beside it with the same preprocessing."""

    engine = "torch"

    def __init__(self, model: torch.nn.Module, dcfg: dict, views: list[str], device: torch.device,
                 amp: torch.dtype | None, channels_last: bool) -> None:
        self.model, self.dcfg, self.views = model, dcfg, views
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.normalize = batch_normalize(dcfg)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Float64 logits (batch, classes) of a uint8 NCHW batch."""
        return batch_logits(self.model, x, self.device, self.normalize, self.views, self.amp,
                            self.channels_last).double().cpu().numpy()


class Predictor:
    """Every completed fold of a run, its temperature, and the run's eval preprocessing.

    Per fold: logits (averaged over the TTA views of ``predict.tta``) / T -> softmax; the folds' probabilities are
    averaged, then shared out over the submission's columns (merged and dropped classes). Each fold is an engine
    (:class:`TorchFold`, or an ONNX Runtime session) grouped by the input size its validation chose.
    """

    def __init__(self, run_dir: Path | str, device: str = "auto", folds: list[int] | None = None) -> None:
        self.run = RunDir.open(run_dir)
        self.run_dir = self.run.path
        self.cfg = self.run.read_config()
        run_meta = self.run.read_meta()
        self.classes: list[str] = run_meta["classes"]  # the model's outputs
        self.merge = MergeMap.from_dict(run_meta["merge"]) if "merge" in run_meta else identity(self.classes)
        # What predict_* return: every original class name, merged groups shared out by data.merge_split.
        self.output_classes: list[str] = self.merge.original
        self.device = select_device(device)
        # Only completed folds (with out-of-fold logits): an interrupted fold's best.pt is not a finished model.
        chosen = self.run.completed_folds()
        if folds is not None:
            chosen = [k for k in chosen if k in folds]
            if not chosen:
                raise CarclfError(f"'{self.run_dir}' has none of the folds {folds} completed")
        self.folds = chosen
        self.incomplete = self.run.incomplete_folds()
        self.temperatures = [self.run.temperature(k) for k in chosen]
        # Each fold predicts at the input size its validation chose (predict.eval_sizes); folds that share a size
        # share one decoding pass.
        self.eval_sizes = [self.run.eval_size(k) or data_config_for(self.cfg)["input_size"][1] for k in chosen]
        self.data_configs = {s: data_config_for(self.cfg, s) for s in sorted(set(self.eval_sizes))}
        self.amp = amp_dtype(self.cfg.train.amp, self.device)
        self.views = policy_views(self.cfg.predict)  # TTA: logits averaged over these views (carclf.tta)
        self.engines = [
            TorchFold(load_fold_model(self.cfg, self.run.fold(k).best, len(self.classes), self.device),
                      self.data_configs[s], self.views, self.device, self.amp, self.cfg.train.channels_last)
            for k, s in zip(chosen, self.eval_sizes, strict=True)
        ]

    @property
    def models(self) -> list:
        """The fold engines (kept under their old name: one per completed fold)."""
        return self.engines

    @property
    def calibrated(self) -> bool:
        return any(t != 1.0 for t in self.temperatures)

    @property
    def partly_calibrated(self) -> bool:
        return self.calibrated and any(t == 1.0 for t in self.temperatures)

    def _probs(self, loader, size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """One pass over the photos at input ``size``: the sum of the probabilities of every fold engine that
        predicts at that size, on each batch (decoding once, not once per fold)."""
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"predict @ {size}px", leave=False, dynamic_ncols=True, disable=None)
        members = [(e, t) for e, t, s in zip(self.engines, self.temperatures, self.eval_sizes, strict=True)
                   if s == size]
        probs, idx, oks = [], [], []
        for x, _, i, ok in loader:
            p = 0.0
            for engine, t in members:
                p = p + softmax(engine.logits(x), t)
            probs.append(p)
            idx.append(i.numpy())
            oks.append(ok.numpy().astype(bool))
        order = np.argsort(np.concatenate(idx))
        return np.concatenate(probs)[order], np.concatenate(oks)[order]

    def predict(
        self, sources: Sequence[ImageSource], progress: bool = False, num_workers: int | None = None,
        fill_bad: bool = True,
    ) -> tuple[np.ndarray, list[int]]:
        """Probabilities (rows = ``sources``, columns = ``self.output_classes``) and the positions of the photos that
        failed to decode. Sources are paths or encoded bytes (or binary file objects): the same decoding either way.

        With ``fill_bad`` a failed photo gets the mean prediction of the others (the class prior the model sees),
        never a crash; without, its row is NaN."""
        workers = self.cfg.data.num_workers if num_workers is None else num_workers
        total, ok = 0.0, np.ones(len(sources), dtype=bool)
        for size, dcfg in self.data_configs.items():
            ds = ImageDataset(sources, None, eval_transform(dcfg), size, self.cfg.data.draft_factor,
                              max_pixels=self.cfg.data.max_pixels)
            loader = make_loader(ds, self.cfg.predict.batch_size, workers, pin_memory=self.device.type == "cuda")
            p, ok_size = self._probs(loader, size, progress)
            total, ok = total + p, ok & ok_size
        probs = self.merge.expand(total / len(self.engines))
        bad = np.where(~ok)[0].tolist()
        if bad:
            if fill_bad:
                n = len(self.output_classes)
                probs[~ok] = probs[ok].mean(axis=0) if ok.any() else np.full(n, 1 / n)
            else:
                probs[~ok] = np.nan
        return probs, bad

    def predict_paths(self, paths: list[Path], progress: bool = False, num_workers: int | None = None):
        """:meth:`predict` over files; returns the probabilities and the paths that failed to decode."""
        probs, bad = self.predict(paths, progress, num_workers)
        return probs, [str(paths[i]) for i in bad]

    def predict_images(self, images: Sequence[ImageSource], fill_bad: bool = False) -> tuple[np.ndarray, list[int]]:
        """:meth:`predict` over photos in memory (encoded bytes, as an upload arrives), in this process."""
        return self.predict(images, num_workers=0, fill_bad=fill_bad)
