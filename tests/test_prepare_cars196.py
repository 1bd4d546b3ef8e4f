"""prepare on real photos: four classes of ../shared/data/cars196 known to share photos. Skips without the data."""

from pathlib import Path

import pytest

from carclf.data.prepare import prepare

CARS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196"
ASTON = ("Aston Martin V8 Vantage Convertible 2012", "Aston Martin V8 Vantage Coupe 2012")
SUZUKI = ("Suzuki Aerio Sedan 2007", "Suzuki SX4 Sedan 2012")
pytestmark = pytest.mark.skipif(not all((CARS / "train" / c).is_dir() for c in ASTON + SUZUKI),
                                reason="../shared/data/cars196 is not here")


def test_real_cross_class_copies_are_found_without_false_groups(tmp_path):
    data = tmp_path / "cars"
    (data / "train").mkdir(parents=True)
    for name in ASTON + SUZUKI:  # link, never copy, the photos
        (data / "train" / name).symlink_to(CARS / "train" / name, target_is_directory=True)
    p = prepare(data, tmp_path / "prep", workers=1, log=lambda s: None)
    assert p.summary["counts"]["bad"] == 0
    # The one photo filed under both Aston Martin classes (re-encoded: same look, other bytes), nothing else.
    assert [[m.path for m in g.members] for g in p.groups] == [
        [f"train/{ASTON[0]}/01483.jpg", f"train/{ASTON[1]}/02378.jpg"]
    ]
    assert p.groups[0].cross_class
    assert set(p.excluded) == {m.path for m in p.groups[0].members}
    # A looser threshold also joins the Suzuki photo shared by two classes (4 bits apart): a real copy too.
    loose = prepare(data, tmp_path / "loose", near_threshold=4, workers=1, log=lambda s: None)
    assert len(loose.groups) == 2
    assert {m.path.split("/")[1] for m in loose.groups[1].members} == set(SUZUKI)
