"""The command line end to end, as a user runs it: train -> calibrate -> predict -> evaluate."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from carclf.cli import main
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_cli_end_to_end(synth_data, tmp_path, capsys):
    over = tiny_overrides(synth_data, tmp_path, **{"train.folds": "all", "train.epochs": 2})
    assert main(["train", *over]) == 0
    assert main(["calibrate", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "temperature" in out
    assert "nll_after" in out
    sub = tmp_path / "submission.csv"
    assert main(["predict", str(tmp_path / "t"), "--data", str(synth_data), "-o", str(sub)]) == 0
    with sub.open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    with (synth_data / "sample_submission.csv").open(encoding="utf-8") as fh:
        sample = list(csv.reader(fh))
    assert rows[0] == sample[0]  # same columns, same order as the sample (not carclf's sorted order)
    assert [r[0] for r in rows[1:]] == [r[0] for r in sample[1:]]
    p = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    # The serving path (bytes in memory) and the batch path (files) give the same probabilities.
    from PIL import Image

    from carclf.infer.predictor import Predictor

    predictor = Predictor.open(tmp_path / "t")
    photo = sorted((synth_data / "test").iterdir())[0]
    big = tmp_path / "big.jpg"  # large enough for draft-mode decoding from disk
    with Image.open(photo) as img:
        img.resize((1800, 1350)).save(big, quality=92)
    from_file, bad = predictor.predict_paths([photo, big])
    from_memory, bad_memory = predictor.predict_images([photo.read_bytes(), big.read_bytes()])
    assert not bad
    assert not bad_memory
    np.testing.assert_array_equal(from_memory, from_file)
    assert main(["evaluate", str(tmp_path / "t")]) == 0
    table = capsys.readouterr().out
    assert "log_loss" in table
    assert "all" in table
    assert (tmp_path / "t" / "evaluation.json").is_file()


def test_cli_errors_are_one_line_without_traceback(synth_data, tmp_path, capsys):
    assert main(["train", *tiny_overrides(synth_data, tmp_path), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err
    assert "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "does not exist: give the run directory" in capsys.readouterr().err


def test_predict_bad_inputs(synth_data, tmp_path, capsys):
    import shutil

    assert main(["train", *tiny_overrides(synth_data, tmp_path)]) == 0
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    run = str(tmp_path / "t")
    # sample_submission with a column the model does not know and one trained class missing
    with (data / "sample_submission.csv").open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    dropped = rows[0][1]
    rows[0][1] = "모르는_차종_2024"
    with (data / "sample_submission.csv").open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    assert main(["predict", run, "--data", str(data), "-o", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "모르는_차종_2024" in err
    assert dropped in err
    shutil.copyfile(synth_data / "sample_submission.csv", data / "sample_submission.csv")
    # a test ID whose image is missing
    first = sorted((data / "test").iterdir())[0]
    first.unlink()
    assert main(["predict", run, "--data", str(data), "-o", str(tmp_path / "s.csv")]) == 2
    assert "1 of" in capsys.readouterr().err
    # an undecodable test photo: listed, its row filled, the file still complete
    shutil.copyfile(synth_data / "test" / first.name, first)
    second = sorted((data / "test").iterdir())[1]
    second.write_bytes(b"not a jpeg")
    assert main(["predict", run, "--data", str(data), "-o", str(tmp_path / "s.csv")]) == 0
    assert second.name in capsys.readouterr().out
    with (tmp_path / "s.csv").open(encoding="utf-8") as fh:
        assert len(list(csv.reader(fh))) == len(rows)


def test_prepare_and_help_load_neither_torch_nor_timm(synth_data, tmp_path):
    """`carclf prepare` hashes photos; it must not pay torch's and timm's import time (seconds)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from carclf.cli import main\n"
        "for argv in (['--help'], ['prepare', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"assert main(['prepare', {str(synth_data)!r}, '--out-dir', {str(tmp_path)!r}, '--report']) == 0\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert (tmp_path / "prepare" / "data" / "report.html").is_file()


def test_the_dockerfile_command_parses_with_the_cli():
    """The image's CMD (a JSON list in the Dockerfile) is a valid carclf command line: a renamed or removed serve
    flag would otherwise only show when the container starts."""
    import re

    from carclf.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text(encoding="utf-8")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[0] == "carclf"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "serve"
    assert args.shutdown_timeout == 8
