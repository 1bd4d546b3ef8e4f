"""Integration on real photos: a few classes of ../shared/data/cars196, one short epoch. Skips without the data."""

from pathlib import Path

import numpy as np
import pytest

from carclf.calibrate.temperature import calibrate_run
from carclf.config import load_config
from carclf.train.loop import train
from tests.conftest import tiny_overrides

CARS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CARS / "train").is_dir(), reason="../shared/data/cars196 is not here"),
]


def test_real_photos_train_and_calibrate(tmp_path):
    # Link (never copy) four classes into a small data root.
    data = tmp_path / "cars"
    (data / "train").mkdir(parents=True)
    for folder in sorted((CARS / "train").iterdir())[:4]:
        (data / "train" / folder.name).symlink_to(folder, target_is_directory=True)
    over = {"data.img_size": 96, "train.lr": 3e-3, "train.epochs": 3, "train.ema": False}
    cfg = load_config(None, tiny_overrides(data, tmp_path, **over))
    run = train(cfg, log=lambda s: None)
    with np.load(run / "fold0" / "oof.npz") as z:
        logits, labels = z["logits"], z["labels"]
    assert logits.shape[1] == 4
    assert len(labels) > 40
    acc = (logits.argmax(1) == labels).mean()
    print(f"cars196 4-class fold-0 accuracy after 3 epochs: {acc:.3f}")
    assert acc > 0.5  # well above chance (0.25) after three short epochs on real photos
    assert calibrate_run(run)[0]["nll_after"] <= calibrate_run(run)[0]["nll_before"]
