import csv

import numpy as np
import pytest

from carclf.errors import CarclfError
from carclf.infer.submission import align_columns, finalize, write_submission


def _read(path):
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def test_columns_and_rows_follow_the_sample_not_carclf_order(tmp_path):
    classes = ["A", "B", "그랜저"]  # carclf's own (sorted) order
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    columns = ["그랜저", "A", "B"]
    out = write_submission(tmp_path / "s.csv", ["T1", "T0"], probs, classes, columns)
    rows = _read(out)
    assert rows[0] == ["ID", "그랜저", "A", "B"]
    assert [r[0] for r in rows[1:]] == ["T1", "T0"]
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(got, probs[:, [2, 0, 1]], atol=1e-6)


def test_nfd_sample_columns_match_nfc_classes(tmp_path):
    import unicodedata

    nfd = unicodedata.normalize("NFD", "쏘나타")
    p = align_columns(np.array([[0.25, 0.75]]), ["K5", "쏘나타"], [nfd, "K5"])
    np.testing.assert_allclose(p, [[0.75, 0.25]])


def test_column_mismatch_names_missing_and_extra():
    expected = r"1 column\(s\) the model does not know \(C\).*1 trained class\(es\) with no column \(B\)"
    with pytest.raises(CarclfError, match=expected):
        align_columns(np.ones((1, 2)) / 2, ["A", "B"], ["A", "C"])


def test_clipping_renormalises_and_rows_sum_to_one():
    p = finalize(np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]), eps=1e-3)
    assert p.min() >= 1e-3 * 0.99
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    with pytest.raises(CarclfError, match="NaN"):
        finalize(np.array([[np.nan, 1.0]]), eps=1e-6)


def test_existing_submission_is_not_overwritten(tmp_path):
    out = tmp_path / "s.csv"
    out.write_text("mine")
    with pytest.raises(CarclfError, match="already exists"):
        write_submission(out, ["T0"], np.array([[1.0]]), ["A"], ["A"])
    assert out.read_text() == "mine"
    write_submission(out, ["T0"], np.array([[1.0]]), ["A"], ["A"], overwrite=True)
    assert _read(out)[1] == ["T0", "1"]


@pytest.mark.parametrize("bom", [False, True])
def test_header_is_the_samples_byte_for_byte(tmp_path, bom):
    import unicodedata

    from carclf.data.scan import read_sample_columns

    nfd_a, nfd_b = (unicodedata.normalize("NFD", n) for n in ("쏘나타_DN8", "그랜저_6세대"))
    assert nfd_a != "쏘나타_DN8"
    header = f"ID,{nfd_a}, K5 ,{nfd_b}"  # macOS NFD Hangul, and a name with spaces around it
    sample = tmp_path / "sample_submission.csv"
    sample.write_bytes((header + "\nT0,0,0,0\nT1,0,0,0\n").encode("utf-8-sig" if bom else "utf-8"))
    columns = read_sample_columns(sample)
    assert columns == [nfd_a, " K5 ", nfd_b]  # as written, not normalised

    classes = ["K5", "그랜저_6세대", "쏘나타_DN8"]  # carclf's NFC class names
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    out = write_submission(tmp_path / "s.csv", ["T0", "T1"], probs, classes, columns)
    sample_bytes = sample.read_bytes().removeprefix(b"\xef\xbb\xbf")
    assert out.read_bytes().split(b"\n", 1)[0] == sample_bytes.split(b"\n", 1)[0]
    assert out.read_text(encoding="utf-8").splitlines()[0] == sample.read_text(encoding="utf-8-sig").splitlines()[0]
    got = np.array([[float(v) for v in r[1:]] for r in _read(out)[1:]])
    np.testing.assert_allclose(got, probs[:, [2, 0, 1]], atol=1e-6)  # 쏘나타, K5, 그랜저


def test_mismatch_names_the_columns_as_written(tmp_path):
    expected = r"1 column\(s\) the model does not know \( Avante \).*1 trained class\(es\) with no column \(B\)"
    with pytest.raises(CarclfError, match=expected):
        write_submission(tmp_path / "s.csv", ["T0"], np.ones((1, 2)) / 2, ["A", "B"], [" A", " Avante "])


def test_a_folder_as_the_output_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CarclfError, match=r"is a folder: give the submission's file name, e\.g\. -o .*submission\.csv"):
        write_submission(tmp_path / "out", ["T0"], np.array([[1.0]]), ["A"], ["A"], overwrite=True)
    assert list((tmp_path / "out").iterdir()) == []
    deep = write_submission(tmp_path / "new" / "sub" / "s.csv", ["T0"], np.array([[1.0]]), ["A"], ["A"])
    assert _read(deep)[1] == ["T0", "1"]  # missing parent folders are made


def test_rows_follow_the_samples_ids_and_their_photos():
    from pathlib import Path

    from carclf.data.scan import TestSet
    from carclf.infer.predict import submission_rows

    test = TestSet(["T0", "T1", "T2"], [Path(f"/d/test/{i}.jpg") for i in ("T0", "T1", "T2")])
    rows = submission_rows(test, ["T2", "T0", "T9"])
    assert rows.ids == ["T2", "T0", "T9"]
    assert rows.paths == [Path("/d/test/T2.jpg"), Path("/d/test/T0.jpg"), None]  # /d/test/T9.jpg is not there
    assert rows.no_photo == ["T9"]
    assert rows.dropped == ["T1"]
    assert submission_rows(test, []).ids == ["T0", "T1", "T2"]  # a sample without rows: test.csv's
