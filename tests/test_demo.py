import pytest

from carclf.demo.run import run_demo
from carclf.demo.synth import SynthSpec
from carclf.errors import CarclfError

pytestmark = pytest.mark.slow


def test_demo_runs_every_step_and_refuses_to_clobber(tmp_path, capsys):
    spec = SynthSpec(n_classes=5, train_per_class=8, test_per_class=2, size=(96, 72), seed=3)
    over = ["data.img_size=64", "train.epochs=1", "data.num_workers=0"]
    summary = run_demo(tmp_path / "demo", overrides=over, spec=spec)
    out = capsys.readouterr().out
    for name in ("submission.csv", "runs/demo/evaluation.json", "runs/demo/fold2/calibration.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "test_log_loss" in out
    assert "files:" in out
    assert summary["oof_log_loss_calibrated"] <= summary["oof_log_loss_raw"] + 1e-9
    assert 0 <= summary["test_accuracy"] <= 1
    with pytest.raises(CarclfError, match="already holds an earlier demo"):
        run_demo(tmp_path / "demo", overrides=over, spec=spec)


def test_demo_overwrite_never_deletes_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "my photos"
    mine.mkdir()
    (mine / "car.jpg").write_bytes(b"precious")
    with pytest.raises(CarclfError, match="already holds files of yours"):
        run_demo(mine)
    with pytest.raises(CarclfError, match="was not made by carclf"):
        run_demo(mine, overwrite=True)
    assert (mine / "car.jpg").read_bytes() == b"precious"


def test_demo_overwrite_keeps_what_a_user_added(tmp_path):
    from carclf.demo.run import DEMO_MARKER

    demo = tmp_path / "데모 폴더"
    demo.mkdir()
    (demo / DEMO_MARKER).write_text("{}")
    (demo / "runs").mkdir()
    (demo / "my notes.txt").write_text("mine")
    with pytest.raises(CarclfError, match="did not write"):
        run_demo(demo, overwrite=True)
    assert (demo / "my notes.txt").read_text() == "mine"
    assert (demo / "runs").is_dir()
