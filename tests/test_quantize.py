"""int8 export: quantised from the float export, checked against it on real images, refused beyond tolerance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from skincancer.data import save_manifest
from skincancer.engines import ExportError, OnnxEngine
from skincancer.export import export_onnx
from skincancer.quantize import INT8_FILE, QuantizeError, Tolerance, _sample, export_int8, refusal

pytestmark = pytest.mark.slow

LOOSE = Tolerance(auc=1.0, mean_difference=1.0, max_difference=1.0, guard_changes=1.0)


@pytest.fixture
def steady_timing(monkeypatch):
    """The int8 graph timed at 1.1x the float one: which plan is kept no longer depends on the machine's load."""
    from skincancer import quantize

    monkeypatch.setattr(quantize, "images_per_second", lambda engines, images: [100.0, 110.0])


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(Path(tiny_run) / "model", run / "model")
    export_onnx(run)
    return run


def test_int8_export_is_checked_recorded_and_runs(exported, small_data):
    report = export_int8(exported, [small_data["train"]], small_data["valid"], tolerance=LOOSE)
    path = exported / "model" / INT8_FILE
    sidecar = json.loads(path.with_name(INT8_FILE + ".json").read_text())
    assert sidecar["int8"]["parity"] == report and report["images"] == 15
    assert sidecar["int8"]["calibration_images"] == 30 and "auc_int8" in report
    assert report["images_per_s"] > 0 and report["float_images_per_s"] > 0  # timed against the float graph here
    assert report["speedup"] == pytest.approx(report["images_per_s"] / report["float_images_per_s"], rel=0.01)
    assert path.stat().st_size < (exported / "model" / "model.onnx").stat().st_size / 2  # int8 weights
    probs = OnnxEngine(path).probabilities(np.random.default_rng(0).normal(size=(3, 3, 224, 224)))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_int8_calibrated_on_black_frames_is_refused_and_not_written(exported, small_data, tmp_path, steady_timing):
    black = tmp_path / "black"
    black.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (256, 256)).save(black / f"black_{i}.jpg")
        rows.append({"filepath": str(black / f"black_{i}.jpg"), "image_id": f"black_{i}", "diagnosis": "nevus",
                     "label": 0})
    manifest = save_manifest(pd.DataFrame(rows), tmp_path / "black.csv")
    good = export_int8(exported, [small_data["train"]], small_data["valid"], tolerance=LOOSE)
    broken = export_int8(exported, [manifest], small_data["valid"], tolerance=LOOSE)
    assert broken["mean_difference"] > 1.5 * good["mean_difference"]  # the check sees the broken ranges
    (exported / "model" / INT8_FILE).unlink()
    with pytest.raises(QuantizeError, match="strays from the float one"):
        export_int8(exported, [manifest], small_data["valid"])
    assert not (exported / "model" / INT8_FILE).exists()


def test_refusal_names_each_tolerance_exceeded():
    report = {"images": 10, "mean_difference": 0.02, "max_difference": 0.05, "auc_float": 0.80, "auc_int8": 0.79}
    assert "AUC 0.7900 against 0.8000" in refusal(report, Tolerance())
    assert "mean probability difference 0.0200" in refusal(report, Tolerance())
    assert refusal(report, Tolerance(auc=0.02, mean_difference=0.05)) is None
    moved = {**report, "guard_decisions_changed": 1}
    assert "the guard decides 1 of 10 images otherwise" in refusal(moved, Tolerance(auc=0.02, mean_difference=0.05))


def test_check_images_keep_their_diagnoses_when_sampled():
    frame = pd.DataFrame({"filepath": [f"{i}.jpg" for i in range(40)],
                          "diagnosis": ["melanoma"] * 10 + ["nevus"] * 30})
    sampled = _sample(frame, 8)
    assert list(sampled.columns) == ["filepath", "diagnosis"]  # the AUC check needs the diagnoses
    assert sampled["diagnosis"].value_counts().to_dict() == {"nevus": 6, "melanoma": 2}


def test_cli_int8_options_need_int8(cli, exported, small_data):
    result = cli("export", "--model", str(exported), "--check", str(small_data["valid"]), check=False)
    assert result.returncode == 2 and "add --int8" in result.stderr


def test_predict_uses_the_int8_graph_when_asked_and_by_default(exported, small_data, cli, steady_timing):
    from skincancer.predict import load_model

    export_int8(exported, [small_data["train"]], small_data["valid"], tolerance=LOOSE)
    sidecar = exported / "model" / (INT8_FILE + ".json")
    record = json.loads(sidecar.read_text())
    for speedup, auto in ((1.3, "int8"), (0.97, "int8"), (0.7, "onnx"), (None, "int8")):  # as export timed it
        record["int8"]["parity"]["speedup"] = speedup
        if speedup is None:  # an export from before the timing: used as it always was
            del record["int8"]["parity"]["speedup"]
        sidecar.write_text(json.dumps(record))
        assert load_model(exported).engine_name == auto  # auto: the int8 graph when current and not slower
        assert load_model(exported, engine="int8").engine_name == "int8"
        assert load_model(exported, engine="onnx").engine_name == "onnx"
    record["onnx"]["float_onnx_sha256"] = "0" * 64  # as if model.onnx had been exported again since
    sidecar.write_text(json.dumps(record))
    assert load_model(exported).engine_name == "onnx"  # auto: the stale int8 graph is passed over
    with pytest.raises(ExportError, match="quantised from another export"):
        load_model(exported, engine="int8")
    (exported / "model" / INT8_FILE).unlink()
    assert load_model(exported).engine_name == "onnx"
    result = cli("predict", "--model", str(exported), "--engine", "int8", str(small_data["valid"]), check=False)
    assert result.returncode == 2 and "no int8 ONNX export" in result.stderr and "--int8` first" in result.stderr


@pytest.mark.parametrize("speeds, plan, speedup", [
    ((50, 96, 200), "the pointwise convolutions after the stem", 0.96),  # the first not slower, not the fastest
    ((50, 80, 60), "the pointwise convolutions after the stem", 0.8),  # all slower: the fastest, marked so
])
def test_int8_keeps_the_first_plan_within_tolerance_that_is_not_slower(exported, small_data, monkeypatch, speeds,
                                                                        plan, speedup):
    from skincancer import quantize
    from skincancer.predict import load_model

    timed = iter(speeds)
    monkeypatch.setattr(quantize, "images_per_second", lambda engines, images: [100.0, float(next(timed))])
    report = export_int8(exported, [small_data["train"]], small_data["valid"], tolerance=LOOSE)
    assert (report["plan"], report["speedup"], report["float_images_per_s"]) == (plan, speedup, 100.0)
    graph = exported / "model" / INT8_FILE
    assert json.loads(graph.with_name(INT8_FILE + ".json").read_text())["int8"]["parity"] == report
    nodes = onnx.load(str(graph)).graph.node
    dequantised = {out for node in nodes if node.op_type == "DequantizeLinear" for out in node.output}
    int8_convolutions = sum(node.op_type == "Conv" and node.input[1] in dequantised for node in nodes)
    assert int8_convolutions == report["int8_convolutions"]  # the kept plan's graph, not the last one tried
    assert load_model(exported).engine_name == ("int8" if speedup > 0.95 else "onnx")


def test_cli_int8_names_a_missing_manifest_before_any_work(cli, exported, tmp_path):
    before = (exported / "model" / "model.onnx").stat().st_mtime_ns
    result = cli("export", "--model", str(exported), "--int8", "--check", str(tmp_path / "nope.csv"), check=False)
    assert result.returncode == 2 and f"--check {tmp_path / 'nope.csv'}: no such file" in result.stderr
    assert (exported / "model" / "model.onnx").stat().st_mtime_ns == before  # nothing re-exported
