"""``Predictor``: the one way to turn images into calibrated probabilities. ``predict``, ``evaluate``, the demo,
serving and export all go through it, so training-time and serving-time preprocessing cannot drift apart.

It loads a run (every completed fold) or an ensemble folder (``ensemble.yaml``: several runs or folds, each with
its own backbone, input size and TTA). Either way it holds a flat list of per-fold *engines* (``.logits(uint8
batch) -> float64 logits`` averaged over the engine's TTA views, ``.dcfg``, ``.views``); everything after the
engines' logits (temperatures, member weights, probability or logit space, final calibration, merged classes) is
numpy here, so an ONNX Runtime engine with the same interface in place of a :class:`TorchFold` gives the same
predictions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carclf.artifacts.run import FULL, RunDir
from carclf.data.dataset import ImageDataset, eval_batches, make_loader
from carclf.data.imageio import ImageSource
from carclf.data.merges import MergeMap, identity
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform
from carclf.errors import CarclfError
from carclf.metrics import calibrate, combine, softmax
from carclf.models.factory import load_fold_model
from carclf.models.forward import batch_logits
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


def _decode_key(dcfg: dict, draft_factor: float, max_pixels: int | None) -> tuple:
    """What decoding and the eval transform depend on (normalisation is the engine's): engines sharing it share
    one decoding pass."""
    return (tuple(dcfg["input_size"]), dcfg.get("interpolation"), float(dcfg.get("crop_pct", 1.0)),
            dcfg.get("crop_mode", "center"), float(draft_factor), max_pixels)


def postprocess(member_probs: Sequence[np.ndarray | None], head: dict[str, Any]) -> np.ndarray:
    """An ensemble's post-processing: each member's probabilities (its folds' tempered softmax, averaged, over its
    model classes) -> expanded by its merge map -> combined -> calibrated. Clipping is left to the submission writer
    (``head['eps']``), as for a run."""
    expanded = [MergeMap.from_dict(m["merge"]).expand(p) if p is not None else None
                for m, p in zip(head["members"], member_probs, strict=True)]
    weights = [m["weight"] for m in head["members"]]
    return calibrate(combine(expanded, weights, head["space"]), head.get("calibration"))


class Predictor:
    """Every completed fold of a run (or every fold of an ensemble's members), its temperature and its eval
    preprocessing.

    A run: per fold, logits (averaged over the TTA views of ``predict.tta``) / T -> softmax; the folds'
    probabilities are averaged, then shared out over the submission's columns (merged and dropped classes).

    An ensemble: the same per member (its folds, its chosen TTA and its member temperature), then each member's
    probabilities are shared out over the submission's columns by its own merge map, combined with the member
    weights in probability or logit space, and calibrated (temperature, vector or matrix); ``eps`` clips the
    submission. That numpy state lives in :attr:`postprocess` (plain data: an export can store it) and
    :attr:`engine_members` (the member of each engine).

    Attributes every caller may use: ``engines`` (flat, one per fold), ``temperatures``, ``eval_sizes``, ``folds``
    (per engine), ``views``, ``output_classes`` (the columns of ``predict``), ``classes`` and ``merge`` (a run: the
    model's classes and its merge map; an ensemble: the submission's classes and the identity), ``cfg`` (a run's
    config; an ensemble's first member's, with ``predict.eps`` set to the ensemble's), ``eps``.
    """

    postprocess: dict[str, Any] | None = None  # None: a run (one member, plain average); see _load_ensemble
    ensemble: dict[str, Any] | None = None  # an ensemble's ensemble.yaml

    def __init__(self, run_dir: Path | str, device: str = "auto", folds: list[int] | None = None) -> None:
        from carclf.artifacts.ensemble import is_ensemble_dir

        self.device = select_device(device)
        if is_ensemble_dir(run_dir):
            if folds is not None:
                raise CarclfError(f"'{run_dir}' is an ensemble: its members' folds are fixed in ensemble.yaml "
                                  "(folds= selects folds of a run)")
            self._load_ensemble(Path(run_dir))
        else:
            self._load_run(run_dir, folds)

    # ----------------------------------------------------------------------------------------------- loading
    def _load_run(self, run_dir: Path | str, folds: list[int] | None) -> None:
        self.run = RunDir.open(run_dir)
        self.run_dir = self.run.path
        self.cfg = self.run.read_config()
        run_meta = self.run.read_meta()
        self.classes: list[str] = run_meta["classes"]  # the model's outputs
        self.merge = self.run.merge_map(run_meta)
        # What predict_* return: every original class name, merged groups shared out by data.merge_split.
        self.output_classes: list[str] = self.merge.original
        # Only completed folds (with out-of-fold logits): an interrupted fold's best.pt is not a finished model.
        # The full-data fit (no out-of-fold photos) only when asked for by folds=[..., FULL].
        chosen = self.run.completed_folds()
        if folds is not None:
            chosen = [k for k in chosen if k in folds]
            if FULL in folds and self.run.has_full():
                chosen.append(FULL)
            if not chosen:
                raise CarclfError(f"'{self.run_dir}' has none of the folds {folds} completed")
        elif self.run.has_full() and self.cfg.predict.full != "off":  # predict.full: beside | instead | off
            chosen = ([] if self.cfg.predict.full == "instead" else chosen) + [FULL]
        self.folds = chosen
        self.incomplete = self.run.incomplete_folds()
        self.temperatures = [self.run.temperature(k) for k in chosen]
        # Each fold predicts at the input size its validation chose (predict.eval_sizes); folds that share a size
        # share one decoding pass.
        self.eval_sizes = [self.run.eval_size(k) or data_config_for(self.cfg)["input_size"][1] for k in chosen]
        self.data_configs = {s: data_config_for(self.cfg, s) for s in sorted(set(self.eval_sizes))}
        self.amp = amp_dtype(self.cfg.train.amp, self.device)
        self.views = policy_views(self.cfg.predict)  # TTA: logits averaged over these views (carclf.tta)
        for k in chosen:  # every checksum before the first (slow) model load
            self.run.fold(k).verify_best()
        self.engines = [
            TorchFold(load_fold_model(self.cfg, self.run.fold(k).best, len(self.classes), self.device),
                      self.data_configs[s], self.views, self.device, self.amp, self.cfg.train.channels_last)
            for k, s in zip(chosen, self.eval_sizes, strict=True)
        ]

    def _load_ensemble(self, path: Path) -> None:
        """Members with a weight > 0, each fold's checkpoint checked against its sha256 in ensemble.yaml."""
        from carclf.artifacts.ensemble import load_calibration, member_run, read_ensemble, verify_checksum

        doc = read_ensemble(path)
        self.ensemble = doc
        self.run = None
        self.run_dir = path
        self.output_classes = list(doc["classes"])
        self.classes = list(self.output_classes)
        self.merge = identity(self.output_classes)  # predict() returns the submission's columns already
        self.incomplete = []
        self.engines, self.temperatures, self.eval_sizes, self.folds, self.engine_names = [], [], [], [], []
        self.engine_members: list[int] = []
        self.data_configs: dict[Any, dict] = {}
        members, first_cfg = [], None
        used = [m for m in doc["members"] if float(m["weight"]) > 0]
        if not used:
            raise CarclfError(f"{path / 'ensemble.yaml'}: no member has a weight above 0")
        runs = [RunDir.open(member_run(path, m)) for m in used]
        self.member_runs = runs  # per used member (export finds each engine's OOF and training photos there)
        for m, rd in zip(used, runs, strict=True):  # every checksum before the first (slow) model load
            for k in m["folds"]:
                verify_checksum(path, m, k, rd.fold(int(k)).best)
                # The file is the one the ensemble recorded; and that, the one training wrote (no second hash).
                rd.fold(int(k)).verify_best(m["best_sha256"][k])
        for mi, (m, rd) in enumerate(zip(used, runs, strict=True)):
            cfg = rd.read_config()
            meta = rd.read_meta()
            classes = meta["classes"]
            merge = rd.merge_map(meta)
            if list(merge.original) != self.output_classes:
                raise CarclfError(f"{path / 'ensemble.yaml'}: member {m['name']}'s run '{rd.path}' now has other "
                                  "classes than when the ensemble was made: rebuild the ensemble")
            first_cfg = first_cfg or cfg
            amp = amp_dtype(cfg.train.amp, self.device)
            for k in m["folds"]:
                best = rd.fold(int(k)).best
                size = int(m.get("eval_sizes", {}).get(k, 0)) or data_config_for(cfg)["input_size"][1]
                dcfg = data_config_for(cfg, size)
                self.data_configs.setdefault((m["name"], size), dcfg)
                self.engines.append(TorchFold(load_fold_model(cfg, best, len(classes), self.device), dcfg,
                                              list(m["views"]), self.device, amp, cfg.train.channels_last))
                self.temperatures.append(float(m["temperature"]))
                self.eval_sizes.append(size)
                self.folds.append(int(k))
                self.engine_names.append(f"{m['name']}/fold{k}")
                self.engine_members.append(mi)
            members.append({"name": m["name"], "merge": merge.to_dict(), "weight": float(m["weight"]),
                            "decode": {"draft_factor": cfg.data.draft_factor, "max_pixels": cfg.data.max_pixels}})
        self.cfg = copy.deepcopy(first_cfg)  # batch size and loader workers of the first member
        self.cfg.predict.eps = float(doc["eps"])
        self.amp = amp_dtype(self.cfg.train.amp, self.device)
        self.views = list(dict.fromkeys(v for m in used for v in m["views"]))  # per engine: engine.views
        self.postprocess = {
            "engine_members": list(self.engine_members), "members": members, "space": doc["space"],
            "calibration": load_calibration(path, doc["calibration"]), "eps": float(doc["eps"]),
        }

    # ----------------------------------------------------------------------------------------------- state
    @property
    def eps(self) -> float:
        """The submission's clipping: an ensemble's chosen value, else the run's ``predict.eps``."""
        return float(self.postprocess["eps"]) if self.postprocess else float(self.cfg.predict.eps)

    @property
    def calibrated(self) -> bool:
        if self.postprocess:
            return True  # the ensemble step fitted (or deliberately kept at 1) every temperature
        return any(t != 1.0 for t in self.temperatures)

    @property
    def partly_calibrated(self) -> bool:
        return self.calibrated and not self.postprocess and any(t == 1.0 for t in self.temperatures)

    def describe(self) -> str:
        """One line for the log: what predicts."""
        if not self.postprocess:
            return (f"{len(self.engines)} fold(s) {self.folds}, TTA views {','.join(self.views)}, temperatures "
                    f"{', '.join(f'{t:.3f}' for t in self.temperatures)}"
                    + ("" if self.calibrated else " (not calibrated: run carclf calibrate first for better log loss)")
                    + (" (some folds not calibrated: run carclf calibrate again)" if self.partly_calibrated else ""))
        head = self.postprocess
        parts = []
        for mi, m in enumerate(head["members"]):
            idx = [i for i, e in enumerate(head["engine_members"]) if e == mi]
            parts.append(f"{m['name']} x{m['weight']:.3f} ({len(idx)} fold(s), TTA "
                         f"{','.join(self.engines[idx[0]].views)}, T {self.temperatures[idx[0]]:.3f})")
        cal = head["calibration"]
        return (f"ensemble of {len(parts)} member(s), {len(self.engines)} engine(s), {head['space']} space: "
                + "; ".join(parts) + f"; final calibration {cal.get('kind', 'none')}, eps {head['eps']:g}")

    def _decode_params(self, i: int) -> tuple[float, int | None]:
        if self.postprocess and "decode" in self.postprocess["members"][0]:
            d = self.postprocess["members"][self._member_of(i)]["decode"]
            return float(d["draft_factor"]), d["max_pixels"]
        return float(self.cfg.data.draft_factor), self.cfg.data.max_pixels

    def _member_of(self, i: int) -> int:
        return int(self.postprocess["engine_members"][i]) if self.postprocess else 0

    # ----------------------------------------------------------------------------------------------- predicting
    def _group_probs(self, loader, engines: list[int], progress: bool, label: str, batches: int
                     ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """One pass over the photos: per member, the sum of the tempered probabilities of its engines in this group,
        on each batch (decoding once, not once per engine)."""
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"predict @ {label}", total=batches, leave=False, dynamic_ncols=True,
                          disable=None)
        members = sorted({self._member_of(i) for i in engines})
        probs: dict[int, list] = {m: [] for m in members}
        idx, oks = [], []
        for x, _, i, ok in loader:
            batch: dict[int, Any] = {m: 0.0 for m in members}
            for e in engines:
                batch[self._member_of(e)] = batch[self._member_of(e)] + softmax(self.engines[e].logits(x),
                                                                                self.temperatures[e])
            for m in members:
                probs[m].append(batch[m])
            idx.append(i.numpy())
            oks.append(ok.numpy().astype(bool))
        order = np.argsort(np.concatenate(idx))
        return {m: np.concatenate(p)[order] for m, p in probs.items()}, np.concatenate(oks)[order]

    def predict(
        self, sources: Sequence[ImageSource], progress: bool = False, num_workers: int | None = None,
        fill_bad: bool = True,
    ) -> tuple[np.ndarray, list[int]]:
        """Probabilities (rows = ``sources``, columns = ``self.output_classes``) and the positions of the photos that
        failed to decode. Sources are paths or encoded bytes (or binary file objects): the same decoding either way.

        With ``fill_bad`` a failed photo gets the mean prediction of the others (the class prior the model sees),
        never a crash; without, its row is NaN."""
        workers = self.cfg.data.num_workers if num_workers is None else num_workers
        groups: dict[tuple, list[int]] = {}
        for i, engine in enumerate(self.engines):  # read at call time: engines may have been swapped (ONNX)
            groups.setdefault(_decode_key(engine.dcfg, *self._decode_params(i)), []).append(i)
        sums: dict[int, Any] = {}
        ok = np.ones(len(sources), dtype=bool)
        for key, engines in groups.items():
            dcfg = self.engines[engines[0]].dcfg
            draft, max_pixels = self._decode_params(engines[0])
            ds = ImageDataset(sources, None, eval_transform(dcfg), int(dcfg["input_size"][1]), draft,
                              max_pixels=max_pixels)
            bs = self.cfg.predict.batch_size
            loader = (make_loader(ds, bs, workers, pin_memory=self.device.type == "cuda") if workers
                      else eval_batches(ds, bs))  # in this thread: no DataLoader overhead (the service's batches)
            label = f"{key[0][1]}px" if key[0][1] == key[0][2] else f"{key[0][1]}x{key[0][2]}px"
            part, ok_group = self._group_probs(loader, engines, progress, label, -(-len(ds) // bs))
            for m, p in part.items():
                sums[m] = sums.get(m, 0.0) + p
            ok &= ok_group
        counts = np.bincount([self._member_of(i) for i in range(len(self.engines))])
        member_probs = [sums[m] / counts[m] for m in range(len(counts))]
        probs = (postprocess(member_probs, self.postprocess) if self.postprocess
                 else self.merge.expand(member_probs[0]))
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
