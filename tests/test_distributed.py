"""torchrun with two CPU processes (gloo) trains a fold to the same figures as one process."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

# A BatchNorm-free timm test model: with BatchNorm each rank would normalise over its own half batch, so the figures
# could differ for a reason that is not a bug (train.sync_bn fixes that on GPUs). Dropout off for the same reason.
MODEL = {"model.name": "test_convnext", "model.pretrained": False, "model.drop_rate": 0, "model.drop_path_rate": 0,
         "train.epochs": 3, "train.lr": 3e-3, "train.threads": 1, "train.device": "cpu"}


def _rows(run):
    with (run / "fold0" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_two_gloo_processes_match_one_process(synth_data, tmp_path):
    single = tiny_overrides(synth_data, tmp_path, name="single", **MODEL, **{"data.batch_size": 16})
    ddp = tiny_overrides(synth_data, tmp_path, name="ddp", **MODEL, **{"data.batch_size": 8})  # 2 x 8 = 16
    one = subprocess.run([sys.executable, "-m", "carclf", "train", *single], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        # --standalone: a rendezvous on this machine (localhost) at a free port
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "carclf", "train",
         *ddp],
        capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("run directory:") == 1  # rank 0 speaks for the group
    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "ddp")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):  # stated tolerance: 1e-4 (float sums in another order)
        assert float(rb["val_log_loss"]) == pytest.approx(float(ra["val_log_loss"]), abs=1e-4)
        if ra["train_loss"]:
            assert float(rb["train_loss"]) == pytest.approx(float(ra["train_loss"]), abs=1e-4)
    oof = [tmp_path / name / "fold0" / "oof.npz" for name in ("single", "ddp")]
    with np.load(oof[0]) as za, np.load(oof[1]) as zb:
        assert np.array_equal(za["indices"], zb["indices"])  # every validation photo, once
        np.testing.assert_allclose(za["logits"], zb["logits"], atol=1e-3)
