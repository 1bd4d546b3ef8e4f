"""The one owner of every on-disk format carclf writes and reads.

- :mod:`.run`: a run directory (``RunDir``, ``FoldPaths``): marker (with its format), locks, config, run.json,
  completed folds;
- :mod:`.checkpoint`: ``best.pt`` and ``last.pt``; :mod:`.metrics_csv`: a fold's ``metrics.csv``;
- :mod:`.oof`: a fold's ``oof.npz`` and an ensemble's, and ``OofSet``, the table of out-of-fold rows;
- :mod:`.ensemble`: an ensemble folder's ``ensemble.yaml`` and ``calibration.npz``;
- :mod:`.export`: an export folder's ``export.yaml`` (strict schema, ``spec_sha256``) and graphs;
- :mod:`.report`: the report folder's names; :mod:`.prepare`: the prepare folder's names;
- :mod:`.owned`: ``--overwrite`` of any folder carclf owns; :mod:`.resolve`: what a path is;
- :mod:`.photos`: the one ``resolve_photo`` (stored photo paths found under the data root).

Steps (train, ensemble, export, report, ...) read and write these formats through this package; it imports only
the numeric core, ``config``, ``io``, ``errors`` and ``data`` below it.
"""
