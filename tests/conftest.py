"""Shared fixtures: small synthetic data sets in the competition layout, and a tiny fast recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests off the network and reproducible on 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted offline weights are cached once per test session, never in the user's home."""
    monkeypatch.setenv("CARCLF_CACHE", str(tmp_path_factory.getbasetemp() / "carclf-cache"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """6 classes x 12 photos (+duplicates), 3 test photos per class; read-only for tests."""
    from carclf.demo.synth import SynthSpec, make_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    make_dataset(root, SynthSpec(n_classes=6, train_per_class=12, test_per_class=3, size=(128, 96), seed=1))
    return root


def tiny_overrides(root: Path, out: Path, **extra: object) -> list[str]:
    """A recipe that trains in seconds: lite0 at 64 px, 2 folds, 1 worker-free epoch."""
    base = {
        "data.root": root, "out_dir": out, "name": "t", "data.n_folds": 2, "data.img_size": 64,
        "data.batch_size": 16, "data.num_workers": 0, "train.epochs": 1, "train.warmup_epochs": 0,
        "predict.batch_size": 32, "train.threads": 2, "track.enabled": False,  # tracking: tests/test_tracking.py
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
