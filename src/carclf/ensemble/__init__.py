"""Ensembles chosen on out-of-fold evidence (``carclf ensemble``).

- :mod:`.members`: members (runs or ``run:folds``), their per-view out-of-fold logits, aligned by photo;
- :mod:`.fit`: weights (equal, by log loss, Caruana greedy, SciPy on the simplex), probability or logit space,
  member and final temperatures, vector / matrix calibration, clipping, and the cross-validation that scores them
  (the formulas themselves are :mod:`carclf.metrics`, shared with the Predictor);
- :mod:`.build`: the command. The folder it writes (``ensemble.yaml``, ``oof.npz``) is
  :mod:`carclf.artifacts.ensemble`'s and :mod:`carclf.artifacts.oof`'s.
"""
