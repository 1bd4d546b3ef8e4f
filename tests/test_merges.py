import csv
import shutil

import numpy as np
import pytest

from carclf.data.merges import build_merge_map, read_merges
from carclf.errors import CarclfError

CLASSES = ["K5_3세대", "RAV4_2016_2018", "라브4_4세대_2013_2018", "쏘나타"]


def test_merge_map_labels_and_even_split():
    mm = build_merge_map(CLASSES, [["RAV4_2016_2018", "라브4_4세대_2013_2018"]])
    assert mm.classes == ["K5_3세대", "RAV4_2016_2018", "쏘나타"]
    assert mm.label_map.tolist() == [0, 1, 1, 2]
    p = mm.expand(np.array([[0.2, 0.6, 0.2]]))
    np.testing.assert_allclose(p, [[0.2, 0.3, 0.3, 0.2]])
    assert mm.groups == [["RAV4_2016_2018", "라브4_4세대_2013_2018"]]


def test_prior_split_follows_training_counts():
    mm = build_merge_map(CLASSES, [["라브4_4세대_2013_2018", "RAV4_2016_2018"]], "prior", np.array([5, 30, 10, 5]))
    assert mm.classes == ["K5_3세대", "라브4_4세대_2013_2018", "쏘나타"]  # the first listed name names the group
    p = mm.expand(np.array([[0.0, 0.8, 0.2]]))
    np.testing.assert_allclose(p, [[0.0, 0.6, 0.2, 0.2]])
    np.testing.assert_allclose(p.sum(), 1.0)


def test_bad_merges_are_named(tmp_path):
    with pytest.raises(CarclfError, match=r"'RAV4_2016_2019' is not a class folder.*Did you mean 'RAV4_2016_2018'"):
        build_merge_map(CLASSES, [["RAV4_2016_2019", "쏘나타"]])
    with pytest.raises(CarclfError, match="appears in two merge groups"):
        build_merge_map(CLASSES, [["쏘나타", "K5_3세대"], ["쏘나타", "RAV4_2016_2018"]])
    with pytest.raises(CarclfError, match="merge_split"):
        build_merge_map(CLASSES, [], "half")
    (tmp_path / "m.yaml").write_text("merges: [a, b]\n")
    with pytest.raises(CarclfError, match="list of lists"):
        read_merges(tmp_path / "m.yaml")


@pytest.mark.slow
def test_merges_flow_from_training_to_submission_columns(synth_data, tmp_path):
    from carclf.cli import main
    from tests.conftest import tiny_overrides

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    with (data / "sample_submission.csv").open(encoding="utf-8") as fh:
        columns = next(csv.reader(fh))[1:]
    a, b = sorted(columns)[-2:]  # any two names will do for the plumbing
    (data / "merges.yaml").write_text(f"merges:\n  - ['{a}', '{b}']\n", encoding="utf-8")
    assert main(["train", *tiny_overrides(data, tmp_path)]) == 0
    import json

    meta = json.loads((tmp_path / "t" / "run.json").read_text(encoding="utf-8"))
    assert len(meta["classes"]) == len(columns) - 1
    assert b not in meta["classes"]
    sub = tmp_path / "s.csv"
    assert main(["predict", str(tmp_path / "t"), "--data", str(data), "-o", str(sub)]) == 0
    with sub.open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == columns  # every original column, in the sample's order
    p = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    ia, ib = columns.index(a), columns.index(b)
    np.testing.assert_allclose(p[:, ia], p[:, ib], rtol=1e-6)  # split evenly
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_a_merge_map_saved_before_dropped_classes_existed_reads_back_equal():
    from carclf.data.merges import MergeMap, build_merge_map

    new = build_merge_map(["a", "b", "c"], [["a", "b"]])
    old = {k: v for k, v in new.to_dict().items() if k not in ("dropped", "dropped_prob")}  # an older run.json
    assert MergeMap.from_dict(old).to_dict() == new.to_dict()
