"""A user's own files are never replaced by an output, and replaced runs leave nothing misleading behind
(found by a first-user walkthrough: RELIABILITY.md)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import CHEAP_PROBE

from skincancer import evaluate, load_config, train
from skincancer.data import DataError


def test_index_never_writes_over_a_ground_truth_metadata_or_read_only_csv(cli, data_dir, tmp_path):
    """`index -o` took an ISIC ground-truth CSV for a manifest of its own (both start with image_id) and replaced
    it, read-only or not."""
    tree = tmp_path / "tree"
    for diagnosis in ("melanoma", "nevus"):
        (tree / diagnosis).mkdir(parents=True)
        for image in sorted((data_dir / "valid" / diagnosis).glob("*.jpg"))[:2]:
            shutil.copy(image, tree / diagnosis)
    for name in ("ISIC-2017_Validation_Part3_GroundTruth.csv", "ISIC-2017_Validation_Data_metadata.csv"):
        theirs = tmp_path / name
        shutil.copyfile(data_dir / name, theirs)  # writable: the header check alone must refuse it
        before = theirs.read_bytes()
        result = cli("index", tree, "-o", theirs)
        assert result.returncode == 2, result.output
        assert "already exists and is not a table this command wrote" in result.output
        assert theirs.read_bytes() == before
    mine = tmp_path / "manifest.csv"
    assert cli("index", tree, "-o", mine).returncode == 0
    assert cli("index", tree, "-o", mine).returncode == 0  # its own manifest: re-indexing replaces it
    mine.chmod(0o444)
    before = mine.read_bytes()
    result = cli("index", tree, "-o", mine)
    assert result.returncode == 2 and "is read-only; it stays as it is" in result.output, result.output
    assert mine.read_bytes() == before and not mine.stat().st_mode & 0o222


def test_evaluate_goes_into_a_new_folder_or_an_earlier_evaluation_only(cli, tiny_run, small_data, tmp_path):
    """`evaluate --out` replaced a user's report.html, and wrote its plots into an image tree (which `predict`
    then scored as lesions)."""
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "report.html").write_text("mine")
    with pytest.raises(DataError, match="documents: not empty and not an earlier evaluation"):
        evaluate(tiny_run, small_data["test"], documents, num_workers=0, n_boot=20)
    assert (documents / "report.html").read_text() == "mine" and len(list(documents.iterdir())) == 1
    result = cli("evaluate", "--model", tiny_run, "--data", small_data["test"], "--out", documents,
                 "--num-workers", "0")
    assert result.returncode != 0 and (documents / "report.html").read_text() == "mine"
    with pytest.raises(DataError, match="report.html: a file is in the way"):
        evaluate(tiny_run, small_data["test"], documents / "report.html", num_workers=0, n_boot=20)
    (documents / "report.html").unlink()
    (documents / "metrics.json").write_text('{"accuracy": 1}')  # another tool's metrics.json
    with pytest.raises(DataError, match="documents: not empty and not an earlier evaluation"):
        evaluate(tiny_run, small_data["test"], documents, num_workers=0, n_boot=20)
    tree = tmp_path / "tree"
    for row in pd.read_csv(small_data["test"]).itertuples():
        (tree / row.diagnosis).mkdir(parents=True, exist_ok=True)
        shutil.copy(small_data["test"].parent / row.filepath, tree / row.diagnosis)
    with pytest.raises(DataError, match="eval: inside the image folder"):
        evaluate(tiny_run, tree, tree / "eval", num_workers=0, n_boot=20)
    assert not (tree / "eval").exists()
    out = tmp_path / "eval"
    first = evaluate(tiny_run, small_data["test"], out, num_workers=0, n_boot=20)
    again = evaluate(tiny_run, small_data["test"], out, num_workers=0, n_boot=20)  # an evaluation is replaced
    assert again["auc"] == first["auc"]


@pytest.mark.slow
def test_overwriting_a_run_starts_its_log_afresh_and_flags_old_evaluations(small_data, cache_dir, tmp_path, caplog):
    """`train --overwrite` kept the replaced run's log lines above the new run's, and said nothing of the old
    model's evaluation saved inside the run folder."""
    settings = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(tmp_path / "run"),
                    mode="linear", cache_dir=str(cache_dir), num_workers=0, **CHEAP_PROBE)
    run = train(load_config(None, **settings, linear_c=[0.1]))
    evaluate(run, small_data["test"], run / "test", num_workers=0, n_boot=20)

    def messages() -> list[str]:  # train.log lines without their time stamps ("2026-11-27 16:50:00,123 INFO ...")
        return [line.split(" ", 2)[2] for line in (run / "train.log").read_text().splitlines()]

    first = messages()[0]
    with caplog.at_level("WARNING", logger="skincancer"):
        train(load_config(None, **settings, linear_c=[3.0]), overwrite=True)
    assert f"{run / 'test'}: an evaluation of the replaced run" in caplog.text
    assert (run / "test" / "metrics.json").is_file()  # the user's file stays
    log = messages()
    assert log[0] == first and log.count(first) == 1, "lines of the replaced run are still in train.log"
    assert any("an evaluation of the replaced run" in line for line in log)
    assert any("linear head C=3" in line for line in log) and not any("C=0.1" in line for line in log), log
    # a replacement refused on its inputs (a training diagnosis missing from the label map) clears nothing
    with pytest.raises(DataError, match="train.csv: diagnosis seborrheic_keratosis is not in the label map"):
        train(load_config(None, **settings, labels={"melanoma": 1, "nevus": 0}), overwrite=True)
    assert (run / "model" / "model.json").is_file() and messages()[:len(log)] == log
    assert messages()[-1].startswith("ERROR training stopped: ") and "not in the label map" in messages()[-1]


def test_messages_name_the_real_mistake(cli, tiny_run, small_data, data_dir, tmp_path):
    result = cli("train", "--train", small_data["train"], "--valid", tmp_path / "nosuch", "--out", tmp_path / "r")
    assert result.returncode != 0
    assert f"{tmp_path / 'nosuch'}: no such file or folder" in result.output
    # an incomplete --labels: the label map is named, not the validation file's classes
    result = cli("train", "--train", small_data["train"], "--valid", small_data["valid"], "--out", tmp_path / "r",
                 "--labels", "melanoma=1,bcc=1,nevus=0")
    message = result.output
    assert (f"{small_data['train']}: diagnosis seborrheic_keratosis is not in the label map (melanoma=1, bcc=1, "
            "nevus=0); add it to --labels") in message
    assert not (tmp_path / "r").exists()  # neither failed start left a folder behind
    # resuming a finished run says so, and does not claim to have saved it
    result = cli("train", "--resume", tiny_run)
    assert result.returncode == 0 and "has finished already" in result.output and "run saved" not in result.output
    # a metadata CSV that matches none of the images
    result = cli("index", data_dir / "valid", "-o", tmp_path / "m.csv",
                 "--metadata", data_dir / "ISIC-2017_Training_Data_metadata.csv")
    assert result.returncode == 0, result.output
    assert "gives age or sex for none of these images" in result.stderr


@pytest.fixture
def predictions(tmp_path) -> Path:
    return tmp_path / "p.json"


def test_predict_json_output_replaces_only_its_own_tables(cli, tiny_run, data_dir, predictions):
    image = sorted((data_dir / "test" / "nevus").glob("*.jpg"))[0]
    assert cli("predict", image, "--model", tiny_run, "-o", predictions).returncode == 0
    assert cli("predict", image, "--model", tiny_run, "-o", predictions).returncode == 0  # its own table
    predictions.write_text('[{"name": "someone else\'s"}]')
    result = cli("predict", image, "--model", tiny_run, "-o", predictions)
    assert result.returncode == 2 and "not a table this command wrote" in result.output
    result = cli("predict", image, "--model", tiny_run, "-o", predictions.with_suffix(".png"))
    assert "expected a .csv or .json file name" in result.output


@pytest.mark.slow
def test_overwrite_leaves_a_linked_log_whole(small_data, cache_dir, tmp_path):
    """A train.log that is a link (say, to a log several runs share) is never cut by --overwrite."""
    shared = tmp_path / "shared.log"
    shared.write_text("2026-01-01 00:00:00,000 INFO another run's line\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").symlink_to(shared)
    settings = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(run), mode="linear",
                    cache_dir=str(cache_dir), num_workers=0, linear_c=[0.1], **CHEAP_PROBE)
    train(load_config(None, **settings))
    train(load_config(None, **settings), overwrite=True)
    assert shared.read_text().startswith("2026-01-01 00:00:00,000 INFO another run's line\n")
    assert shared.read_text().count("linear head C=0.1") == 2


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_and_a_stopped_run_logs_why(small_data, cache_dir, tmp_path, monkeypatch):
    """A start refused on its inputs left a folder holding an empty train.log; a run that stopped later had no word
    of why in its log (only on the console)."""
    settings = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), mode="linear",
                    cache_dir=str(cache_dir), num_workers=0, linear_c=[0.1], **CHEAP_PROBE)
    bad_labels = {"melanoma": 1, "nevus": 0}  # seborrheic_keratosis missing: refused before the run begins
    new, empty = tmp_path / "new" / "run", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        with pytest.raises(DataError, match="not in the label map"):
            train(load_config(None, **settings, out=str(out), labels=bad_labels))
    assert not new.parent.exists()  # the folders the start made, its parent too
    assert empty.is_dir() and not any(empty.iterdir())  # the user's own folder stays

    training = importlib.import_module("skincancer.train")  # the module; skincancer.train is also the function
    def failing_fit(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(training, "fit_linear", failing_fit)
    with pytest.raises(RuntimeError, match="disk full"):
        train(load_config(None, **settings, out=str(new)))
    assert (new / "config.yaml").is_file()  # the run had begun: its folder stays, and its log says why it stopped
    assert (new / "train.log").read_text().splitlines()[-1].endswith("ERROR training stopped: disk full")
