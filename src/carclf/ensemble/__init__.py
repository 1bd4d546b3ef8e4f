"""Ensembles chosen on out-of-fold evidence (``carclf ensemble``).

- :mod:`.members`: members (runs or ``run:folds``), their per-view out-of-fold logits, aligned by photo;
- :mod:`.fit`: weights (equal, by log loss, Caruana greedy, SciPy on the simplex), probability or logit space,
  member and final temperatures, vector / matrix calibration, clipping, and the cross-validation that scores them;
- :mod:`.combine`: the numpy post-processing shared by the fitting and the Predictor;
- :mod:`.spec`: ``ensemble.yaml``; :mod:`.build`: the command.

Imports are lazy so ``carclf.analyze.oofset.load_oof`` and the Predictor can reach :func:`ensemble_oof` and
:mod:`.combine` without loading the fitting code.
"""

from __future__ import annotations

from pathlib import Path


def ensemble_oof(path: Path | str):
    """An ensemble folder's out-of-fold rows as an ``OofSet`` (see :func:`carclf.ensemble.build.ensemble_oof`)."""
    from carclf.ensemble.build import ensemble_oof as _oof

    return _oof(path)


def build_ensemble(*args, **kwargs):
    """See :func:`carclf.ensemble.build.build_ensemble`."""
    from carclf.ensemble.build import build_ensemble as _build

    return _build(*args, **kwargs)


def evaluate_ensemble(path: Path | str, log=print):
    """See :func:`carclf.ensemble.build.evaluate_ensemble`."""
    from carclf.ensemble.build import evaluate_ensemble as _evaluate

    return _evaluate(path, log)


__all__ = ["build_ensemble", "ensemble_oof", "evaluate_ensemble"]
