import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import skincancer
from skincancer import __version__, load_manifest, load_model
from skincancer.checkpoint import CheckpointError, atomic_write, read_meta, save_model
from skincancer.data import content_keys
from skincancer.guard import GUARD_FILE
from skincancer.provenance import data_fingerprint


def test_round_trip_gives_identical_predictions(tiny_run, small_data, tmp_path):
    classifier = load_model(tiny_run)
    images = list(pd.read_csv(small_data["test"])["filepath"])[:4]
    images = [str((small_data["test"].parent / p).resolve()) for p in images]
    before, _ = classifier.predict_proba(images)
    copy = tmp_path / "copy"
    save_model(classifier.model, classifier.meta, copy / "model")
    shutil.copy(Path(tiny_run) / "model" / GUARD_FILE, copy / "model")  # the guard is the run's, beside the weights
    after, _ = load_model(copy).predict_proba(images)
    np.testing.assert_allclose(before, after, atol=1e-6)
    assert read_meta(copy / "model")["threshold"] == classifier.threshold


def test_model_json_describes_the_model(tiny_run):
    meta = read_meta(Path(tiny_run) / "model")
    assert meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["class_names"] == ["melanoma", "nevus", "seborrheic_keratosis"]
    assert meta["labels"]["melanoma"] == 1
    assert meta["image_size"] == 224 and meta["mean"] == [0.5, 0.5, 0.5]
    assert 0 < meta["threshold"] < 1
    assert {"auc", "sensitivity", "specificity"} <= set(meta["validation"])
    valid = pd.read_csv(Path(tiny_run) / "valid_predictions.csv")  # calibration on the same validation images
    assert meta["validation"]["brier"] == pytest.approx(((valid["malignant"] - valid["label"]) ** 2).mean())
    assert 0 <= meta["validation"]["ece"] <= 1


def test_model_json_records_where_the_model_came_from(tiny_run, small_data):
    env = read_meta(Path(tiny_run) / "model")["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["skincancer"] == __version__
    assert env["device"] == "cpu" and "command" not in env  # local paths stay out of a file shipped with weights
    train = load_manifest(small_data["train"])
    assert env["data"]["train"] == {"images": 30, "fingerprint": data_fingerprint(content_keys(train["filepath"]),
                                                                                   train["diagnosis"]),
                                    "diagnoses": {"melanoma": 10, "nevus": 10, "seborrheic_keratosis": 10}}
    assert env["data"]["valid"]["images"] == 15 and env["data"]["valid"] != env["data"]["train"]
    assert json.loads((Path(tiny_run) / "model" / "environment.json").read_text()) == env
    package = Path(skincancer.__file__).resolve().parent
    tracked = subprocess.run(["git", "-C", str(package), "ls-files", "--error-unmatch", "__init__.py"],
                             capture_output=True)
    if tracked.returncode != 0:
        pytest.skip("skincancer is not running from a git checkout")
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert env["git"]["commit"] == head.stdout.strip()


class WritesMarker:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_malicious_pickle_checkpoint_is_never_loaded(tiny_run, tmp_path):
    run = tmp_path / "evil"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.json").write_text((Path(tiny_run) / "model" / "model.json").read_text())
    marker = tmp_path / "marker.txt"
    with open(run / "model" / "model.pt", "wb") as f:
        pickle.dump({"state_dict": WritesMarker(str(marker))}, f)
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        load_model(run)
    # the same bytes under the safetensors name are refused too
    (run / "model" / "model.pt").rename(run / "model" / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed since it was saved"):
        load_model(run)
    meta = json.loads((run / "model" / "model.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((run / "model" / "model.safetensors").read_bytes()).hexdigest()
    (run / "model" / "model.json").write_text(json.dumps(meta))  # a hash forged to match: the format refuses it
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model(run)
    assert not marker.exists()


def test_missing_run_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such run"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a trained run"):
        load_model(tmp_path / "empty")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken(tmp: Path):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_weights_that_do_not_fit_are_refused(tiny_run, tmp_path):
    classifier = load_model(tiny_run)
    meta = dict(classifier.meta, class_names=["a", "b"], labels={"a": 1, "b": 0})
    save_model(classifier.model, meta, tmp_path / "bad" / "model")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad")
    torch.manual_seed(0)


def copy_model(tiny_run, dest: Path) -> Path:
    (dest / "model").mkdir(parents=True)
    for name in ("model.json", "model.safetensors", GUARD_FILE):
        (dest / "model" / name).write_bytes((Path(tiny_run) / "model" / name).read_bytes())
    return dest


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threshold", 2.0, "threshold: expected a probability"),
    ("threshold", None, "threshold: expected a probability"),
    ("threshold", "abc", "threshold: expected a probability"),
    ("labels", {}, "labels: no label for class 'melanoma'"),
    ("labels", {"melanoma": 0, "nevus": 0, "seborrheic_keratosis": 0}, "must include both malignant"),
    ("labels", {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 7}, "labels: expected a map"),
    ("class_names", ["melanoma", "nevus", "bcc"], "no label for class 'bcc'"),
    ("class_names", ["melanoma", "nevus", "nevus"], "listed twice"),
    ("format_version", 99, "newer skincancer"),
    ("format_version", "2", "newer skincancer"),
    ("format_version", 1, r"format_version 1: written by a development version .*reads 2\); train the model again"),
    ("weights_sha256", None, "weights_sha256: expected the SHA-256"),
    ("weights_sha256", "abc", "weights_sha256: expected the SHA-256"),
    ("head", "foo", "head: must be"),
    ("mode", "foo", "mode: must be"),
    ("image_size", 0, "image_size"),
    ("image_size", "big", "image_size"),
    ("mean", [0.5, 0.5], "mean: expected 3 numbers"),
    ("std", [0, 0, 0], "std: expected 3 numbers from 0.001 to 10"),
    ("std", [1e-300, 0.5, 0.5], "std: expected 3 numbers from 0.001"),  # zero once in float32
    ("tta", 3, "tta: must be"),
    ("tta", 2.0, "tta: must be"),  # a float slices nothing
    ("resize", "stretch", "resize: must be 'squash' or 'crop'"),
    ("validation", "x", "validation: expected an object"),
    ("metadata_model", [1, 2], "metadata_model: expected an object"),
    ("backbone", "hf-hub:someone/model", "no hub or path"),  # timm would ask the network for its config
    ("negative_name", "malignant", "two different names"),
    ("backbone", "resnet9000", "unknown backbone"),
])
def test_impossible_model_json_values_are_named(tiny_run, tmp_path, field, value, message):
    run = copy_model(tiny_run, tmp_path / "edited")
    meta = json.loads((run / "model" / "model.json").read_text())
    meta[field] = value
    (run / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(run, engine="torch")
    assert str(run / "model" / "model.json") in str(caught.value)


@pytest.mark.parametrize("field", ["format_version", "weights_sha256", "threshold"])
def test_a_model_json_without_a_required_field_names_it(tiny_run, tmp_path, field):
    """Every model.json of this format has them (an unreleased older one lacked weights_sha256: never trusted)."""
    run = copy_model(tiny_run, tmp_path / "short")
    meta = json.loads((run / "model" / "model.json").read_text())
    del meta[field]
    (run / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"model.json: missing field\\(s\\) {field}$"):
        load_model(run, engine="torch")


def test_corrupted_weights_are_refused_never_read_as_benign(tiny_run, tmp_path):
    run = copy_model(tiny_run, tmp_path / "flipped")
    weights = run / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200_000] = bytes(b ^ 0xFF for b in data[middle:middle + 200_000])
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since it was saved"):
        load_model(run, engine="torch")
    # NaN weights saved as such (their hash recorded, so it matches) are refused too
    classifier = load_model(tiny_run, engine="torch")
    with torch.no_grad():
        classifier.model.get_classifier().weight[0, 0] = float("nan")
    save_model(classifier.model, classifier.meta, run / "model")
    with pytest.raises(CheckpointError, match="contain NaN or infinity"):
        load_model(run, engine="torch")


def test_non_finite_outputs_are_errors_not_benign(tiny_run, small_data, tmp_path):
    classifier = load_model(tiny_run, engine="torch")
    with torch.no_grad():  # finite weights whose logits overflow to infinity: softmax gives NaN
        classifier.model.get_classifier().weight.mul_(3e38)
    images = list(pd.read_csv(small_data["test"])["filepath"])[:2]
    table = classifier.predict(images)
    assert table["label"].tolist() == ["", ""]
    assert table["error"].str.contains("non-finite output").all()


def test_a_model_saved_mid_training_is_flagged_when_loaded(tiny_run, finetune_run, tmp_path, caplog):
    assert "unfinished" not in json.loads((Path(finetune_run) / "model" / "model.json").read_text())
    run = copy_model(tiny_run, tmp_path / "killed")
    meta = json.loads((run / "model" / "model.json").read_text())
    (run / "model" / "model.json").write_text(json.dumps({**meta, "unfinished": True, "epoch": 3}))
    with caplog.at_level("WARNING", logger="skincancer"):
        load_model(run, engine="torch")
    assert "has not finished" in caplog.text and "--resume" in caplog.text
