"""ONNX export and the ONNX Runtime engine: dynamic batch, agreement with PyTorch, engine choice, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from skincancer.checkpoint import CheckpointError, save_model
from skincancer.engines import ONNX_FILE, ExportError, OnnxEngine, session_options
from skincancer.export import export_onnx, static_padding
from skincancer.predict import load_model

pytestmark = pytest.mark.slow


def copy_run(run: Path, destination: Path) -> Path:
    """A private copy of a run's model folder, so exporting into it leaves the shared run as it was."""
    shutil.copytree(Path(run) / "model", destination / "model")
    return destination


@pytest.fixture(scope="module")
def exported_run(tiny_run, tmp_path_factory) -> Path:
    run = copy_run(tiny_run, tmp_path_factory.mktemp("onnx") / "run")
    export_onnx(run)
    return run


@pytest.fixture(scope="module")
def real_images(data_dir) -> list[str]:
    """Four test images per diagnosis, real JPEGs as they come from ISIC."""
    return [str(p) for d in ("melanoma", "nevus", "seborrheic_keratosis")
            for p in sorted((data_dir / "test" / d).glob("*.jpg"))[:4]]


def test_export_writes_model_and_metadata_with_dynamic_batch(exported_run):
    path = exported_run / "model" / ONNX_FILE
    graph = onnx.load(str(path)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not a fixed size
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]
    meta = pd.read_json(path.with_name(ONNX_FILE + ".json"), typ="series")
    assert meta["image_size"] == 224 and list(meta["mean"]) == [0.5, 0.5, 0.5] and meta["onnx"]["weights_sha256"]

    engine = OnnxEngine(path)
    for batch in (1, 5, 33):
        probs = engine.probabilities(np.random.default_rng(batch).normal(size=(batch, 3, 224, 224)))
        assert probs.shape == (batch, 3)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_same_padding_is_exported_as_constants_that_onnx_runtime_folds(exported_run, tmp_path):
    """The tf_ EfficientNets pad 'same' by the input's size at every call; exported that way, ONNX Runtime kept a
    Pad and two layout changes around five convolutions (a third of Lite0's time). Constant pads fold away."""
    import onnxruntime as ort

    path = exported_run / "model" / ONNX_FILE
    assert not {n.op_type for n in onnx.load(str(path)).graph.node} & {"Shape", "Ceil"}
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "Pad" not in {n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}


def test_an_export_is_checked_against_the_model_as_trained(tiny_run, tmp_path, monkeypatch):
    from skincancer import export

    def shifted(model, size):  # the stem padded one pixel up and left instead of down and right
        padded = static_padding(model, size)
        stem = next(m for m in padded.modules() if isinstance(m, torch.nn.ZeroPad2d))
        stem.padding = tuple(reversed(stem.padding))
        return padded

    monkeypatch.setattr(export, "static_padding", shifted)
    with pytest.raises(ExportError, match="differ"):
        export.write_onnx(load_model(tiny_run, engine="torch").model, 224, tmp_path / "shifted.onnx")


def test_an_export_from_before_constant_padding_is_used_with_advice(exported_run, tmp_path, caplog):
    import logging

    run = copy_run(exported_run, tmp_path / "old")
    sidecar = run / "model" / (ONNX_FILE + ".json")
    meta = json.loads(sidecar.read_text())
    assert meta["onnx"].pop("same_padding") == "constant"
    sidecar.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="skincancer"):
        assert load_model(run).engine_name == "onnx"
    assert "written by an earlier `skincancer export`" in caplog.text and "for the faster graph" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skincancer"):
        load_model(exported_run)
    assert "earlier" not in caplog.text


def test_static_padding_computes_what_the_model_does(tiny_run):
    from timm.layers import Conv2dSame

    model = load_model(tiny_run, engine="torch").model.eval()
    assert any(isinstance(m, Conv2dSame) for m in model.modules())
    for size in (64, 97):  # even and odd sides: at 64 a stride-2 convolution pads below and right only
        fixed = static_padding(model, size)
        assert not any(isinstance(m, Conv2dSame) for m in fixed.modules())
        image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(fixed(image), model(image), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, Conv2dSame) for m in model.modules())  # the run's own model is left as it was


def test_engines_agree_on_real_images(exported_run, real_images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(real_images[0]).read_bytes()[:500])
    chosen = real_images[::2]  # two per diagnosis
    images = [*chosen[:3], str(broken), *chosen[3:]]
    onnx_model, torch_model = load_model(exported_run, engine="onnx"), load_model(exported_run, engine="torch")
    assert (onnx_model.engine_name, torch_model.engine_name) == ("onnx", "torch")
    threads = torch.get_num_threads()
    for tta in (1, 2, 16):  # 16: 8 of the image and 8 of a fixed augmentation of it
        p_onnx, e_onnx = onnx_model.predict_proba(images, batch_size=4, num_workers=1 if tta == 1 else 0, tta=tta)
        assert torch.get_num_threads() == threads  # the engine's one-thread decoding spell is undone
        p_torch, e_torch = torch_model.predict_proba(images, batch_size=4, num_workers=0, tta=tta)
        assert [i for i, _ in e_onnx] == [i for i, _ in e_torch] == [3]
        assert np.isnan(p_onnx[3]).all()
        ok = np.arange(len(images)) != 3
        assert np.abs(p_onnx[ok] - p_torch[ok]).max() < 1e-4
        assert np.abs(p_onnx[ok] - p_onnx[ok].mean(0)).max() > 1e-3  # different images, different answers


def test_decoding_threads_give_the_batches_of_one_thread(real_images, tmp_path):
    from skincancer.engines import ArrayBatches
    from skincancer.images import EvalTransform, ImageList

    missing = str(tmp_path / "gone.jpg")
    dataset = ImageList([*real_images[:5], missing, *real_images[5:]], None, EvalTransform(64, [0.5] * 3, [0.5] * 3))
    serial, threaded = list(ArrayBatches(dataset, 4)), list(ArrayBatches(dataset, 4, threads=2))
    assert len(threaded) == len(serial) == len(ArrayBatches(dataset, 4, threads=2)) == 4
    for one, many in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(many["image"], one["image"])
        np.testing.assert_array_equal(many["index"], one["index"])
        assert many["errors"] == one["errors"]
    assert [e for b in threaded for e in b["errors"]] == [(5, "file not found")]


def test_decoding_threads_leave_the_warning_filters_as_they_were(real_images):
    """load_image refuses decompression bombs through warnings.catch_warnings, which is process-wide: threads
    opening images at once left its 'error' filter behind (or dropped it for another thread) until they took turns."""
    import warnings

    from skincancer.engines import ArrayBatches
    from skincancer.images import EvalTransform, ImageList

    before = list(warnings.filters)
    for _ in range(3):
        list(ArrayBatches(ImageList(real_images * 6, None, EvalTransform(32, [0.5] * 3, [0.5] * 3)), 8, threads=4))
    assert warnings.filters == before


def test_decoding_threads_stop_with_their_consumer(real_images):
    import threading

    from skincancer.engines import ArrayBatches

    class Failing:  # a sample that raises (not an unreadable image, which ImageList reports as a row)
        def __len__(self):
            return 40

        def __getitem__(self, index):
            if index == 13:
                raise RuntimeError("broken sample 13")
            return {"image": np.zeros((3, 4, 4), np.float32), "index": index}

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="broken sample 13"):
        list(ArrayBatches(Failing(), 4, threads=2))
    batches = iter(ArrayBatches(Failing(), 4, threads=2))
    assert next(batches)["index"].tolist() == [0, 1, 2, 3]
    batches.close()  # a consumer that stops early
    assert threading.active_count() == before


def test_auto_engine_uses_a_current_export_only(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    assert load_model(run, engine="auto").engine_name == "torch"
    with pytest.raises(ExportError, match="skincancer export"):
        load_model(run, engine="onnx")
    export_onnx(run)
    assert load_model(run).engine_name == "onnx"  # auto is the default

    classifier = load_model(run, engine="torch")
    with torch.no_grad():
        classifier.model.get_classifier().bias += 1.0
    save_model(classifier.model, classifier.meta, run / "model")  # "retrained" after the export
    assert load_model(run, engine="auto").engine_name == "torch"
    with pytest.raises(ExportError, match="does not match"):
        load_model(run, engine="onnx")


def test_onnx_engine_names_a_bad_file(tmp_path):
    with pytest.raises(ExportError, match="no ONNX export"):
        OnnxEngine(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ExportError, match="junk.onnx"):
        OnnxEngine(junk)


def test_cli_export_then_predict_and_evaluate_with_each_engine(cli, tiny_run, small_data, real_images, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    target = tmp_path / "elsewhere" / "lite0.onnx"
    result = cli("export", "--model", str(run), "-o", str(target))
    assert result.returncode == 0, result.output
    assert target.is_file() and target.with_name("lite0.onnx.json").is_file()
    result = cli("export", "--model", str(run))
    assert result.returncode == 0, result.output

    tables = {}
    for engine in ("onnx", "torch"):
        out = tmp_path / f"{engine}.csv"
        result = cli("predict", *real_images, "--model", str(run), "--engine", engine, "-o", str(out))
        assert result.returncode == 0, result.output
        tables[engine] = pd.read_csv(out)
    assert len(tables["onnx"]) == len(real_images)
    assert (tables["onnx"]["label"] == tables["torch"]["label"]).all()
    assert np.abs(tables["onnx"]["malignant"] - tables["torch"]["malignant"]).max() < 1e-4

    aucs = {}
    for engine in ("onnx", "torch"):
        result = cli("evaluate", "--model", str(run), "--data", str(small_data["test"]),
                     "--out", str(tmp_path / f"eval-{engine}"), "--engine", engine,
                     "--num-workers", "0")
        assert result.returncode == 0, result.output
        aucs[engine] = pd.read_json(tmp_path / f"eval-{engine}" / "metrics.json", typ="series")["auc"]
    assert aucs["onnx"] == pytest.approx(aucs["torch"], abs=1e-6)

    result = cli("predict", real_images[0], "--model", str(run), "--engine", "tensorrt")
    assert result.returncode == 2 and "--engine must be one of" in result.output


def test_probability_model_matches_softmax_of_logits(tiny_run):
    from skincancer.engine import ProbabilitiesAndFeatures

    classifier = load_model(tiny_run, engine="torch")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        probs, features = ProbabilitiesAndFeatures(classifier.model)(x)
        np.testing.assert_allclose(probs.numpy(), classifier.model(x).softmax(1).numpy(), atol=1e-6)
        expected = classifier.model.forward_head(classifier.model.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(features.numpy(), expected.numpy(), atol=1e-6)


def test_a_graph_that_is_not_this_runs_export_is_never_used(tiny_run, finetune_run, real_images, tmp_path, caplog):
    """The sidecar records the graph's SHA-256 as well as the weights': a model.onnx copied in from another run (or
    damaged) used to pass the check and give other answers silently ("94% benign" for a malignant call)."""
    run = copy_run(tiny_run, tmp_path / "run")
    other = copy_run(tiny_run, tmp_path / "other")
    small = copy_run(finetune_run, tmp_path / "small")  # 96 px, another network
    classifier = load_model(other, engine="torch")
    with torch.no_grad():
        classifier.model.get_classifier().bias += 3.0
    save_model(classifier.model, classifier.meta, other / "model")
    for source in (run, other, small):
        export_onnx(source)
    graph = run / "model" / ONNX_FILE
    own = graph.read_bytes()
    for foreign, reason in ((other, "not the one exported from this run"), (small, "not the one exported")):
        shutil.copy(foreign / "model" / ONNX_FILE, graph)
        with pytest.raises(ExportError, match=reason):
            load_model(run, engine="onnx")
        caplog.clear()
        assert load_model(run, engine="auto").engine_name == "torch"
        assert "using PyTorch" in caplog.text and caplog.records[-1].levelname == "WARNING"

    graph.write_bytes(own[: len(own) // 2])  # truncated: auto falls back instead of failing
    assert load_model(run, engine="auto").engine_name == "torch"
    with pytest.raises(ExportError, match="replaced or damaged"):
        load_model(run, engine="onnx")

    # a sidecar edited to vouch for a foreign graph: the shapes still give it away
    shutil.copy(small / "model" / ONNX_FILE, graph)
    sidecar = graph.with_name(ONNX_FILE + ".json")
    meta = json.loads(sidecar.read_text())
    meta["onnx"]["onnx_sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="takes 96x96 images, the model 224x224"):
        load_model(run, engine="onnx")

    del meta["onnx"]["onnx_sha256"]  # a sidecar without the graph's checksum vouches for nothing
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"model.onnx.json\) is missing or unreadable"):
        load_model(run, engine="onnx")
    graph.write_bytes(own)


def test_export_never_writes_into_another_runs_model_folder(cli, tiny_run, finetune_run, tmp_path):
    run, other = copy_run(tiny_run, tmp_path / "run"), copy_run(finetune_run, tmp_path / "other")
    result = cli("export", "--model", str(run), "-o", str(other / "model" / ONNX_FILE))
    assert result.returncode == 2 and "another run's model folder" in result.output
    assert not (other / "model" / ONNX_FILE).exists()


def test_predicting_with_an_export_imports_no_torch(exported_run, real_images, tmp_path):
    """`skincancer predict` of an exported run, the CLI and the API, in a fresh process: no torch, timm, torchvision
    or scikit-learn is imported (they cost seconds a start), nor pandas for one image's sentence, nor by decoding
    many images in threads, and the answer is PyTorch's."""
    heavy = ("torch", "torchvision", "timm", "sklearn", "matplotlib")
    script = f"""
import io, json, sys
from contextlib import redirect_stdout
from skincancer.cli import main
from skincancer.predict import load_model

out = io.StringIO()
sys.argv = ["skincancer", "predict", "--model", {str(exported_run)!r}, {real_images[0]!r}]
with redirect_stdout(out):
    try:
        main()
    except SystemExit as exit:
        assert not exit.code, exit.code
sentence_loaded = [m for m in {heavy!r} + ("pandas",) if m in sys.modules]
classifier = load_model({str(exported_run)!r})
table = classifier.predict({real_images!r}, batch_size=4, num_workers=2)
print(json.dumps({{"sentence": out.getvalue(), "engine": classifier.engine_name,
                   "malignant": table["malignant"].tolist(),
                   "loaded": [m for m in {heavy!r} if m in sys.modules], "sentence_loaded": sentence_loaded}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [] and got["sentence_loaded"] == [] and got["engine"] == "onnx"
    assert got["sentence"].startswith("This image is ")
    expected = load_model(exported_run, engine="torch").predict(real_images)["malignant"].to_numpy()
    np.testing.assert_allclose(got["malignant"], expected, atol=1e-4)


def test_an_onnx_run_builds_its_network_only_when_asked_and_as_before(exported_run, tmp_path):
    """The ONNX path skips building the PyTorch network, which Grad-CAM still gets on first use; a model.json whose
    network no longer matches the export loads the PyTorch way, with the errors of before."""
    classifier = load_model(exported_run, engine="onnx")
    assert "_model" in vars(classifier) and not isinstance(vars(classifier)["_model"], torch.nn.Module)
    network, reference = classifier.model, load_model(exported_run, engine="torch").model
    assert isinstance(network, torch.nn.Module) and classifier.model is network and not network.training
    for (name, value), (_, expected) in zip(network.state_dict().items(), reference.state_dict().items(),
                                            strict=True):
        assert torch.equal(value, expected), name

    run = copy_run(exported_run, tmp_path / "run")  # with its export
    path = run / "model" / "model.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, backbone="no_such_backbone")))
    for engine in ("auto", "onnx", "torch"):
        with pytest.raises(CheckpointError, match="unknown backbone 'no_such_backbone'"):
            load_model(run, engine=engine)
