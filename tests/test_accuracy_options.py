"""Options for accuracy: test-time augmentation, ensembles, EMA of weights, the 3-class head."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CHEAP_PROBE
from PIL import Image, ImageOps

from skincancer import evaluate, load_config, load_manifest, load_model, save_manifest, train
from skincancer.checkpoint import CheckpointError, read_weights, save_model
from skincancer.ensemble import Ensemble, load_models
from skincancer.metrics import choose_threshold


def test_tta_two_views_is_the_mean_of_image_and_mirror(tiny_run, data_dir):
    image = Image.open(sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0]).convert("RGB")
    classifier = load_model(tiny_run)
    plain, _ = classifier.predict_proba([image, ImageOps.mirror(image)])
    both, _ = classifier.predict_proba([image], tta=2)
    np.testing.assert_allclose(both[0], plain.mean(0), atol=1e-5)
    eight, _ = classifier.predict_proba([image], tta=8)
    assert not np.allclose(eight[0], both[0], rtol=1e-3, atol=0)  # relative: a tiny head can be very confident


def test_views_beyond_eight_add_the_eight_of_each_fixed_augmentation(guarded_run, data_dir):
    """tta 24 = the mean of the image's 8 dihedral views and those of augmentations 1 and 2 (the same for every
    image and every call, wherever it sits in the batch); the guard scores the mean features of all 24; a count
    that is not 1, 2, 4, 8 or a multiple of 8 up to 64 is refused, not rounded."""
    from skincancer.images import AugmentedView

    paths = [str(p) for p in sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[:3]]
    classifier = load_model(guarded_run, engine="torch")
    eight, _ = classifier.predict_proba(paths, tta=8)
    drawn = [classifier.predict_proba([AugmentedView(lambda im: im, draw)(Image.open(p).convert("RGB"))
                                       for p in paths], tta=8)[0] for draw in (1, 2)]
    many, _ = classifier.predict_proba(paths, tta=24)
    np.testing.assert_allclose(many, (eight + drawn[0] + drawn[1]) / 3, atol=1e-5)
    assert np.abs(many - eight).max() > 1e-4
    np.testing.assert_allclose(classifier.predict_proba(paths[::-1], tta=24)[0], many[::-1], atol=1e-6)
    judged, plain = classifier.judge(paths, tta=24), classifier.judge(paths, tta=8)
    assert np.isfinite(judged.ood_score).all() and not np.allclose(judged.ood_score, plain.ood_score)
    frames = [classifier._outputs(paths, 32, 0, views, None, guarded=True)[3] for views in (24, 8)]
    np.testing.assert_allclose(frames[0], frames[1], atol=1e-6)  # the frame checks read the image, not a mean
    for bad in (3, 12, 72):
        with pytest.raises(ValueError, match=f"tta: must be 1, 2, 4, 8 or a multiple of 8 up to 64 views, got {bad}"):
            classifier.predict_proba(paths, tta=bad)


def test_a_file_that_turns_bad_between_the_passes_of_many_views_fails_its_row(tiny_run, data_dir, monkeypatch):
    """Beyond 8 views each augmented copy is one more read of the files: a file that cannot be read on a later pass
    gets a NaN row and its own reason (not a scaled-down probability, nor 'corrupted weights'); one that every pass
    after the first misses, likewise."""
    import skincancer.images

    paths = [str(p) for p in sorted((data_dir / "test" / "nevus").glob("*.jpg"))[:3]]
    classifier = load_model(tiny_run, engine="torch")
    expected, _ = classifier.predict_proba(paths, tta=16)
    reads, real = Counter(), skincancer.images.load_image

    def flaky(path, failing=(paths[1],)):
        reads[path] += 1
        if path in failing and reads[path] > 1:
            raise skincancer.images.ImageError(path, "gone between passes")
        return real(path)

    monkeypatch.setattr(skincancer.images, "load_image", flaky)
    probs, errors = classifier.predict_proba(paths, tta=16)
    assert [i for i, _ in errors] == [1] and "gone between passes" in errors[0][1]
    assert np.isnan(probs[1]).all()
    np.testing.assert_allclose(probs[[0, 2]], expected[[0, 2]], atol=1e-6)
    reads.clear()
    monkeypatch.setattr(skincancer.images, "load_image", lambda path: flaky(path, failing=tuple(paths)))
    probs, errors = classifier.predict_proba(paths, tta=24)
    assert [i for i, _ in errors] == [0, 1, 2] and np.isnan(probs).all()


def test_three_class_head_melanoma_probability_is_its_softmax(tiny_run, data_dir):
    classifier = load_model(tiny_run)
    table = classifier.predict([str(p) for p in sorted((data_dir / "test" / "nevus").glob("*.jpg"))[:3]])
    np.testing.assert_allclose(table["malignant"], table["melanoma"], atol=1e-7)
    np.testing.assert_allclose(table[classifier.class_names].sum(axis=1), 1, atol=1e-5)


def test_ensemble_averages_members_and_rechooses_threshold(tiny_run, finetune_run, small_data, tmp_path):
    members = [load_model(tiny_run), load_model(finetune_run)]
    ensemble = load_models([tiny_run, finetune_run])
    assert isinstance(ensemble, Ensemble)
    paths = [str((small_data["test"].parent / p).resolve()) for p in pd.read_csv(small_data["test"])["filepath"][:5]]
    expected = np.mean([m.predict_proba(paths)[0] for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict_proba(paths)[0], expected, atol=1e-6)
    valid = [pd.read_csv(Path(run) / "valid_predictions.csv").set_index("image_id") for run in (tiny_run, finetune_run)]
    mean = (valid[0]["malignant"] + valid[1].loc[valid[0].index, "malignant"]) / 2
    assert ensemble.threshold == pytest.approx(choose_threshold(valid[0]["label"], mean, "sensitivity:0.90"))
    metrics = evaluate([tiny_run, finetune_run], small_data["test"], tmp_path / "ens", num_workers=0, n_boot=100)
    assert metrics["model"]["mode"] == "ensemble" and metrics["n"] == 18


def test_ensemble_refuses_models_with_other_classes(tiny_run, tmp_path):
    classifier = load_model(tiny_run)
    other = tmp_path / "other"
    meta = {k: v for k, v in classifier.meta.items() if k != "guard"}  # the guard's file stays with its run
    save_model(classifier.model, dict(meta, class_names=["nevus", "melanoma", "seborrheic_keratosis"]), other / "model")
    with pytest.raises(CheckpointError, match="differ"):
        load_models([tiny_run, other])
    renamed = tmp_path / "renamed"
    save_model(classifier.model, dict(meta, positive_name="cancer", negative_name="harmless"),
               renamed / "model")
    with pytest.raises(CheckpointError, match="name them alike"):
        load_models([tiny_run, renamed])
    twin = tmp_path / "twin"
    save_model(classifier.model, meta, twin / "model")
    for content in ("", "label,malignant\n1,0.5\n"):  # empty; no image_id column
        (twin / "valid_predictions.csv").write_text(content)
        with pytest.raises(CheckpointError, match="valid_predictions.csv"):
            load_models([tiny_run, twin])


@pytest.mark.slow
def test_ema_keeps_averaged_weights(small_data, cache_dir, tmp_path):
    common = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), mode="finetune", image_size=64,
                  epochs=1, max_steps_per_epoch=3, batch_size=8, num_workers=0, cache_dir=str(cache_dir), lr=0.01,
                  warmup_epochs=0.0, patience=0)
    plain = train(load_config(None, out=str(tmp_path / "plain"), **common))
    ema = train(load_config(None, out=str(tmp_path / "ema"), ema_decay=0.9, **common))
    a, b = read_weights(Path(plain) / "model"), read_weights(Path(ema) / "model")
    assert a.keys() == b.keys()
    name = "conv_stem.weight"
    assert not np.allclose(a[name].numpy(), b[name].numpy(), atol=1e-7)
    assert load_model(ema).predict_proba([str(small_data["test"])])[1]  # a CSV is not an image: reported, not raised


@pytest.mark.slow
def test_keep_last_logs_one_view_per_epoch_but_validates_the_kept_model_with_all(small_data, cache_dir, tmp_path):
    common = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), mode="finetune", image_size=64,
                  epochs=2, max_steps_per_epoch=2, batch_size=8, num_workers=0, cache_dir=str(cache_dir), tta=4,
                  patience=0, threshold_policy="youden")
    last = train(load_config(None, out=str(tmp_path / "last"), keep="last", **common))
    best = train(load_config(None, out=str(tmp_path / "best"), keep="best", **common))
    assert list(pd.read_csv(Path(last) / "summary.csv")["valid_views"]) == [1, 1]
    assert list(pd.read_csv(Path(best) / "summary.csv")["valid_views"]) == [4, 4]  # it selects on them
    classifier = load_model(last, engine="torch")
    valid = pd.read_csv(small_data["valid"])
    paths = [str((small_data["valid"].parent / p).resolve()) for p in valid["filepath"]]
    probs, _ = classifier.predict_proba(paths)  # the model's default: its 4 views
    saved = pd.read_csv(Path(last) / "valid_predictions.csv")
    np.testing.assert_allclose(saved["malignant"], probs[:, classifier.class_names.index("melanoma")], atol=1e-5)


def test_cli_ensemble_and_model_default_tta(cli, tiny_run, finetune_run, small_data, tmp_path):
    result = cli("evaluate", "--model", tiny_run, "--model", finetune_run, "--data", small_data["test"], "-o",
                 tmp_path / "e", "--num-workers", "0", "--engine", "torch")
    assert result.returncode == 0, result.stderr
    metrics = __import__("json").loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["model"]["mode"] == "ensemble" and metrics["tta"] == "per model"
    classifier = load_model(finetune_run, engine="torch")
    classifier.meta["tta"] = 2
    image = str((small_data["test"].parent / pd.read_csv(small_data["test"])["filepath"][0]).resolve())
    np.testing.assert_allclose(classifier.predict_proba([image])[0], classifier.predict_proba([image], tta=2)[0])


@pytest.mark.slow
def test_linear_head_on_train_and_valid_takes_its_threshold_out_of_fold(small_data, cache_dir, tiny_run, tmp_path):
    common = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), mode="linear", num_workers=0,
                  cache_dir=str(cache_dir), linear_c=[0.1, 1.0], pooling="final")
    run = train(load_config(None, out=str(tmp_path / "pooled"), linear_fit="train+valid",
                            class_balance="weighted_loss", **common))
    classifier = load_model(run)
    assert classifier.meta["validation_source"] == "out-of-fold (train+valid)"
    held_out = pd.read_csv(Path(run) / "valid_predictions.csv")
    assert len(held_out) == 45 and classifier.meta["validation"]["n"] == 45  # 30 train + 15 valid images
    assert sorted(held_out["split"].unique()) == ["train", "valid"]
    assert classifier.threshold == pytest.approx(choose_threshold(held_out["label"], held_out["malignant"],
                                                                  "sensitivity:0.90"))
    summary = pd.read_csv(Path(run) / "summary.csv")
    assert list(summary.columns) == ["C", "cv_auc"]
    # the out-of-fold probabilities are not the final model's: each row comes from a head that never saw it
    paths = list(pd.read_csv(small_data["valid"])["filepath"].map(lambda p: str((small_data["valid"].parent / p)
                                                                                 .resolve())))
    final, _ = classifier.predict_proba(paths)
    oof = held_out[held_out["split"] == "valid"][classifier.class_names].to_numpy()
    assert not np.allclose(final, oof, atol=1e-3)
    # an ensemble with a model validated on valid alone chooses its threshold on the 15 images both held out
    ensemble = load_models([tiny_run, run])
    valid_only = pd.read_csv(Path(tiny_run) / "valid_predictions.csv").set_index("image_id")
    pooled = held_out.set_index("image_id").loc[valid_only.index]
    mean = (valid_only["malignant"] + pooled["malignant"]) / 2
    assert ensemble.meta["validation"]["n"] == 15
    assert ensemble.meta["validation"]["brier"] == pytest.approx(((mean - valid_only["label"]) ** 2).mean())
    assert ensemble.threshold == pytest.approx(choose_threshold(valid_only["label"], mean, "sensitivity:0.90"))
    assert ensemble.meta["validation_source"] == "valid"
    # two probes fitted on train+valid share out-of-fold rows of training images: the ensemble says so
    twin = train(load_config(None, out=str(tmp_path / "pooled2"), linear_fit="train+valid", seed=1,
                             class_balance="weighted_loss", **common))
    assert load_models([run, twin]).meta["validation_source"] == "out-of-fold (train+valid)"
    # the validation images were fitted on, not just used to choose: recorded as such for `evaluate`
    fitted = json.loads((Path(run) / "model" / "fitted_images.json").read_text())
    assert (len(fitted["train"]), len(fitted["valid"])) == (45, 0)
    trained_on_train = load_model(tiny_run).model.get_classifier().weight
    assert not torch.allclose(classifier.model.get_classifier().weight, trained_on_train)
    # class_balance: none fits the head without class weights (which only matter when the classes are unbalanced)
    frame = load_manifest(small_data["train"])
    unbalanced = save_manifest(frame.drop(frame.index[frame["diagnosis"] == "melanoma"][:5]), tmp_path / "train.csv")
    runs = {balance: train(load_config(None, **dict(common, train=str(unbalanced), linear_c=[1.0]),
                                       out=str(tmp_path / balance), class_balance=balance))
            for balance in ("weighted_loss", "none")}
    weights = [load_model(run).model.get_classifier().weight for run in runs.values()]
    assert not torch.allclose(*weights, atol=1e-4)


@pytest.mark.slow
def test_linear_head_on_eight_views_is_scored_as_the_model_scores(small_data, cache_dir, tmp_path, monkeypatch):
    """feature_views: the head is trained on 8 dihedral views of each image; held-out images are scored by the mean
    of their `tta` views, exactly what the saved model does with that TTA: the validation AUC logged for the chosen
    C equals the AUC of the saved model's own 8-view predictions. Each file is hashed once for the whole run."""
    import importlib

    from skincancer.config import ConfigError
    from skincancer.metrics import roc_auc

    with pytest.raises(ConfigError, match="feature_views: must be 1, 2, 4 or 8"):
        load_config(None, feature_views=3)
    train_module = importlib.import_module("skincancer.train")  # the package's `train` is the function
    hashed = []
    monkeypatch.setattr(train_module, "content_keys",
                        lambda paths, real=train_module.content_keys: hashed.extend(paths) or real(paths))
    # at 96 px: the views are the point, not the size (224 px took 20 s of the suite's time)
    run = train(load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]),
                            out=str(tmp_path / "eight"), mode="linear", cache_dir=str(cache_dir), linear_c=[0.3],
                            feature_views=8, tta=8, num_workers=0, image_size=96, **CHEAP_PROBE))
    valid = load_manifest(small_data["valid"])
    assert sorted(hashed) == sorted([*load_manifest(small_data["train"])["filepath"], *valid["filepath"]])
    model = load_model(run, engine="torch")
    assert model.meta["tta"] == 8
    table = model.predict(list(valid["filepath"]))  # the model's own default: 8 views
    logged = pd.read_csv(run / "summary.csv")["valid_auc"].item()
    assert roc_auc(valid["label"], table["malignant"]) == pytest.approx(logged, abs=1e-4)
    one_view = model.predict(list(valid["filepath"]), tta=1)
    assert np.abs(one_view["malignant"] - table["malignant"]).max() > 1e-3  # the views do differ
    two = load_model(train(load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]),
                                       out=str(tmp_path / "two"), mode="linear", cache_dir=str(cache_dir),
                                       linear_c=[0.3], num_workers=0, image_size=96, **CHEAP_PROBE)), engine="torch")
    assert not torch.equal(two.model.get_classifier().weight, model.model.get_classifier().weight)


@pytest.mark.slow
def test_eval_image_size_validates_and_predicts_larger_than_it_trained(small_data, cache_dir, tmp_path):
    """eval_image_size (FixRes): trained on 64 px crops, the model is validated, thresholded, saved and exported for
    80 px images; its validation predictions are the saved model's own, and they differ from those at 64 px."""
    from skincancer.config import ConfigError
    from skincancer.export import export_onnx

    with pytest.raises(ConfigError, match="eval_image_size: a linear probe"):
        load_config(None, mode="linear", image_size=224, eval_image_size=256)
    with pytest.raises(ConfigError, match="eval_image_size: must be 0"):
        load_config(None, mode="finetune", eval_image_size=8)
    run = train(load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]),
                            out=str(tmp_path / "fixres"), mode="finetune", image_size=64, eval_image_size=80,
                            epochs=1, max_steps_per_epoch=2, batch_size=8, num_workers=0, cache_dir=str(cache_dir),
                            keep="last", patience=0))
    model = load_model(run, engine="torch")
    assert (model.meta["image_size"], model.meta["train_image_size"]) == (80, 64)
    valid = load_manifest(small_data["valid"])
    probs, _ = model.predict_proba(list(valid["filepath"]))
    saved = pd.read_csv(Path(run) / "valid_predictions.csv")
    np.testing.assert_allclose(saved["malignant"], model.malignant_probability(probs), atol=1e-5)
    model.meta["image_size"] = 64
    at_train_size, _ = model.predict_proba(list(valid["filepath"]))
    assert np.abs(at_train_size - probs).max() > 1e-3
    export_onnx(run)
    onnx = load_model(run, engine="onnx")  # the graph takes the 80 px inputs the model predicts on
    np.testing.assert_allclose(onnx.predict_proba(list(valid["filepath"]))[0], probs, atol=1e-4)


@pytest.mark.slow
def test_linear_head_on_few_images_gives_no_extreme_probabilities(data_dir, cache_dir, tmp_path):
    """Found by review: 18 training images gave validation probabilities from 5e-34 to 1 and folded weights up to
    1237, hence a threshold of 0 and 'This image is 0.00% malignant': near-constant features, standardised by their
    tiny spread, were scaled up thousands of times. Their spread is now floored at a tenth of the median."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import subset

    train_csv = save_manifest(subset("train", 6), tmp_path / "train.csv")
    valid_csv = save_manifest(subset("valid", 4), tmp_path / "valid.csv")
    run = train(load_config(None, train=str(train_csv), valid=str(valid_csv), out=str(tmp_path / "run"),
                            mode="linear", cache_dir=str(cache_dir), num_workers=0, **CHEAP_PROBE))
    model = load_model(run, engine="torch")
    assert model.model.get_classifier().weight.abs().max().item() < 20
    saved = pd.read_csv(Path(run) / "valid_predictions.csv")["malignant"]
    assert saved.between(1e-3, 1 - 1e-3).all(), saved.describe()
    assert model.threshold > 1e-3
