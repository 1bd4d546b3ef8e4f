"""Run directories: names, the marker, --overwrite that never deletes what a user made, and the locks."""

from __future__ import annotations

import csv
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest

from carclf.artifacts.run import RunDir
from carclf.config import Config, load_config
from carclf.errors import CarclfError
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/b", "../x", "a\\b", ".hidden"])
def test_run_names_that_are_not_one_plain_folder_are_refused(name):
    with pytest.raises(CarclfError, match="name"):
        load_config(None, [f"name={name}"])


@pytest.mark.parametrize("name", [" lead", "trail ", "tab\tname"])
def test_run_names_from_a_recipe_with_stray_spaces_are_refused(tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {name!r}\n".replace("'", '"'), encoding="utf-8")
    with pytest.raises(CarclfError, match="spaces or control characters"):
        load_config(recipe)


@pytest.mark.parametrize("name", ["lite0-192", "아반떼 실험 1", "run_2026.11"])
def test_plain_names_with_spaces_korean_and_dots_are_fine(name):
    assert load_config(None, [f"name={name}"]).name == name


def _fake_run(path: Path) -> RunDir:
    rd = RunDir(path)
    rd.create(Config(name=path.name))
    rd.fold(0).dir.mkdir()
    rd.fold(0).best.write_bytes(b"weights")
    rd.fold(0).oof.write_bytes(b"oof")
    return rd


def test_overwrite_refuses_a_folder_carclf_did_not_make_and_deletes_nothing(tmp_path):
    mine = tmp_path / "work"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(CarclfError, match="was not made by carclf"):
        RunDir(mine).clear()
    assert (mine / "data" / "photo.jpg").read_bytes() == b"precious"


def test_overwrite_refuses_a_run_holding_files_carclf_did_not_write(tmp_path):
    rd = _fake_run(tmp_path / "run")
    (rd.path / "notes.txt").write_text("mine")
    (rd.fold(0).dir / "my-plot.png").write_bytes(b"png")
    with pytest.raises(CarclfError, match="holds things carclf did not write") as err:
        rd.clear()
    assert "'notes.txt'" in str(err.value)
    assert "'fold0/my-plot.png'" in str(err.value)  # the user's file inside a fold folder, not just "fold0"
    assert "more" not in str(err.value)
    assert (rd.path / "notes.txt").read_text() == "mine"
    assert rd.fold(0).best.is_file()


def test_overwrite_refusal_names_the_first_few_files_and_how_many_more(tmp_path):
    rd = _fake_run(tmp_path / "run")
    for i in range(4):
        (rd.fold(0).dir / f"plot{i}.png").write_bytes(b"png")
    (rd.path / "fold1").mkdir()
    for name in ("a.txt", "b.txt", "oof.npz"):
        (rd.path / "fold1" / name).write_text("x")
    with pytest.raises(CarclfError, match=r"\('fold0/plot0.png', 'fold0/plot1.png', 'fold0/plot2.png', "
                       r"'fold0/plot3.png', 'fold1/a.txt' and 1 more\), so nothing was deleted"):
        rd.clear()
    assert rd.fold(0).best.is_file()


def test_overwrite_refuses_a_run_that_holds_the_data(tmp_path):
    rd = _fake_run(tmp_path / "run")
    with pytest.raises(CarclfError, match="must not delete"):
        rd.clear(protect=[rd.path / "fold0"])
    assert rd.fold(0).best.is_file()


def test_overwrite_clears_a_run_carclf_made(tmp_path):
    rd = _fake_run(tmp_path / "run")
    (rd.path / ".evaluation.json.123.abc.tmp").write_text("left by a crash")
    rd.clear()
    assert [p.name for p in rd.path.iterdir()] == [".locks"]


def test_overwrite_clears_the_runs_own_report_but_not_a_folder_a_user_put_there(tmp_path):
    from carclf.artifacts.report import REPORT_MARKER

    rd = _fake_run(tmp_path / "run")
    report = rd.path / "report"
    (report / "thumbs").mkdir(parents=True)
    (report / REPORT_MARKER).write_text("{}")
    (report / "report.html").write_text("<html>")
    (report / "mine.txt").write_text("notes on the report")
    with pytest.raises(CarclfError, match="'report/mine.txt'"):
        rd.clear()
    assert (report / "mine.txt").is_file()
    (report / "mine.txt").unlink()
    rd.clear()  # the run's own report describes the run being replaced: it goes with it
    assert [p.name for p in rd.path.iterdir()] == [".locks"]
    rd = _fake_run(tmp_path / "run2")
    (rd.path / "report").mkdir()  # a folder named report without the marker is the user's
    (rd.path / "report" / "report.html").write_text("mine")
    with pytest.raises(CarclfError, match="'report'"):
        rd.clear()
    assert (rd.path / "report" / "report.html").read_text() == "mine"


def test_report_writes_only_names_the_run_overwrite_knows():
    """Every file the report writes is in carclf.artifacts.run.REPORT_FILES (else train --overwrite would refuse)."""
    from carclf.analyze.report import FEATURE_CACHE, PLOTS
    from carclf.artifacts.report import REPORT_FILES

    assert {FEATURE_CACHE, *PLOTS.values()} <= REPORT_FILES


def test_train_overwrite_of_the_data_folder_deletes_nothing(synth_data, tmp_path):
    """The report that started this: name=.. (or the data folder's own name) with --overwrite."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    from carclf.train.loop import train

    for name in ("..", "data"):
        over = tiny_overrides(data, tmp_path, name=name)
        with pytest.raises(CarclfError):
            train(load_config(None, over), overwrite=True, log=lambda s: None)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "prepare" not in p.parts) == [
        p for p in before if "prepare" not in p.parts
    ]


def test_fold_lock_refuses_a_second_trainer_at_once(tmp_path):
    rd = _fake_run(tmp_path / "run")
    other = RunDir(rd.path)  # as another process would open it
    with (
        rd.fold_lock(1),
        pytest.raises(CarclfError, match="fold 1 .* is being trained by another process"),
        other.fold_lock(1),
    ):
        pass
    with other.fold_lock(1):  # released: free again
        pass
    with rd.fold_lock(1), pytest.raises(CarclfError, match="being trained"):
        other.clear()  # --overwrite must not delete a fold in training
    assert rd.fold(0).best.is_file()


def _add_skipped(path: str, worker: int, n: int) -> None:
    rd = RunDir(path)
    for i in range(n):
        rd.update_skipped({f"train/c/{worker}-{i}.jpg": f"reason {worker}"})


def test_concurrent_skipped_updates_lose_no_rows(tmp_path):
    rd = _fake_run(tmp_path / "run")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add_skipped, args=(str(rd.path), w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with rd.skipped_csv.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 75


@pytest.mark.slow
def test_two_processes_train_different_folds_of_one_run_at_once(synth_data, tmp_path):
    """One process per fold, all launched with --resume before the run exists (as on a box with one GPU each)."""
    over = tiny_overrides(synth_data, tmp_path)
    cmds = [[sys.executable, "-m", "carclf", "train", *over, f"train.folds={k}", "--resume"] for k in (0, 1)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rd = RunDir.open(tmp_path / "t")
    assert rd.completed_folds() == [0, 1]
    assert (rd.path / ".carclf-run").is_file()
    with rd.skipped_csv.open(encoding="utf-8") as fh:
        assert all(r["reason"] for r in csv.DictReader(fh))


def test_overwrite_clears_a_run_made_before_the_marker_existed(tmp_path):
    rd = _fake_run(tmp_path / "old")
    rd.marker.unlink()
    rd.write_meta({"classes": ["a"]})  # config.yaml beside run.json: the signature of an older carclf run
    rd.clear()
    assert not rd.config_path.exists()


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]])
def test_a_users_folder_where_the_run_would_go_is_named_not_offered_to_resume(tmp_path, capsys, flags):
    """Issue 16 item 20c: runs/mine without the carclf marker: suggesting --resume or --overwrite (which both refuse)
    helps nobody; say it is not a carclf run and to choose another name or move the folder."""
    from carclf.cli import main

    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")

    rc = main(["train", *flags, *tiny_overrides(tmp_path / "data", tmp_path / "runs", name="mine")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"'{mine}' already exists and is not a carclf run directory" in err
    assert "choose another name=..., or move the folder" in err
    assert "pass --resume" not in err
    assert "--overwrite to" not in err
    assert (mine / "notes.txt").read_text() == "mine"
