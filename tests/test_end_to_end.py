"""End to end on small real subsets: index -> train -> evaluate -> predict, through the CLI and the Python API."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from skincancer import evaluate, load_model
from skincancer.metrics import wilson_interval


def nevus_folder(data_dir: Path, tmp_path: Path, n: int) -> Path:
    """tmp_path/images holding copies of the first n test nevi."""
    folder = tmp_path / "images"
    folder.mkdir()
    for src in sorted((data_dir / "test" / "nevus").glob("*.jpg"))[:n]:
        (folder / src.name).write_bytes(src.read_bytes())
    return folder


def test_run_folder_describes_itself(tiny_run):
    run = Path(tiny_run)
    for name in ("config.yaml", "summary.csv", "train.log", "valid_predictions.csv", "model/model.json",
                 "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(pd.read_csv(run / "summary.csv")) == 2  # one row per C tried


def test_finetune_run_saves_best_epoch_and_predicts(finetune_run, small_data):
    summary = pd.read_csv(Path(finetune_run) / "summary.csv")
    assert list(summary["epoch"]) == [1, 2]
    assert {"train_loss", "valid_loss", "valid_auc", "lr"} <= set(summary.columns)
    meta = json.loads((Path(finetune_run) / "model" / "model.json").read_text())
    assert meta["epoch"] == int(summary.loc[summary.valid_auc.idxmax(), "epoch"])
    assert meta["image_size"] == 96
    table = load_model(finetune_run).predict(pd.read_csv(small_data["test"])["filepath"].map(
        lambda p: str((small_data["test"].parent / p).resolve())).tolist())
    assert table["error"].eq("").all()
    np.testing.assert_allclose(table[["melanoma", "nevus", "seborrheic_keratosis"]].sum(axis=1), 1, atol=1e-5)


def test_evaluate_writes_everything(cli, tiny_run, small_data, tmp_path):
    out = tmp_path / "eval"
    result = cli("evaluate", "--model", tiny_run, "--data", small_data["test"], "--out", out, "--num-workers", "0",
                 check=True)
    assert "AUC (95% CI)" in result.stdout
    for name in ("metrics.json", "predictions.csv", "roc.png", "confusion_matrix.png", "calibration.png",
                 "report.html", "isic_predictions.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    required = {"auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                "at_0.5", "specificity_at_sensitivity", "n", "n_positive", "threshold"}
    assert required <= set(metrics)
    assert metrics["n"] == 18 and metrics["n_positive"] == 6
    assert "subgroups" not in metrics  # the test manifest has no age or sex
    predictions = pd.read_csv(out / "predictions.csv")
    # AUC from probabilities, never from thresholded labels
    assert metrics["auc"] == pytest.approx(roc_auc_score(predictions["label"], predictions["malignant"]))
    low, high = metrics["auc_ci95"]
    assert low <= metrics["auc"] <= high
    brier = ((predictions["malignant"] - predictions["label"]) ** 2).mean()
    assert metrics["calibration"]["brier"] == pytest.approx(brier)
    assert sum(b["n"] for b in metrics["calibration"]["bins"]) == 18
    assert f"{brier:.4f}" in result.stdout
    counts = metrics["confusion"]
    assert metrics["sensitivity_ci95"] == pytest.approx(wilson_interval(counts["tp"], counts["tp"] + counts["fn"]))
    assert metrics["specificity_ci95"] == pytest.approx(wilson_interval(counts["tn"], counts["tn"] + counts["fp"]))
    low, high = metrics["sensitivity_ci95"]
    assert f"({low:.4f}-{high:.4f})" in result.stdout
    assert metrics["threshold"] == pytest.approx(load_model(tiny_run).threshold)
    isic = pd.read_csv(out / "isic_predictions.csv")
    assert list(isic.columns) == ["image_id", "melanoma", "seborrheic_keratosis"]
    assert metrics["environment"]["data"]["images"] == 18 and len(metrics["environment"]["data"]["fingerprint"]) == 64
    assert metrics["model"]["trained_with"][str(Path(tiny_run) / "model")]["data"]["train"]["images"] == 30
    page = (out / "report.html").read_text()
    assert "not a medical device" in page and "expected calibration error" in page
    assert "Provenance" in page and metrics["environment"]["data"]["fingerprint"][:16] in page
    assert "Age and sex were not used" in page  # the test manifest has none
    assert page.count("data:image/png;base64,") == 3  # ROC, confusion matrix, calibration
    # the worst errors at the threshold: missed malignant images lowest first, flagged benign ones highest first
    threshold = metrics["threshold"]
    missed = predictions[(predictions["label"] == 1) & (predictions["malignant"] < threshold)]
    alarms = predictions[(predictions["label"] == 0) & (predictions["malignant"] >= threshold)]
    expected = [f"{r.image_id}, {r.diagnosis}: {100 * r.malignant:.2f}%"
                for part in (missed.nsmallest(8, "malignant"), alarms.nlargest(8, "malignant"))
                for r in part.itertuples()]
    assert expected and re.findall(r"<figcaption>([^<]*)</figcaption>", page) == expected
    assert page.count("data:image/jpeg;base64,") == len(expected)
    cli("evaluate", "--model", tiny_run, "--data", small_data["test"], "--out", out, "--num-workers", "0",
        "--error-examples", "0", check=True)
    assert "<figure>" not in (out / "report.html").read_text()  # no photo in the report when asked for none
    refused = cli("evaluate", "--model", tiny_run, "--data", small_data["test"], "--out", out, "--error-examples", "-1",
                  check=False)
    assert refused.returncode == 2 and "--error-examples: expected 0 or more" in refused.stderr


def test_evaluate_groups_by_the_users_own_columns(cli, tiny_run, small_data, tmp_path, monkeypatch):
    from skincancer.data import DataError, load_manifest, save_manifest

    evaluate_module = sys.modules["skincancer.evaluate"]  # the package's `evaluate` is the function

    manifest = load_manifest(small_data["test"])
    manifest["site"] = (["head", "trunk", ""] * 6)[:len(manifest)]
    manifest["skin_type"] = [np.nan if i % 5 == 0 else 1 + i % 3 for i in range(len(manifest))]
    data = save_manifest(manifest, tmp_path / "grouped.csv")
    metrics = evaluate(tiny_run, data, tmp_path / "eval", num_workers=0, n_boot=20, group_by=["site", "skin_type"])
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert set(metrics["subgroups"]) == {"site", "skin_type"}  # the test manifest has no age or sex
    assert set(metrics["subgroups"]["site"]) == {"head", "trunk", "unknown"}
    assert set(metrics["subgroups"]["skin_type"]) == {"1", "2", "3", "unknown"}  # 2.0 in a column with gaps is 2
    for name, group in metrics["subgroups"]["site"].items():
        inside = (manifest["site"].replace("", "unknown") == name).to_numpy()
        assert group["n"] == inside.sum() and group["n_positive"] == predictions["label"][inside].sum()
        if 0 < group["n_positive"] < group["n"]:
            assert group["auc"] == pytest.approx(roc_auc_score(predictions["label"][inside],
                                                               predictions["malignant"][inside]))
    assert "By site, skin_type, from the data" in (tmp_path / "eval" / "report.html").read_text()
    # refused before any model loads (a model that does not exist is never reached)
    monkeypatch.setattr(evaluate_module, "MAX_GROUPS", 5)
    for group_by, source, words in [(["place"], data, "--group-by place: no such column"),
                                    (["image_id"], data, "18 different values (at most 5)"),
                                    (["sex"], data, "grouped already"),
                                    (["site"], small_data["test"].parent, "not a manifest")]:
        with pytest.raises(DataError, match=re.escape(words)):
            evaluate(tmp_path / "no-such-run", source, tmp_path / "refused", group_by=group_by)
    result = cli("evaluate", "--model", tiny_run, "--data", data, "--out", tmp_path / "cli", "--num-workers", "0",
                 "--group-by", "site", check=True)
    assert re.search(r"AUC site: trunk +\S+ \(\S+\) \(6 images, \d malignant\)", result.stdout), result.stdout


def test_manifest_labels_that_contradict_the_label_map_are_refused(tiny_run, small_data, cache_dir, tmp_path,
                                                                   caplog):
    from skincancer import load_config, train
    from skincancer.data import DataError, load_manifest, save_manifest

    manifest = load_manifest(small_data["valid"])
    manifest.loc[manifest["diagnosis"] == "seborrheic_keratosis", "label"] = 1  # SK called malignant here
    sk_malignant = save_manifest(manifest, tmp_path / "sk1.csv")
    config = load_config(None, train=str(small_data["train"]), valid=str(sk_malignant), out=str(tmp_path / "run"),
                         mode="linear", cache_dir=str(cache_dir), linear_c=[0.1], num_workers=0)
    hint = "--labels melanoma=1,nevus=0,seborrheic_keratosis=1"
    with pytest.raises(DataError, match=re.escape("'seborrheic_keratosis' is labelled 1 in the manifest but 0")):
        train(config)
    with pytest.raises(DataError, match=re.escape(hint)):
        evaluate(tiny_run, sk_malignant, tmp_path / "eval", num_workers=0)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    manifest = load_manifest(small_data["test"])  # a diagnosis the model never saw counts by its label, with a note
    manifest.loc[manifest["diagnosis"] == "seborrheic_keratosis", "diagnosis"] = "bcc"
    manifest.loc[manifest["diagnosis"] == "bcc", "label"] = 1
    with caplog.at_level("WARNING", logger="skincancer"):
        metrics = evaluate(tiny_run, save_manifest(manifest, tmp_path / "bcc.csv"), tmp_path / "bcc", num_workers=0,
                           n_boot=20)
    assert metrics["n_positive"] == 12 and "diagnoses bcc are not among the model's" in caplog.text


def test_predict_one_image_prints_the_sentence(cli, tiny_run, data_dir):
    """Always the malignant probability, with the model's call at its threshold: a review found '11.39% malignant'
    printed for an image the model flagged (threshold 8.45%), and '95.93% benign' for the other side."""
    classifier = load_model(tiny_run)
    for image in sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[:4]:
        result = cli("predict", "--model", tiny_run, image, check=True)
        match = re.fullmatch(r"This image is (\d+\.\d\d)% malignant: (above|below) the model's threshold of "
                             r"(\d+\.\d\d)%, so it is (flagged malignant|called benign)\.\n", result.stdout)
        assert match, result.stdout
        probability = classifier.predict(str(image))["malignant"].item()
        assert float(match[1]) == pytest.approx(probability * 100, abs=0.006)
        assert float(match[3]) == pytest.approx(classifier.threshold * 100, abs=0.006)
        flagged = probability >= classifier.threshold
        assert (match[2], match[4]) == (("above", "flagged malignant") if flagged else ("below", "called benign"))
        assert "not a medical device" in result.stderr


def test_predict_one_unreadable_image_prints_only_its_error(cli, tiny_run, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = cli("predict", "--model", tiny_run, broken, check=False)
    assert result.returncode == 1 and result.stdout == ""  # it printed a one-row CSV table
    assert f"error: {broken}" in result.stderr


def test_predict_json_by_suffix_and_files_passed_over_are_named(cli, tiny_run, data_dir, tmp_path):
    folder = nevus_folder(data_dir, tmp_path, 2)
    (folder / "notes.txt").write_text("field notes")
    out = tmp_path / "pred.json"
    # refused before: "expected a .csv file name"
    result = cli("predict", "--model", tiny_run, folder, "-o", out, check=True)
    assert [Path(row["source"]).name for row in json.loads(out.read_text())] == sorted(
        p.name for p in folder.glob("*.jpg"))
    assert "1 file(s) in the folder(s) not predicted" in result.stderr and "notes.txt" in result.stderr


def test_predict_many_with_a_bad_file(cli, tiny_run, data_dir, tmp_path):
    folder = nevus_folder(data_dir, tmp_path, 3)
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "pred.csv"
    result = cli("predict", "--model", tiny_run, folder, "-o", out, check=False)
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and "not an image" in result.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 4
    assert (table.loc[table.source.str.endswith("broken.jpg"), "error"] != "").all()
    assert table.loc[~table.source.str.endswith("broken.jpg"), "malignant"].astype(float).between(0, 1).all()
    as_json = cli("predict", "--model", tiny_run, *sorted(folder.glob("ISIC*")), "--format", "json", check=True)
    assert len(json.loads(as_json.stdout)) == 3


def test_predict_missing_path_names_it(cli, tiny_run, tmp_path):
    result = cli("predict", "--model", tiny_run, tmp_path / "nope.jpg", check=False)
    assert result.returncode != 0 and "nope.jpg" in result.stderr and "not found" in result.stderr


def test_python_api_takes_paths_pil_and_arrays(tiny_run, data_dir):
    path = sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0]
    classifier = load_model(tiny_run)
    image = Image.open(path)
    table = classifier.predict([str(path), image, np.asarray(image)])
    assert table["malignant"].nunique() == 1  # the same picture three ways
    assert set(table["label"]) <= {"malignant", "benign"}


def test_index_cli_lists_bad_files_and_skip_bad(cli, data_dir, tmp_path):
    root = tmp_path / "tree"
    for diagnosis in ("melanoma", "nevus"):
        (root / diagnosis).mkdir(parents=True)
        for src in sorted((data_dir / "train" / diagnosis).glob("*.jpg"))[:2]:
            (root / diagnosis / src.name).write_bytes(src.read_bytes())
    (root / "nevus" / "empty.jpg").write_bytes(b"")
    (root / "melanoma" / "notes.jpg").write_text("hello")
    result = cli("index", root, "--labels", "melanoma=1,nevus=0", "-o", tmp_path / "m.csv", check=False)
    assert result.returncode == 2
    assert "empty.jpg: empty file" in result.stderr and "notes.jpg: not an image" in result.stderr
    assert not (tmp_path / "m.csv").exists()
    cli("index", root, "--labels", "melanoma=1,nevus=0", "-o", tmp_path / "m.csv", "--skip-bad", check=True)
    assert len(pd.read_csv(tmp_path / "m.csv")) == 4


def test_train_rejects_bad_config_before_work(cli, tmp_path, small_data):
    result = cli("train", "--train", small_data["train"], "--valid", small_data["valid"], "--out", tmp_path / "r",
                 "--epochs", "-2", check=False)
    assert result.returncode == 2 and "epochs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_evaluate_api_returns_class_aucs(tiny_run, small_data, tmp_path):
    metrics = evaluate(tiny_run, small_data["test"], tmp_path / "e", num_workers=0, n_boot=200)
    assert set(metrics["class_auc"]) == {"melanoma", "nevus", "seborrheic_keratosis"}
    assert "isic_mean_auc" in metrics


def test_evaluate_says_when_it_scores_images_the_model_was_fitted_on(tiny_run, small_data, tmp_path, caplog):
    """A review found `evaluate` on the demo's own train+valid images reporting AUC 0.94 (1.0 via the API) without
    a word. The run records its images' content hashes; evaluate counts the images it scores that are among them,
    under any name (the ISIC 2017 test split holds byte-copies of training images)."""
    import logging
    import shutil

    from skincancer import load_manifest

    assert len(json.loads((Path(tiny_run) / "model" / "fitted_images.json").read_text())["train"]) == 30
    valid = load_manifest(small_data["valid"])
    with caplog.at_level(logging.WARNING, logger="skincancer"):
        metrics = evaluate(tiny_run, small_data["valid"], tmp_path / "on_valid")
    assert metrics["seen_in_fitting"]["train"] == 0 and metrics["seen_in_fitting"]["valid"] == len(valid)
    assert "figures on them are optimistic" in caplog.text
    assert "were validation images" in (tmp_path / "on_valid" / "report.html").read_text()

    test = load_manifest(small_data["test"])
    clean = evaluate(tiny_run, small_data["test"], tmp_path / "on_test")
    assert clean["seen_in_fitting"] == {"train": 0, "valid": 0, "examples": []}
    assert "optimistic" not in (tmp_path / "on_test" / "report.html").read_text()

    copied = tmp_path / "renamed_copy.jpg"  # a training image under another name
    train_image = load_manifest(small_data["train"]).iloc[0]
    shutil.copy(train_image["filepath"], copied)
    mixed = pd.concat([test, pd.DataFrame([{**train_image.to_dict(), "image_id": "copy", "filepath": str(copied)}])])
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    seen = evaluate(tiny_run, tmp_path / "mixed.csv", tmp_path / "on_mixed")["seen_in_fitting"]
    assert seen == {"train": 1, "valid": 0, "examples": [copied.name]}  # names: no local paths in a shared report

    old = tmp_path / "old_run"  # saved before runs recorded their images: no claim either way
    shutil.copytree(Path(tiny_run) / "model", old / "model")
    shutil.copy(Path(tiny_run) / "valid_predictions.csv", old)
    (old / "model" / "fitted_images.json").unlink()
    assert "seen_in_fitting" not in evaluate(old, small_data["test"], tmp_path / "old_eval")
    # an ensemble with such a member: the others are checked, the old one is named as unchecked
    mixed_seen = evaluate([tiny_run, old], tmp_path / "mixed.csv", tmp_path / "mixed_eval")["seen_in_fitting"]
    assert mixed_seen["train"] == 1 and mixed_seen["unchecked_models"] == [str(old / "model")]
    assert "Not checked for images they were fitted on" in (tmp_path / "mixed_eval" / "report.html").read_text()
    (old / "model" / "fitted_images.json").write_text("[1, 2]")  # unreadable: named in a warning, not checked
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skincancer"):
        broken_seen = evaluate([tiny_run, old], tmp_path / "mixed.csv", tmp_path / "broken_eval")["seen_in_fitting"]
    assert broken_seen["train"] == 1 and broken_seen["unchecked_models"] == [str(old / "model")]
    assert "fitted_images.json: unreadable" in caplog.text


def test_compare_two_evaluations_of_the_same_images(cli, tiny_run, finetune_run, small_data, tmp_path):
    first, second = tmp_path / "probe", tmp_path / "finetune"
    metrics = [evaluate(run, small_data["test"], out, num_workers=0, n_boot=20)
               for run, out in ((tiny_run, first), (finetune_run, second))]
    result = cli("compare", first, second, "-o", tmp_path / "compare.json", check=True)
    written = json.loads((tmp_path / "compare.json").read_text())
    assert (written["auc_a"], written["auc_b"]) == pytest.approx((metrics[0]["auc"], metrics[1]["auc"]))
    assert written["difference"] == pytest.approx(metrics[0]["auc"] - metrics[1]["auc"])
    assert written["n"] == 18 and written["n_positive"] == 6 and 0 <= written["p_value"] <= 1
    assert f"{written['p_value']:.4g}" in result.stdout and "18 (6 malignant)" in result.stdout
    cli("compare", first, second, "--task", "seborrheic_keratosis", "-o", tmp_path / "sk.json", check=True)
    keratosis = json.loads((tmp_path / "sk.json").read_text())
    assert keratosis["auc_a"] == pytest.approx(metrics[0]["class_auc"]["seborrheic_keratosis"])

    # images matched by id: a subset is compared on what both scored, and says so
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "metrics.json").write_text((second / "metrics.json").read_text())
    pd.read_csv(second / "predictions.csv").iloc[:12].to_csv(subset / "predictions.csv", index=False)
    partial = cli("compare", first, subset, check=True)
    assert "images both scored          12" in partial.stdout and "6 more scored only by the first" in partial.stdout
    # the same image with another label is not the same data
    relabelled = pd.read_csv(second / "predictions.csv")
    relabelled.loc[0, "label"] = 1 - relabelled.loc[0, "label"]
    relabelled.to_csv(subset / "predictions.csv", index=False)
    refused = cli("compare", first, subset, check=False)
    assert refused.returncode == 2 and "labelled differently in the two evaluations" in refused.stderr
    assert "Traceback" not in refused.stderr
    not_one = cli("compare", first, tmp_path, check=False)
    assert not_one.returncode == 2 and f"{tmp_path}: not an evaluation folder" in not_one.stderr
