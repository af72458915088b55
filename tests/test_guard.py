"""The out-of-distribution guard: fitted statistics saved, reloaded and refused if tampered; every output path says
when an image is not one the model can judge; --no-guard; runs from before the guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from skincancer.checkpoint import CheckpointError
from skincancer.ensemble import Ensemble
from skincancer.guard import GUARD_FILE, Guard, GuardError, fit_guard, frame_problem, load_guard, save_guard
from skincancer.predict import load_model

skimage_data = pytest.importorskip("skimage.data")


# ---------------------------------------------------------------- the statistics


def test_threshold_refuses_the_stated_share_of_held_in_images():
    rng = np.random.default_rng(0)
    fit, held = rng.normal(size=(400, 20)), rng.normal(size=(1000, 20))
    guard, record = fit_guard(fit, held, false_rejection=0.05)
    assert record["held_in"] == "validation images" and record["n_held_in"] == 1000
    assert np.mean(guard.score(held) > 1) == pytest.approx(0.05, abs=0.002)
    far = rng.normal(loc=3.0, size=(50, 20))
    assert (guard.score(far) > 1).all()
    new = rng.normal(size=(4000, 20))  # new images of the same kind: about the stated share refused
    assert np.mean(guard.score(new) > 1) == pytest.approx(0.05, abs=0.02)


def test_out_of_fold_threshold_without_held_in_images():
    rng = np.random.default_rng(1)
    fit = rng.normal(size=(500, 10))
    guard, record = fit_guard(fit, false_rejection=0.02)
    assert record["held_in"].startswith("out-of-fold") and record["n_held_in"] == 500
    assert np.mean(guard.score(rng.normal(size=(4000, 10))) > 1) == pytest.approx(0.02, abs=0.015)


def test_out_of_fold_threshold_takes_the_number_of_folds():
    rng = np.random.default_rng(4)
    fit = rng.normal(size=(300, 6))
    (guard5, record5), (guard10, record10) = fit_guard(fit), fit_guard(fit, folds=10)
    assert "(5 folds" in record5["held_in"] and "(10 folds" in record10["held_in"]
    assert guard5.threshold != guard10.threshold  # other folds, other held-in distances
    np.testing.assert_array_equal(guard5.mean, guard10.mean)  # the Gaussian is fitted on all of them either way


def test_too_few_held_in_images_is_an_error():
    rng = np.random.default_rng(2)
    with pytest.raises(GuardError, match="too few"):
        fit_guard(rng.normal(size=(100, 5)), rng.normal(size=(10, 5)))


def test_saved_statistics_reload_and_are_refused_when_tampered(tmp_path):
    rng = np.random.default_rng(3)
    guard, record = fit_guard(rng.normal(size=(200, 8)), rng.normal(size=(100, 8)))
    record = save_guard(guard, record, tmp_path)
    again = load_guard(tmp_path, record)
    x = rng.normal(size=(5, 8))
    np.testing.assert_allclose(again.score(x), guard.score(x))
    data = bytearray((tmp_path / GUARD_FILE).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / GUARD_FILE).write_bytes(bytes(data))
    with pytest.raises(GuardError, match="changed since it was fitted"):
        load_guard(tmp_path, record)
    (tmp_path / GUARD_FILE).unlink()
    with pytest.raises(GuardError, match="missing"):
        load_guard(tmp_path, record)
    with pytest.raises(GuardError, match="threshold"):
        load_guard(tmp_path, {**record, "threshold": -1})


def test_frame_checks_name_what_is_wrong():
    assert "nearly uniform" in frame_problem(0.5, 0.001)
    assert "too dark" in frame_problem(0.02, 0.05)
    assert "too bright" in frame_problem(0.99, 0.02)
    assert frame_problem(0.5, 0.15) is None


def test_distance_is_the_mahalanobis_distance_per_dimension():
    guard = Guard(np.zeros(2), np.diag([1.0, 4.0]), threshold=2.0)
    np.testing.assert_allclose(guard.distance(np.array([[1.0, 1.0]])), [np.sqrt(5 / 2)])
    np.testing.assert_allclose(guard.score(np.array([[1.0, 1.0]])), [np.sqrt(5 / 2) / 2])


# ---------------------------------------------------------------- a trained run


def far_images(tmp_path: Path) -> list[Path]:
    """The issue's examples: scikit-image's astronaut and coffee, and a rendered page screenshot."""
    shot = Image.new("RGB", (400, 300), (245, 245, 245))
    draw = ImageDraw.Draw(shot)
    draw.rectangle((0, 0, 400, 36), fill=(40, 90, 160))
    for row in range(8):
        draw.text((12, 50 + 28 * row), "Upload results - patient report - settings - help", fill=(20, 20, 20))
    images = {"astronaut.jpg": Image.fromarray(skimage_data.astronaut()),
              "coffee.jpg": Image.fromarray(skimage_data.coffee()), "page-screenshot.png": shot}
    paths = []
    for name, image in images.items():
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def isic_images(small_data) -> list[str]:
    manifest = Path(small_data["test"])
    return [str((manifest.parent / p).resolve()) for p in pd.read_csv(manifest)["filepath"]]


@pytest.mark.slow
def test_training_fits_a_guard_recorded_in_model_json(guarded_run):
    meta = json.loads((Path(guarded_run) / "model" / "model.json").read_text())
    record = meta["guard"]
    assert record["method"] == "mahalanobis" and record["false_rejection"] == 0.02
    assert record["held_in"].startswith("out-of-fold")  # a frozen backbone: out of fold over train + valid
    assert (Path(guarded_run) / "model" / GUARD_FILE).is_file()
    assert load_model(guarded_run, engine="torch").has_guard


@pytest.mark.slow
def test_far_images_get_no_verdict_and_dermoscopy_does(guarded_run, small_data, tmp_path):
    classifier = load_model(guarded_run, engine="torch")
    table = classifier.predict([str(p) for p in far_images(tmp_path)] + isic_images(small_data))
    far, isic = table.iloc[:3], table.iloc[3:]
    assert (far["label"] == "refused").all(), far[["source", "ood_score", "refusal"]]
    assert (~far["in_distribution"]).all() and (far["ood_score"] > 1).all()
    assert far["refusal"].str.contains("does not look like the dermoscopy images").all()
    assert far["malignant"].notna().all()  # the probability stays in the table, for researchers
    assert (isic["label"] != "refused").mean() >= 0.8
    assert set(isic["label"]) <= {"malignant", "benign", "refused"}


@pytest.mark.slow
def test_frame_checks_refuse_black_and_blank_frames(guarded_run):
    classifier = load_model(guarded_run, engine="torch")
    black, grey = np.zeros((200, 200, 3), np.uint8), np.full((200, 200, 3), 128, np.uint8)
    table = classifier.predict([black, grey])
    assert list(table["label"]) == ["refused", "refused"]
    assert "too dark" in table["refusal"][0] or "uniform" in table["refusal"][0]
    assert "uniform" in table["refusal"][1]


@pytest.mark.slow
def test_no_guard_keeps_the_verdict_and_still_says_what_the_guard_thinks(guarded_run, tmp_path):
    classifier = load_model(guarded_run, engine="torch")
    astronaut = str(far_images(tmp_path)[0])
    table = classifier.predict([astronaut], refuse=False)
    assert table["label"][0] in ("malignant", "benign")
    assert not table["in_distribution"][0] and table["ood_score"][0] > 1 and table["refusal"][0]


@pytest.mark.slow
def test_cli_predict_sentence_and_table(cli, guarded_run, tmp_path):
    astronaut, coffee, screenshot = far_images(tmp_path)
    result = cli("predict", "--model", str(guarded_run), str(astronaut))
    assert result.returncode == 0, result.output
    assert "No verdict for this image" in result.stdout and "malignant" not in result.stdout.lower().split(":")[0]
    assert "%" not in result.stdout  # no probability in the sentence
    result = cli("predict", "--model", str(guarded_run), "--no-guard", str(astronaut))
    assert result.returncode == 0 and "% malignant" in result.stdout
    out = tmp_path / "table.json"
    result = cli("predict", "--model", str(guarded_run), str(astronaut), str(coffee), str(screenshot),
                 "-o", str(out))
    assert result.returncode == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == ["refused"] * 3
    assert all(r["in_distribution"] is False and r["ood_score"] > 1 for r in rows)
    assert "got no verdict" in result.output


@pytest.mark.slow
def test_evaluate_counts_refused_images(guarded_run, small_data, tmp_path):
    from skincancer.evaluate import evaluate

    metrics = evaluate(guarded_run, small_data["test"], tmp_path / "eval", n_boot=50, num_workers=0, engine="torch")
    guard = metrics["guard"]
    assert guard["guarded"] and guard["n_refused"] == len(guard["refused"]) <= metrics["n"]
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert {"ood_score", "refusal"} <= set(predictions.columns)
    assert int(predictions["refusal"].notna().sum()) == guard["n_refused"]
    if guard["n_refused"] and "without_refused" in guard:
        assert guard["without_refused"]["n"] == metrics["n"] - guard["n_refused"]
    assert "Images the model would refuse" in (tmp_path / "eval" / "report.html").read_text()


@pytest.mark.slow
def test_onnx_engine_guards_like_torch(guarded_run, small_data, tmp_path):
    from skincancer.export import export_onnx

    run = tmp_path / "run"
    shutil.copytree(Path(guarded_run) / "model", run / "model")
    export_onnx(run)
    images = [str(p) for p in far_images(tmp_path)] + isic_images(small_data)[:6]
    torch_table = load_model(run, engine="torch").predict(images)
    onnx_classifier = load_model(run, engine="onnx")
    assert onnx_classifier.engine_name == "onnx"
    onnx_table = onnx_classifier.predict(images)
    np.testing.assert_allclose(onnx_table["ood_score"], torch_table["ood_score"], rtol=1e-3)
    assert list(onnx_table["label"]) == list(torch_table["label"])


@pytest.mark.slow
def test_an_export_made_before_the_guard_is_not_used_for_a_guarded_run(guarded_run, tmp_path):
    import torch

    from skincancer.engines import ONNX_FILE, ExportError
    from skincancer.export import export_onnx
    from skincancer.provenance import file_sha256

    run = tmp_path / "run"
    shutil.copytree(Path(guarded_run) / "model", run / "model")
    export_onnx(run)
    path = run / "model" / ONNX_FILE
    model = load_model(run, engine="torch").model.eval()

    class ProbabilitiesOnly(torch.nn.Module):  # what exports wrote before the guard
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image):
            return self.model(image).softmax(1)

    with torch.no_grad():
        torch.onnx.export(ProbabilitiesOnly().eval(), (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
    sidecar = path.with_name(path.name + ".json")
    record = json.loads(sidecar.read_text())
    record["onnx"]["onnx_sha256"] = file_sha256(path)
    sidecar.write_text(json.dumps(record))
    with pytest.raises(ExportError, match="exported before the guard"):
        load_model(run, engine="onnx")
    assert load_model(run, engine="auto").engine_name == "torch"


def unguarded_copy(guarded_run, tmp_path) -> Path:
    """guarded_run as a run made before the guard: no guard record, no statistics file."""
    run = tmp_path / "old"
    shutil.copytree(guarded_run, run)
    meta_path = run / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("guard")
    meta_path.write_text(json.dumps(meta))
    (run / "model" / GUARD_FILE).unlink()
    return run


@pytest.mark.slow
def test_a_run_from_before_the_guard_still_predicts_and_says_it_has_none(cli, guarded_run, tmp_path):
    run = unguarded_copy(guarded_run, tmp_path)
    classifier = load_model(run, engine="torch")
    assert not classifier.has_guard
    astronaut = far_images(tmp_path)[0]
    table = classifier.predict([str(astronaut)])
    assert table["label"][0] in ("malignant", "benign") and np.isnan(table["ood_score"][0])
    assert pd.isna(table["in_distribution"][0])
    result = cli("predict", "--model", str(run), str(astronaut))
    assert result.returncode == 0 and "no out-of-distribution guard" in result.output
    black = classifier.predict([np.zeros((100, 100, 3), np.uint8)])
    assert black["label"][0] == "refused"  # the frame checks need no fitting


@pytest.mark.slow
def test_guard_command_fits_a_guard_for_an_old_run(cli, guarded_run, tmp_path):
    run = unguarded_copy(guarded_run, tmp_path)
    result = cli("guard", "--model", str(run))
    assert result.returncode == 0, result.output
    assert "guard fitted on" in result.output
    classifier = load_model(run, engine="torch")
    assert classifier.has_guard
    assert "Out-of-distribution guard: photos unlike" in (run / "model" / "MODEL_CARD.md").read_text()
    table = classifier.predict([str(far_images(tmp_path)[0])])
    assert table["label"][0] == "refused"


@pytest.mark.slow
def test_a_tampered_guard_refuses_to_load(cli, guarded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(guarded_run, run)
    path = run / "model" / GUARD_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since it was fitted"):
        load_model(run, engine="torch")
    result = cli("predict", "--model", str(run), str(far_images(tmp_path)[0]))
    assert result.returncode == 2 and "error: " in result.stderr, result.output  # a CheckpointError, as main() says it
    assert "changed since it was fitted" in result.stderr.split("error: ", 1)[1]
    refit = cli("guard", "--model", str(run))  # what the message advises: it mends the run
    assert refit.returncode == 0, refit.output
    assert load_model(run, engine="torch").has_guard


@pytest.mark.slow
def test_ensemble_makes_one_decision(guarded_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(guarded_run, other)
    members = [load_model(guarded_run, engine="torch"), load_model(other, engine="torch")]
    ensemble = Ensemble(members)
    assert ensemble.has_guard
    images = [str(p) for p in far_images(tmp_path)]
    table = ensemble.predict(images)
    single = members[0].predict(images)
    np.testing.assert_allclose(table["ood_score"], single["ood_score"], rtol=1e-6)  # the mean of equal scores
    assert (table["label"] == "refused").all()
    unguarded = Ensemble([members[0], load_model(unguarded_copy(guarded_run, tmp_path), engine="torch")])
    assert not unguarded.has_guard and unguarded.predict(images)["ood_score"].isna().all()


@pytest.mark.slow
def test_api_gives_no_verdict_for_far_images(guarded_run, small_data, tmp_path):
    from fastapi.testclient import TestClient

    from skincancer.serve import create_app

    client = TestClient(create_app(guarded_run, engine="torch"))
    assert client.get("/api/model").json()["guard"]["limit"] == 1.0
    for path in far_images(tmp_path):
        answer = client.post("/api/predict?cam=true", files={"file": (path.name, path.read_bytes())}).json()
        assert answer["label"] == "refused" and answer["in_distribution"] is False
        assert answer["sentence"].startswith("No verdict") and "%" not in answer["sentence"]
        assert "cam_png_base64" not in answer
    photo = Path(isic_images(small_data)[0])
    research = client.post("/api/predict?guard=false", files={"file": ("a.png", far_images(tmp_path)[0].read_bytes())})
    assert research.json()["label"] in ("malignant", "benign")
    batch = client.post("/api/predict/batch", files=[("files", (p.name, p.read_bytes()))
                                                     for p in [*far_images(tmp_path), photo]]).json()
    assert [r["label"] for r in batch["results"][:3]] == ["refused"] * 3
    assert "No verdict" in client.get("/").text or "no verdict" in client.get("/").text


def test_frame_statistics_in_numpy_match_torch():
    """The frame checks' figures come from numpy (ONNX prediction imports no torch): as torch computed them."""
    import torch

    from skincancer.guard import pixel_stats

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images = torch.randn(5, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2
    images[1] = (0.02 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)  # black: std 0
    rgb = (images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    luminance = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).flatten(1)
    expected = torch.stack([luminance.mean(1), luminance.std(1)], 1).numpy()
    for given in (images, images.numpy()):
        got = pixel_stats(given, mean, std)
        assert got.shape == (5, 2)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert frame_problem(*pixel_stats(images, mean, std)[1]) == "the frame is nearly uniform: there is no lesion to see"


def test_a_refused_score_reads_above_one():
    from skincancer.predict import _above_one

    assert [_above_one(s) for s in (1.0032, 1.15, 1.00004)] == ["1.003", "1.15", "1.00004"]
