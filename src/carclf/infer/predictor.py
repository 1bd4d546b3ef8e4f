"""``Predictor``: the one way to turn images into calibrated probabilities. ``predict``, ``evaluate``, the demo,
serving and export all go through it, so training-time and serving-time preprocessing cannot drift apart.

A Predictor is built from plain parts (its constructor): a flat list of per-fold *engines* (:class:`Engine`: a uint8
batch -> float64 logits averaged over the engine's TTA views), a temperature per engine, the model's classes and
merge map, the run's config, and for an ensemble its post-processing head (member weights, probability or logit
space, final calibration, member merges: plain data an export stores). Everything after the engines' logits is
numpy here, so ONNX Runtime engines in place of :class:`TorchFold` give the same predictions.

Where the parts come from: :meth:`Predictor.from_run` (every completed fold of a run), :meth:`Predictor.from_ensemble`
(``ensemble.yaml``), :meth:`Predictor.from_export` (``export.yaml`` and its ONNX graphs alone); :meth:`Predictor.open`
picks one by what the path is (:func:`carclf.artifacts.resolve.kind_of`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from carclf.artifacts.resolve import ENSEMBLE, EXPORT, RUN, kind_of
from carclf.artifacts.run import FULL, RunDir
from carclf.config import Config
from carclf.data.dataset import ImageDataset, eval_batches, make_loader
from carclf.data.imageio import ImageSource
from carclf.data.merges import MergeMap, identity
from carclf.data.transforms import batch_normalize, data_config_for, eval_transform
from carclf.errors import CarclfError
from carclf.io import file_sha256
from carclf.metrics import calibrate, combine, softmax
from carclf.models.factory import load_fold_model
from carclf.models.forward import batch_logits
from carclf.runtime import amp_dtype, select_device
from carclf.tta import policy_views

ENGINES = ("torch", "onnx")


@runtime_checkable
class Engine(Protocol):
    """What the Predictor needs of one fold's model (:class:`TorchFold`, :class:`~carclf.infer.onnx_engine.OnnxFold`):
    everything before (decoding, the eval transform) and after (temperature, averaging, calibration) is its own."""

    engine: str  # "torch" or "onnx": what the answers say the model ran on
    dcfg: dict[str, Any]  # timm data config: input size, crop and interpolation of the eval transform; normalisation
    views: list[str]  # the TTA views the logits are averaged over (carclf.tta)

    def logits(self, x: Any) -> np.ndarray:
        """Float64 (batch, classes) logits of a uint8 NCHW batch (a torch tensor or a numpy array)."""
        ...


class TorchFold:
    """One fold's PyTorch model as an :class:`Engine`: a uint8 batch -> logits averaged over the TTA views."""

    engine = "torch"

    def __init__(self, model: torch.nn.Module, dcfg: dict, views: list[str], device: torch.device,
                 amp: torch.dtype | None, channels_last: bool) -> None:
        self.model, self.dcfg, self.views = model, dcfg, views
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.normalize = batch_normalize(dcfg)

    @torch.inference_mode()
    def logits(self, x: Any) -> np.ndarray:
        """Float64 logits (batch, classes) of a uint8 NCHW batch (a torch tensor or a numpy array)."""
        return batch_logits(self.model, torch.as_tensor(x), self.device, self.normalize, self.views, self.amp,
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


# ------------------------------------------------------------------------------------------------- the version
def spec_version(spec_file: Path) -> str:
    """The version of a model described by one spec file (``export.yaml``, ``ensemble.yaml``): the first 12 hex
    digits of its SHA-256. The spec pins every weight file by its checksum, the temperatures, the preprocessing and
    the post-processing, so any change to what predicts changes it."""
    return file_sha256(spec_file)[:12]


def run_version(weights_sha256: Sequence[str], folds: Sequence[int], temperatures: Sequence[float],
                eval_sizes: Sequence[int], views: Sequence[str], output_classes: Sequence[str]) -> str:
    """The version of a run's Predictor (a run has no one spec file): a hash of what such a file would pin, each
    fold's weights, temperature and input size, the TTA views and the output classes (the value serve computed)."""
    h = hashlib.sha256()
    for sha, k, t, s in zip(weights_sha256, folds, temperatures, eval_sizes, strict=True):
        h.update(sha.encode())
        h.update(f"{k}:{t!r}:{s}".encode())
    h.update(",".join(views).encode())
    h.update("\n".join(output_classes).encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------- the predictor
@dataclass(eq=False)
class Predictor:
    """Engines, their temperatures and the numpy code after them.

    A run: per fold, logits (averaged over the TTA views of ``predict.tta``) / T -> softmax; the folds'
    probabilities are averaged, then shared out over the submission's columns (merged and dropped classes).

    An ensemble: the same per member (its folds, its chosen TTA and its member temperature), then each member's
    probabilities are shared out over the submission's columns by its own merge map, combined with the member
    weights in probability or logit space, and calibrated (temperature, vector or matrix): the head in
    :attr:`postprocess` (``engine_members``: the member of each engine; ``members``: name, merge, weight, decoding;
    ``space``, ``calibration``, ``eps``).
    """

    engines: list[Engine]  # one per fold (an ensemble: per fold of every member with a weight above 0)
    temperatures: list[float]  # per engine: its logits are divided by this before the softmax
    folds: list[int]  # per engine: its fold (FULL: the full-data fit)
    eval_sizes: list[int]  # per engine: the input height its validation chose
    classes: list[str]  # the engines' outputs (an ensemble: the submission's classes)
    merge: MergeMap  # classes -> output_classes (an ensemble: the identity; its members' merges are in the head)
    cfg: Config  # batch size, loader workers, decoding (data.draft_factor, data.max_pixels), predict.eps
    version: str  # the model's version: spec_version (export, ensemble) or run_version (run)
    postprocess: dict[str, Any] | None = None  # an ensemble's head (see the class docstring); None: a run
    kind: str = RUN  # what was opened: run, ensemble or export
    source: Path | None = None  # the folder opened
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # what the engines run at (an export: fp32, bf16 or int8; carclf.infer.precision)
    runs: list[RunDir | None] = field(default_factory=list)  # per engine, the run that trained it (None: unknown)
    incomplete: list[int] = field(default_factory=list)  # a run's unfinished folds (not predicting)

    def __post_init__(self) -> None:
        n = len(self.engines)
        if not n or {len(self.temperatures), len(self.folds), len(self.eval_sizes)} != {n}:
            raise ValueError(f"a Predictor needs one temperature, fold and eval size per engine ({n} engines)")
        if self.postprocess and len(self.postprocess["engine_members"]) != n:
            raise ValueError("the post-processing head names the member of every engine")
        self.runs = list(self.runs) or [None] * n
        self.source = Path(self.source) if self.source is not None else None

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def open(cls, path: Path | str, device: str = "auto", folds: list[int] | None = None,
             precision: str | None = None, threads: int | None = None) -> Predictor:
        """The Predictor of a run directory, an ensemble folder or an export folder, whichever ``path`` is."""
        kind = kind_of(path)
        if folds is not None and kind in (ENSEMBLE, EXPORT):
            fixed = ("its members' folds are fixed in ensemble.yaml" if kind == ENSEMBLE
                     else "its engines are fixed in export.yaml")
            raise CarclfError(f"'{path}' is an {kind}: {fixed} (folds= selects folds of a run)")
        if kind == EXPORT:
            return cls.from_export(path, precision, threads)
        if kind == ENSEMBLE:
            return cls.from_ensemble(path, device)
        return cls.from_run(path, device, folds)  # not a run either: RunDir.open says why

    @classmethod
    def from_run(cls, path: Path | str, device: str = "auto", folds: list[int] | None = None) -> Predictor:
        """Every completed fold of a run (``folds``: only those; FULL among them adds the full-data fit)."""
        dev = select_device(device)
        run = RunDir.open(path)
        cfg = run.read_config()
        meta = run.read_meta()
        chosen = _run_folds(run, cfg, folds)
        temperatures = [run.temperature(k) for k in chosen]
        # Each fold predicts at the input size its validation chose (predict.eval_sizes); folds that share a size
        # share one decoding pass.
        sizes = [run.eval_size(k) or data_config_for(cfg)["input_size"][1] for k in chosen]
        weights = []
        for k in chosen:  # every checksum before the first (slow) model load; the hash is also the version's
            weights.append(file_sha256(run.fold(k).best))
            run.fold(k).verify_best(weights[-1])
        dcfgs = {s: data_config_for(cfg, s) for s in set(sizes)}
        views = policy_views(cfg.predict)  # TTA: logits averaged over these views (carclf.tta)
        amp = amp_dtype(cfg.train.amp, dev)
        engines = [TorchFold(load_fold_model(cfg, run.fold(k).best, len(meta["classes"]), dev), dcfgs[s], views, dev,
                             amp, cfg.train.channels_last) for k, s in zip(chosen, sizes, strict=True)]
        merge = run.merge_map(meta)
        return cls(engines, temperatures, chosen, sizes, list(meta["classes"]), merge, cfg,
                   run_version(weights, chosen, temperatures, sizes, views, merge.original), kind=RUN,
                   source=run.path, device=dev, runs=[run] * len(chosen), incomplete=run.incomplete_folds())

    @classmethod
    def from_ensemble(cls, path: Path | str, device: str = "auto") -> Predictor:
        """Members with a weight > 0, each fold's checkpoint checked against its sha256 in ensemble.yaml."""
        from carclf.artifacts.ensemble import ENSEMBLE_FILE, load_calibration, member_run, read_ensemble

        dev = select_device(device)
        path = Path(path)
        doc = read_ensemble(path)
        used = [m for m in doc["members"] if float(m["weight"]) > 0]
        if not used:
            raise CarclfError(f"{path / ENSEMBLE_FILE}: no member has a weight above 0")
        runs = [RunDir.open(member_run(path, m)) for m in used]
        _verify_members(path, used, runs)
        output_classes = list(doc["classes"])
        engines, temperatures, sizes, folds, engine_members, members, cfgs = [], [], [], [], [], [], []
        for mi, (m, rd) in enumerate(zip(used, runs, strict=True)):
            cfg, merge, parts = _member_engines(path, m, rd, dev, output_classes)
            for engine, k, size in parts:
                engines.append(engine)
                temperatures.append(float(m["temperature"]))
                sizes.append(size)
                folds.append(k)
                engine_members.append(mi)
            cfgs.append(cfg)
            members.append({"name": m["name"], "merge": merge.to_dict(), "weight": float(m["weight"]),
                            "decode": {"draft_factor": cfg.data.draft_factor, "max_pixels": cfg.data.max_pixels}})
        cfg = copy.deepcopy(cfgs[0])  # batch size and loader workers of the first member
        cfg.predict.eps = float(doc["eps"])
        head = {"engine_members": engine_members, "members": members, "space": doc["space"],
                "calibration": load_calibration(path, doc["calibration"]), "eps": float(doc["eps"])}
        return cls(engines, temperatures, folds, sizes, output_classes, identity(output_classes), cfg,
                   spec_version(path / ENSEMBLE_FILE), head, kind=ENSEMBLE, source=path, device=dev,
                   runs=[runs[mi] for mi in engine_members])

    @classmethod
    def from_export(cls, path: Path | str, precision: str | None = None, threads: int | None = None,
                    log: Callable[[str], None] = print) -> Predictor:
        """An export folder alone (no run directory, no checkpoint): its preprocessing, classes, temperatures and
        post-processing from export.yaml, its engines (``threads`` threads) at ``precision``: None is the precision
        the export chose on its machine; one this CPU lacks the instructions for falls back to fp32, said through
        ``log`` (:func:`carclf.infer.precision.resolve_precision`)."""
        from carclf.artifacts.ensemble import load_calibration
        from carclf.artifacts.export import EXPORT_FILE, export_yaml, read_export
        from carclf.config import config_from_dict
        from carclf.infer.onnx_engine import load_engines
        from carclf.infer.precision import resolve_precision
        from carclf.runtime import cpu_info

        export_dir = Path(path)
        doc = read_export(export_dir)
        precision = resolve_precision(doc, precision, cpu_info(), log, f"'{export_dir}'")
        parity = doc.get("parity") or {}
        if parity.get("passed") is False:
            raise CarclfError(f"'{export_dir}' failed its parity check at export (max |dp| = "
                              f"{parity.get('max_abs_diff')} > {parity.get('tolerance')}): it is not to be trusted; "
                              "export it again")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = config_from_dict(doc["config"], str(export_yaml(export_dir)))
        head = None
        if "predictor" in doc:  # an ensemble: its vector / matrix calibration arrays live beside export.yaml
            head = dict(doc["predictor"]["postprocess"])
            head["calibration"] = load_calibration(export_dir, head["calibration"], "Export the ensemble again.",
                                                   EXPORT_FILE)
        entries = doc["engines"]
        return cls(load_engines(export_dir, doc, precision, threads), [float(e["temperature"]) for e in entries],
                   [e.get("fold") for e in entries], [int(e["eval_size"]) for e in entries], list(doc["classes"]),
                   MergeMap.from_dict(doc["merge"]), cfg, spec_version(export_yaml(export_dir)), head, kind=EXPORT,
                   source=export_dir, precision=precision)

    # ----------------------------------------------------------------------------------------------- state
    @property
    def output_classes(self) -> list[str]:
        """The columns of :meth:`predict`: every original class name (merged groups shared out by the merge map)."""
        return self.merge.original

    @property
    def views(self) -> list[str]:
        """Every TTA view of the engines, in order (each engine averages its own: ``engine.views``)."""
        return list(dict.fromkeys(v for e in self.engines for v in e.views))

    @property
    def engine_members(self) -> list[int]:
        """The member of each engine (a run: one member)."""
        return [int(m) for m in self.postprocess["engine_members"]] if self.postprocess else [0] * len(self.engines)

    @property
    def engine_names(self) -> list[str]:
        """``<member>/fold<k>`` per engine of an ensemble, ``fold<k>`` of a run."""
        if not self.postprocess:
            return [f"fold{k}" for k in self.folds]
        members = self.postprocess["members"]
        return [f"{members[m]['name']}/fold{k}" for m, k in zip(self.engine_members, self.folds, strict=True)]

    @property
    def run(self) -> RunDir | None:
        """The run directory of a run's Predictor (None for an ensemble or an export)."""
        return self.runs[0] if self.kind == RUN else None

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
            idx = [i for i, e in enumerate(self.engine_members) if e == mi]
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

    def only_folds(self, keep: set[int]) -> Predictor:
        """This Predictor with only the engines of the folds ``keep`` (an ensemble: of every member), the rest of
        it (temperatures, post-processing) unchanged; refused when a member would be left without an engine."""
        chosen = [i for i, k in enumerate(self.folds) if k in keep]
        members = {self._member_of(i) for i in chosen}
        wanted = {self._member_of(i) for i in range(len(self.engines))}
        if not chosen or members != wanted:
            names = ([m["name"] for j, m in enumerate(self.postprocess["members"]) if j not in members]
                     if self.postprocess else [str(self.source)])
            raise CarclfError(f"'{self.source}': {', '.join(names)} has no model of fold(s) "
                              f"{', '.join(map(str, sorted(keep)))}")
        head = None
        if self.postprocess:
            remap = {m: j for j, m in enumerate(sorted(members))}
            head = {**self.postprocess, "engine_members": [remap[self._member_of(i)] for i in chosen]}
        pick = lambda xs: [xs[i] for i in chosen]  # noqa: E731
        return dataclasses.replace(self, engines=pick(self.engines), temperatures=pick(self.temperatures),
                                   folds=pick(self.folds), eval_sizes=pick(self.eval_sizes), postprocess=head,
                                   runs=pick(self.runs))

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


# ------------------------------------------------------------------------------------------------- helpers
def _run_folds(run: RunDir, cfg: Config, folds: list[int] | None) -> list[int]:
    """Only completed folds (with out-of-fold logits): an interrupted fold's best.pt is not a finished model. The
    full-data fit (no out-of-fold photos) only when asked for by folds=[..., FULL], or by predict.full."""
    chosen = run.completed_folds()
    if folds is not None:
        chosen = [k for k in chosen if k in folds]
        if FULL in folds and run.has_full():
            chosen.append(FULL)
        if not chosen:
            raise CarclfError(f"'{run.path}' has none of the folds {folds} completed")
    elif run.has_full() and cfg.predict.full != "off":  # predict.full: beside | instead | off
        chosen = ([] if cfg.predict.full == "instead" else chosen) + [FULL]
    return chosen


def _verify_members(path: Path, used: list[dict[str, Any]], runs: list[RunDir]) -> None:
    """Every member fold's checkpoint is the one the ensemble recorded, and that the one training wrote (one hash
    each), before the first (slow) model load."""
    from carclf.artifacts.ensemble import verify_checksum

    for m, rd in zip(used, runs, strict=True):
        for k in m["folds"]:
            verify_checksum(path, m, k, rd.fold(int(k)).best)
            rd.fold(int(k)).verify_best(m["best_sha256"][k])


def _member_engines(path: Path, m: dict[str, Any], rd: RunDir, device: torch.device, output_classes: list[str]
                    ) -> tuple[Config, MergeMap, list[tuple[TorchFold, int, int]]]:
    """One ensemble member: its run's config and merge map, and (engine, fold, eval size) per fold it uses."""
    from carclf.artifacts.ensemble import ENSEMBLE_FILE

    cfg = rd.read_config()
    meta = rd.read_meta()
    merge = rd.merge_map(meta)
    if list(merge.original) != output_classes:
        raise CarclfError(f"{path / ENSEMBLE_FILE}: member {m['name']}'s run '{rd.path}' now has other "
                          "classes than when the ensemble was made: rebuild the ensemble")
    amp = amp_dtype(cfg.train.amp, device)
    parts = []
    for k in m["folds"]:
        size = int(m.get("eval_sizes", {}).get(k, 0)) or data_config_for(cfg)["input_size"][1]
        model = load_fold_model(cfg, rd.fold(int(k)).best, len(meta["classes"]), device)
        parts.append((TorchFold(model, data_config_for(cfg, size), list(m["views"]), device, amp,
                                cfg.train.channels_last), int(k), size))
    return cfg, merge, parts


ExportRun = Callable[..., Predictor]  # (run or ensemble path, threads=, log=) -> its Predictor on ONNX Runtime


def open_predictor(source: Path | str, engine: str = "torch", device: str = "auto", precision: str | None = None,
                   threads: int | None = None, export_run: ExportRun | None = None,
                   log: Callable[[str], None] = print) -> Predictor:
    """The Predictor for ``source`` on ``engine``: an export folder runs on ONNX Runtime; a run or an ensemble on
    PyTorch, or with ``engine="onnx"`` through ``export_run`` (the export step's "export to a temporary folder and
    load that", :func:`carclf.export.exporter.onnx_predictor`, handed down by the caller: infer imports no step)."""
    if engine not in ENGINES:
        raise CarclfError(f"unknown engine {engine!r}: use torch or onnx")
    if kind_of(source) == EXPORT:
        if engine == "torch":
            raise CarclfError(f"'{source}' is an ONNX export: it runs on ONNX Runtime (--engine onnx), or give the "
                              "run directory for PyTorch")
        return Predictor.from_export(source, precision, threads, log)
    if precision not in (None, "fp32"):
        raise CarclfError(f"{precision} runs from an export: carclf export {source} -o DIR --precision {precision}, "
                          "then use DIR")
    if engine == "torch":
        return Predictor.open(source, device=device)
    if export_run is None:
        raise CarclfError(f"'{source}' is not an export: ONNX Runtime runs the folder carclf export writes (carclf "
                          f"export {source} -o DIR, then use DIR), or pass export_run="
                          "carclf.export.exporter.onnx_predictor to export it on the fly, as the CLI does")
    return export_run(source, threads=threads, log=log)

