"""The artifacts layer: each folder says what it is, old folders load, newer formats are refused in one line, and
``--overwrite`` follows one rule everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from carclf.artifacts.ensemble import ENSEMBLE_FILE, ENSEMBLE_FOLDER, KIND, read_ensemble
from carclf.artifacts.export import EXPORT_FILE, EXPORT_MARKER, read_export
from carclf.artifacts.owned import OwnedFolder
from carclf.artifacts.resolve import ENSEMBLE, EXPORT, RUN, kind_of, require
from carclf.artifacts.run import RUN_FORMAT, RunDir
from carclf.errors import CarclfError
from tests.test_rundir import _fake_run as _run  # a run with one fold, as carclf writes it


def _ensemble(path: Path, fmt: int = 1) -> Path:
    path.mkdir(parents=True)
    doc = {"kind": KIND, "format": fmt, "classes": ["a"], "members": [], "space": "prob", "calibration": {},
           "eps": 1e-6}
    (path / ENSEMBLE_FILE).write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_a_new_run_records_its_format_and_an_old_marker_without_one_is_format_1(tmp_path):
    rd = _run(tmp_path / "run")
    assert json.loads(rd.marker.read_text())["format"] == RUN_FORMAT
    rd.marker.write_text(json.dumps({"kind": "carclf run", "name": "run"}))  # as the previous commit wrote it
    assert rd.format() == 1
    assert RunDir.open(rd.path).path == rd.path


def test_a_run_of_a_newer_format_is_refused_in_one_line_naming_it(tmp_path):
    rd = _run(tmp_path / "run")
    rd.marker.write_text(json.dumps({"kind": "carclf run", "format": RUN_FORMAT + 1}))
    with pytest.raises(CarclfError) as err:
        RunDir.open(rd.path)
    message = str(err.value)
    assert "\n" not in message
    assert f"format {RUN_FORMAT + 1}" in message
    assert "upgrade carclf" in message
    assert "--overwrite" in message


def test_an_ensemble_of_a_newer_format_is_refused_naming_the_version(tmp_path):
    _ensemble(tmp_path / "ens", fmt=9)
    with pytest.raises(CarclfError, match="format 9, newer than this carclf reads"):
        read_ensemble(tmp_path / "ens")


def test_kind_of_says_what_each_folder_is(tmp_path):
    run = _run(tmp_path / "run").path
    ens = _ensemble(tmp_path / "ens")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / EXPORT_FILE).write_text("format: 1\n")
    user = tmp_path / "photos"
    user.mkdir()
    assert [kind_of(p) for p in (run, ens, exp, user, tmp_path / "missing")] == [RUN, ENSEMBLE, EXPORT, None, None]
    assert require(run, (RUN, ENSEMBLE), "report") == RUN
    with pytest.raises(CarclfError, match="carclf report takes a run directory .* or an ensemble folder .*, and it is "
                                          "an export folder"):
        require(exp, (RUN, ENSEMBLE), "report")
    with pytest.raises(CarclfError, match="carclf did not make it"):
        require(user, doing="predict")
    with pytest.raises(CarclfError, match="does not exist"):
        require(tmp_path / "missing", doing="predict")


def test_an_export_of_a_newer_format_is_refused_naming_the_version(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / EXPORT_MARKER).write_text("{}")
    doc = {"format": 7, "engines": [], "classes": ["a"], "merge": {}, "config": {}}
    (exp / EXPORT_FILE).write_text(yaml.safe_dump(doc))
    with pytest.raises(CarclfError, match="export format 7, newer than this carclf reads"):
        read_export(exp)


def test_one_overwrite_rule_for_every_owned_folder(tmp_path):
    folder = OwnedFolder("thing folder", ".carclf-thing", lambda _: {"a.txt"}, "a thing")
    out = tmp_path / "out"
    assert folder.make_room(out, overwrite=False) is False  # missing: created
    folder.mark(out, {"kind": "thing"})
    (out / "a.txt").write_text("ours")
    with pytest.raises(CarclfError, match="already holds an earlier thing: pass --overwrite"):
        folder.make_room(out, overwrite=False)
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(CarclfError, match=r"holds things carclf did not write \('notes.txt'\)"):
        folder.make_room(out, overwrite=True)
    assert (out / "a.txt").read_text() == "ours"  # nothing deleted before the refusal
    (out / "notes.txt").unlink()
    (out / ".a.txt.123.0123456789abcdef.tmp").write_text("left by a crash")
    assert folder.make_room(out, overwrite=True) is False  # its marker went with the rest
    assert list(out.iterdir()) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("the user's, with our name")
    with pytest.raises(CarclfError, match="already holds files of yours"):
        folder.make_room(mine, overwrite=False)
    with pytest.raises(CarclfError, match="was not made by carclf: it does not hold a thing made by carclf"):
        folder.make_room(mine, overwrite=True)
    assert (mine / "a.txt").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CarclfError, match="exists and is not a folder"):
        folder.make_room(tmp_path / "file", overwrite=True)


def test_an_ensemble_folder_is_known_by_its_readable_ensemble_yaml(tmp_path):
    ens = _ensemble(tmp_path / "ens")
    assert ENSEMBLE_FOLDER.is_made(ens)
    (ens / ENSEMBLE_FILE).write_text("kind: something else\n")
    assert not ENSEMBLE_FOLDER.is_made(ens)


def test_report_overwrite_leaves_temp_looking_files_it_did_not_write(tmp_path):
    from carclf.artifacts.report import REPORT_FOLDER, REPORT_MARKER

    out = tmp_path / "report"
    out.mkdir()
    (out / REPORT_MARKER).write_text("{}")
    (out / "report.html").write_text("old")
    (out / ".notes.tmp").write_text("the user's")  # or a second report's write in flight: the report takes no lock
    REPORT_FOLDER.make_room(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([".notes.tmp", REPORT_MARKER])


def test_ensemble_overwrite_looks_into_its_report_folder(tmp_path):
    from carclf.artifacts.report import REPORT_MARKER

    ens = _ensemble(tmp_path / "ens")
    report = ens / "report"
    report.mkdir()
    (report / REPORT_MARKER).write_text("{}")
    (report / "report.html").write_text("ours")
    (report / "my notes.txt").write_text("the user's")
    with pytest.raises(CarclfError, match=r"'report/my notes.txt'"):
        ENSEMBLE_FOLDER.make_room(ens, overwrite=True)
    assert (report / "my notes.txt").is_file()
    (report / "my notes.txt").unlink()
    ENSEMBLE_FOLDER.make_room(ens, overwrite=True)
    assert list(ens.iterdir()) == []


@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_train_neither_continues_nor_deletes_a_run_of_a_newer_format(tmp_path, flag):
    from carclf.train.loop import check_startable

    rd = _run(tmp_path / "run")
    rd.marker.write_text(json.dumps({"kind": "carclf run", "format": RUN_FORMAT + 1}))
    with pytest.raises(CarclfError, match=f"format {RUN_FORMAT + 1}, newer than this carclf reads"):
        check_startable(rd, rd.read_config(), resume=flag == "resume", overwrite=flag == "overwrite")
    assert rd.fold(0).best.is_file()
