"""``carclf export --precision``: bf16 (OpenVINO) and int8 (ONNX Runtime) engines beside the fp32 graphs, scored on
OOF photos, parity-checked, timed on the machine and chosen; and the fallback to fp32 on a CPU without the chosen
precision's instructions.

The CPU's flags are set with ``CARCLF_CPU_FLAGS`` so the tests mean the same on every machine: "a CPU with AMX and
VNNI" and "an AVX2 CPU without them". (On a CPU that really lacks bf16, OpenVINO runs the bf16 engine in fp32; the
choices and files tested here do not depend on that.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from carclf.errors import CarclfError
from carclf.runtime import CPU_FLAGS_ENV
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

RICH = "avx2,fma,avx512f,avx512bw,avx512_vnni,avx512_bf16,amx_tile,amx_bf16,amx_int8"
PLAIN = "avx2,fma"


@pytest.fixture(scope="module")
def run_dir(synth_data, tmp_path_factory) -> Path:
    from carclf.calibrate.temperature import calibrate_run
    from carclf.config import load_config
    from carclf.train.loop import train

    out = tmp_path_factory.mktemp("precision-runs")
    run = train(load_config(None, tiny_overrides(synth_data, out, **{"train.folds": "all"})))
    calibrate_run(run)
    return Path(run)


def _export(run_dir: Path, out: Path, flags: str, **kw) -> tuple[dict, list[str]]:
    from carclf.export.exporter import export_model

    lines: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setenv(CPU_FLAGS_ENV, flags)
    try:
        export_model(run_dir, out, log=lines.append, speed_seconds=0.3, **kw)
    finally:
        mp.undo()
    return yaml.safe_load((out / "export.yaml").read_text(encoding="utf-8")), lines


@pytest.fixture(scope="module")
def auto_rich(run_dir, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """``--precision auto`` on "a CPU with AMX and VNNI"."""
    out = tmp_path_factory.mktemp("precision") / "auto rich 자동"
    doc, lines = _export(run_dir, out, RICH, precision_request="auto")
    return out, doc, lines


def test_auto_without_the_instructions_is_fp32(run_dir, tmp_path):
    doc, lines = _export(run_dir, tmp_path / "plain", PLAIN, precision_request="auto")
    assert doc["precision"]["chosen"] == "fp32"
    assert doc["precision"]["cpu"]["flags"] == ["avx2", "fma"]
    assert all(set(e["files"]) == {"fp32"} for e in doc["engines"])  # nothing made for a CPU that cannot run it
    assert any("no bf16 engines" in line for line in lines)
    assert any("no int8 engines" in line for line in lines)
    assert doc["precision"]["speed"]["fp32"] > 0


def test_auto_makes_scores_times_and_chooses(auto_rich):
    out, doc, lines = auto_rich
    prec = doc["precision"]
    assert prec["requested"] == "auto"
    assert prec["cpu"]["flags"] == sorted(RICH.split(","))
    assert prec["cpu"]["model"]
    for p in ("bf16", "int8"):
        assert doc[p]["n"] > 0
        assert "delta_log_loss" in doc[p]
        assert doc[p]["delta_log_loss"] == pytest.approx(doc[p][f"log_loss_{p}"] - doc[p]["log_loss_fp32"])
        assert prec["speed"][p] > 0
        for e in doc["engines"]:
            assert p in e["files"]
    for e in doc["engines"]:
        assert e["files"]["bf16"] == {**{k: e["files"]["fp32"][k] for k in ("file", "sha256", "bytes")},
                                      "runtime": "openvino", "needs": "bf16"}
        assert e["files"]["int8"]["format"] in doc["int8"]["format_images_per_s"]
    assert set(doc["int8"]["format_images_per_s"]) == {"qdq-7bit", "qdq", "qoperator"}  # VNNI: all three timed
    rows = prec["candidates"]
    eligible = [p for p, r in rows.items() if r["eligible"]]
    assert prec["chosen"] == max(eligible, key=lambda p: rows[p]["images_per_s"])
    assert any(line.startswith("precision: ") for line in lines)


def test_each_precision_matches_pytorch_within_its_tolerance(auto_rich, run_dir, synth_data, monkeypatch):
    from carclf.export.precision import PARITY_TOLERANCES
    from carclf.infer.openvino_engine import OpenVinoFold
    from carclf.infer.predictor import Predictor

    out, doc, _ = auto_rich
    monkeypatch.setenv(CPU_FLAGS_ENV, RICH)
    photos = sorted((synth_data / "test").rglob("*.jpg"))[:8]
    p_torch, _ = Predictor.open(run_dir, device="cpu").predict(photos, num_workers=0)
    for p in ("fp32", "bf16", "int8"):
        pred = Predictor.from_export(out, p)
        assert pred.precision == p
        if p == "bf16":
            assert all(isinstance(e, OpenVinoFold) for e in pred.engines)
        got, _ = pred.predict(photos, num_workers=0)
        assert np.abs(got - p_torch).max() < PARITY_TOLERANCES[p], p
    assert doc["parity"]["passed"]
    assert doc["bf16"]["parity"]["passed"]
    assert doc["int8"]["parity"]["tolerance"] == PARITY_TOLERANCES["int8"]


def test_a_precision_over_the_loss_bound_is_never_chosen(run_dir, tmp_path, monkeypatch):
    """Even the fastest: the timing is rigged so bf16 and int8 look 10x faster, and the bound is below any change."""
    from carclf.export import precision

    real = precision.time_engines

    def rigged(engines, batch, seconds, rounds=3):
        got = real(engines, batch, seconds, rounds)
        return {k: v * (1 if k.startswith("fp32") else 10) for k, v in got.items()}

    monkeypatch.setattr(precision, "time_engines", rigged)
    doc, _ = _export(run_dir, tmp_path / "bound", RICH, precision_request="auto", max_loss_increase=-1.0)
    assert doc["precision"]["chosen"] == "fp32"
    for p in ("bf16", "int8"):
        row = doc["precision"]["candidates"][p]
        assert row["images_per_s"] > doc["precision"]["candidates"]["fp32"]["images_per_s"]
        assert not row["eligible"]
        assert "exceeds the bound" in row["why"]


def test_choose_keeps_the_fastest_eligible_and_skips_the_rest():
    from carclf.export.precision import choose

    cpu = {"model": "test CPU", "flags": sorted(RICH.split(","))}
    doc = {"engines": [{"files": {"fp32": {}, "bf16": {"needs": "bf16"}, "int8": {"needs": "vnni"}}}],
           "bf16": {"delta_log_loss": 0.004, "parity": {"passed": True}},
           "int8": {"delta_log_loss": 0.002, "parity": {"passed": False}}}
    speed = {"fp32": 100.0, "bf16": 180.0, "int8": 300.0}
    got = choose(doc, "auto", ["bf16", "int8"], speed, 0.01, cpu, lambda _: None)
    assert got["chosen"] == "bf16"  # int8 is faster but failed parity
    assert got["candidates"]["int8"]["why"] == "parity failed"
    doc["bf16"]["delta_log_loss"] = None  # not measured (no OOF photos): never chosen by auto
    assert choose(doc, "auto", ["bf16", "int8"], speed, 0.01, cpu, lambda _: None)["chosen"] == "fp32"
    lines: list[str] = []
    asked = choose(doc, "int8", ["int8"], speed, 0.01, cpu, lines.append)
    assert asked["chosen"] == "int8"
    assert any(line.startswith("warning: --precision int8") for line in lines)


def test_serving_on_a_cpu_without_the_instructions_falls_back_to_fp32(auto_rich, monkeypatch):
    from carclf.infer.onnx_engine import OnnxFold
    from carclf.infer.precision import chosen_precision, lacks
    from carclf.infer.predictor import Predictor
    from carclf.serve.server import load_predictor

    out, doc, _ = auto_rich
    monkeypatch.setenv(CPU_FLAGS_ENV, PLAIN)
    runs_plain = {p: lacks(doc["engines"][0]["files"][p].get("needs"), PLAIN.split(",")) is None
                  for p in ("fp32", "bf16", "int8")}
    assert not runs_plain["bf16"]
    for p in ("bf16", "int8"):
        lines: list[str] = []
        pred = Predictor.from_export(out, p, log=lines.append)
        if runs_plain[p]:  # a 7-bit int8 graph runs on any CPU
            assert pred.precision == p
            assert not lines
            continue
        assert pred.precision == "fp32"
        assert all(isinstance(e, OnnxFold) and e.precision == "fp32" for e in pred.engines)
        assert any(f"the {p} engines of" in line and "running fp32 instead" in line for line in lines)
    chosen = chosen_precision(doc)
    assert load_predictor(out).precision == (chosen if runs_plain[chosen] else "fp32")
    monkeypatch.setenv(CPU_FLAGS_ENV, RICH)
    assert load_predictor(out).precision == chosen  # where it has them, the export's own choice


def test_int8_without_vnni_is_the_7bit_format(run_dir, tmp_path):
    doc, _ = _export(run_dir, tmp_path / "int8 plain", PLAIN, precision_request="int8")
    assert doc["precision"]["chosen"] == "int8"  # asked for: chosen, and it runs anywhere
    assert doc["int8"]["format"] == "qdq-7bit"
    assert doc["int8"]["format_images_per_s"] == {}
    assert all("needs" not in e["files"]["int8"] for e in doc["engines"])
    assert doc["int8"]["parity"]["passed"] is True


def test_bf16_for_another_machine_is_written_but_not_scored(run_dir, tmp_path):
    doc, lines = _export(run_dir, tmp_path / "bf16 plain", PLAIN, precision_request="bf16")
    assert all(e["files"]["bf16"]["needs"] == "bf16" for e in doc["engines"])
    assert "lacks AVX512-BF16 or AMX-BF16" in doc["bf16"]["note"]
    assert "delta_log_loss" not in doc["bf16"]
    assert doc["precision"]["chosen"] == "bf16"
    assert any("written for another machine" in line for line in lines)


def test_bad_precision_requests_are_refused(run_dir, tmp_path):
    from carclf.export.exporter import export_model
    from carclf.infer.precision import resolve_precision

    with pytest.raises(CarclfError, match="--precision 'fp16'"):
        export_model(run_dir, tmp_path / "x", precision_request="fp16")
    with pytest.raises(CarclfError, match="choose one"):
        export_model(run_dir, tmp_path / "y", precision_request="bf16", int8="static")
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y").exists()
    doc = {"engines": [{"name": "fold0", "files": {"fp32": {}}}]}
    with pytest.raises(CarclfError, match="no bf16 file for engine.*fold0.*--precision bf16"):
        resolve_precision(doc, "bf16", {"flags": RICH.split(",")}, print)
    with pytest.raises(CarclfError, match="unknown precision 'fp8'"):
        resolve_precision(doc, "fp8", {"flags": []}, print)
