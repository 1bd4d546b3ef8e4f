"""The one owner of every on-disk format carclf writes and reads.

- :mod:`.run`: a run directory (``RunDir``, ``FoldPaths``): marker, locks, config, run.json, completed folds;
- :mod:`.oof`: a fold's ``oof.npz`` and an ensemble's, and ``OofSet``, the table of out-of-fold rows;
- :mod:`.ensemble`: an ensemble folder's ``ensemble.yaml`` and ``calibration.npz``;
- :mod:`.export`: an export folder's ``export.yaml`` (strict schema, ``spec_sha256``).

Steps (train, ensemble, export, report, ...) read and write these formats through this package only; it imports
only the numeric core, ``config``, ``io``, ``errors`` and ``data`` below it.
"""
