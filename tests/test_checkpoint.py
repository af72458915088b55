import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from skincancer import load_model
from skincancer.checkpoint import CheckpointError, atomic_write, read_meta, save_model


def test_round_trip_gives_identical_predictions(tiny_run, small_data, tmp_path):
    classifier = load_model(tiny_run)
    images = list(__import__("pandas").read_csv(small_data["test"])["filepath"])[:4]
    images = [str((small_data["test"].parent / p).resolve()) for p in images]
    before, _ = classifier.predict_proba(images)
    copy = tmp_path / "copy"
    save_model(classifier.model, classifier.meta, copy / "model")
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
    meta = dict(classifier.meta, class_names=["a", "b"])
    save_model(classifier.model, meta, tmp_path / "bad" / "model")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "bad")
    torch.manual_seed(0)
