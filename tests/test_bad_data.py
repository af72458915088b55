"""Bad data: `index` names every bad file; train, evaluate and predict report files that turn bad and finish."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from badcorpus import ODD, bad_names, expected_reason, make_bad_corpus, real_images, unprivileged_preexec
from conftest import CHEAP_PROBE, run_cli
from PIL import Image

import skincancer
from skincancer.config import ISIC2017_LABELS
from skincancer.data import DataError, load_image

pytestmark = pytest.mark.slow


def cli_unprivileged(*args: str | Path) -> subprocess.CompletedProcess:
    """The command over the bad corpus, whose chmod 000 file only an ordinary user fails to read. As root it runs in
    a child process that drops the capabilities bypassing file permissions (this process must keep them); else in
    this process."""
    preexec = unprivileged_preexec()
    if preexec is None:
        return run_cli(*args)
    return subprocess.run([sys.executable, "-m", "skincancer", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bad") / "tree"
    return root, make_bad_corpus(root, data_dir)


# ---------------------------------------------------------------- index


def test_index_lists_every_bad_file_with_its_reason_and_fails(corpus, tmp_path):
    root, files = corpus
    out = tmp_path / "manifest.csv"
    # As root, chmod 000 stops nothing: the child drops the capabilities that bypass file permissions.
    result = cli_unprivileged("index", root, "-o", out)
    no_traceback(result)
    assert result.returncode == 2, result.stderr
    assert not out.exists()
    listed = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in result.stderr.splitlines()
              if line.startswith("bad file: ")}
    assert set(listed) == {str(files[name]) for name in bad_names()}, result.stderr
    for name in bad_names():
        assert expected_reason(name) in listed[str(files[name])], (name, listed[str(files[name])])
    assert f"{len(bad_names())} of {len(files)} files are unusable" in result.stderr
    assert "--skip-bad" in result.stderr


def test_index_skip_bad_keeps_good_and_converts_odd_images(corpus, tmp_path, data_dir):
    root, files = corpus
    out = tmp_path / "manifest.csv"
    result = cli_unprivileged("index", root, "-o", out, "--skip-bad")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert f"{len(bad_names())} skipped" in result.stdout
    manifest = skincancer.load_manifest(out)
    good = {str(path) for name, path in files.items() if name not in bad_names()}
    assert set(manifest["filepath"]) == good
    assert all(name in {Path(p).stem for p in manifest["filepath"]} for name in ODD)

    lesion = np.asarray(Image.open(real_images(data_dir, "melanoma", 1, skip=2)[0]).convert("RGB"), np.float32)
    odd = {name: np.asarray(load_image(files[name]), np.float32) for name in ODD}
    assert all(image.ndim == 3 and image.shape[2] == 3 for image in odd.values())
    # EXIF orientation 6: stored as 256 wide x 128 high, shown 128 wide x 256 high
    assert odd["exif_rotated"].shape[:2] == (256, 128)
    # transparent margin composited on white, the rest is the lesion
    width = lesion.shape[1] // 4
    assert (odd["png_alpha"][:, :width] == 255).all()
    assert np.abs(odd["png_alpha"][:, width:] - lesion[:, width:]).max() <= 1
    # 16-bit gray scaled back to 8 bits, not clipped to white
    gray = np.asarray(Image.fromarray(lesion.astype(np.uint8)).convert("L"), np.float32)
    assert np.abs(odd["gray16_png"][..., 0] - gray).max() <= 1
    # CMYK -> RGB gives the lesion back (up to JPEG loss), not inverted or garbled colours
    assert np.abs(odd["cmyk_jpeg"] - lesion).mean() < 8


# ---------------------------------------------------------------- files that turn bad after indexing


@pytest.fixture(scope="module")
def turned_bad(corpus, tmp_path_factory, data_dir) -> dict:
    """Manifests written by `index --skip-bad`; then some listed files are truncated, deleted or overwritten."""
    base = tmp_path_factory.mktemp("turned")
    train_root = base / "train"
    files = make_bad_corpus(train_root, data_dir, per_class=3)
    result = cli_unprivileged("index", train_root, "-o", base / "train.csv", "--skip-bad")
    assert result.returncode == 0, result.stderr
    valid_root = base / "valid"
    for diagnosis in ISIC2017_LABELS:
        (valid_root / diagnosis).mkdir(parents=True)
        for src in sorted((data_dir / "valid" / diagnosis).glob("*.jpg"))[:3]:
            shutil.copy(src, valid_root / diagnosis / src.name)
    skincancer.save_manifest(skincancer.index_folder(valid_root, ISIC2017_LABELS), base / "valid.csv")

    truncated, deleted, overwritten = files["real_nevus_0"], files["real_melanoma_1"], files[
        "real_seborrheic_keratosis_0"]
    truncated.write_bytes(truncated.read_bytes()[:3000])
    deleted.unlink()
    overwritten.write_text("<html>404 Not Found</html>\n")
    valid_bad = sorted((valid_root / "melanoma").glob("*.jpg"))[0]
    valid_bad.write_bytes(valid_bad.read_bytes()[:2000])
    return {
        "train": base / "train.csv", "valid": base / "valid.csv", "files": files, "cache": base / "cache",
        "train_bad": {truncated: "truncated", deleted: "", overwritten: ""}, "valid_bad": valid_bad,
        "n_train": len(pd.read_csv(base / "train.csv")), "n_valid": len(pd.read_csv(base / "valid.csv")),
    }


def tiny_settings(data: dict, out: Path, mode: str) -> dict:
    return dict(train=str(data["train"]), valid=str(data["valid"]), out=str(out), mode=mode, image_size=64,
                epochs=1, max_steps_per_epoch=2, batch_size=8, num_workers=0, cache_dir=str(data["cache"]))


def assert_reported(text: str, paths) -> None:
    for path in paths:
        assert f"skipped {path}" in text, (path, text[-3000:])


@pytest.fixture(scope="module")
def linear_run(turned_bad, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "linear"
    return skincancer.train(skincancer.load_config(None, linear_c=[1.0], **tiny_settings(turned_bad, out, "linear"),
                                                   **CHEAP_PROBE))


def test_linear_training_skips_files_that_turned_bad(turned_bad, linear_run):
    assert (linear_run / "model").is_dir()
    log = (linear_run / "train.log").read_text()
    assert_reported(log, [*turned_bad["train_bad"], turned_bad["valid_bad"]])
    for name in ODD:  # odd but valid images are used, not skipped
        assert f"skipped {turned_bad['files'][name]}" not in log
    validation = json.loads((linear_run / "valid_metrics.json").read_text())
    assert validation["n"] == turned_bad["n_valid"] - 1
    assert 0 <= validation["auc"] <= 1


def test_finetune_cli_skips_files_that_turned_bad(cli, turned_bad, tmp_path):
    out = tmp_path / "finetune"
    settings = tiny_settings(turned_bad, out, "finetune")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"cache_dir": settings.pop("cache_dir")}))  # JSON is YAML
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    result = cli("train", "--config", config, *flags)
    no_traceback(result)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model").is_dir()
    # batch 8 x 2 steps covers the whole (shuffled) training manifest, so every bad file is met once
    assert turned_bad["n_train"] <= 16
    assert_reported(result.stderr, [*turned_bad["train_bad"], turned_bad["valid_bad"]])
    assert_reported((out / "train.log").read_text(), turned_bad["train_bad"])
    assert len(pd.read_csv(out / "summary.csv")) == 1


def test_evaluate_reports_skipped_files_in_metrics(turned_bad, linear_run, tmp_path):
    metrics = skincancer.evaluate(skincancer.load_model(linear_run, engine="torch"), turned_bad["valid"],
                                  tmp_path / "eval", num_workers=0, n_boot=50)
    assert [item["path"] for item in metrics["skipped"]] == [str(turned_bad["valid_bad"])]
    assert "truncated" in metrics["skipped"][0]["reason"]
    assert metrics["n"] == turned_bad["n_valid"] - 1
    table = pd.read_csv(tmp_path / "eval" / "predictions.csv", keep_default_na=False)
    assert (table["error"] != "").sum() == 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["skipped"] == metrics["skipped"]


def test_evaluate_cli_on_the_whole_bad_corpus_with_loader_workers(corpus, linear_run, tmp_path):
    root, files = corpus
    result = cli_unprivileged("evaluate", "--model", linear_run, "--data", root, "--out", tmp_path / "eval",
                              "--num-workers", "2")
    no_traceback(result)
    # everything is written, and the exit status says the figures leave images out
    assert result.returncode == 1, result.stderr[-3000:]
    assert (f"error: {len(bad_names())} of {len(files)} images could not be read (named above and in metrics.json); "
            f"the figures are on the other {len(files) - len(bad_names())}") in result.stderr
    assert (tmp_path / "eval" / "report.html").is_file()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    skipped = {item["path"]: item["reason"] for item in metrics["skipped"]}
    assert set(skipped) == {str(files[name]) for name in bad_names()}
    for name in bad_names():
        assert expected_reason(name) in skipped[str(files[name])]
    assert metrics["n"] == len(files) - len(bad_names())


def test_predict_api_names_bad_files_and_scores_the_rest(turned_bad, linear_run):
    manifest = skincancer.load_manifest(turned_bad["train"])
    table = skincancer.load_model(linear_run, engine="torch").predict(list(manifest["filepath"]), batch_size=4)
    failed = table[table["error"] != ""]
    assert set(failed["source"]) == {str(p) for p in turned_bad["train_bad"]}
    assert failed["malignant"].isna().all() and (failed["label"] == "").all()
    good = table[table["error"] == ""]
    assert good["malignant"].between(0, 1).all()
    assert {str(turned_bad["files"][name]) for name in ODD} <= set(good["source"])


def test_predict_cli_on_the_whole_bad_corpus(corpus, linear_run, tmp_path):
    root, files = corpus
    out = tmp_path / "predictions.csv"
    result = cli_unprivileged("predict", root, "--model", linear_run, "-o", out, "--num-workers", "0")
    no_traceback(result)
    assert result.returncode == 1, result.stderr  # finished, with failures to report
    table = pd.read_csv(out, keep_default_na=False)
    assert set(table["source"]) == {str(p) for p in files.values()}
    errors = dict(zip(table["source"], table["error"], strict=True))
    for name, path in files.items():
        if name in bad_names():
            assert expected_reason(name) in errors[str(path)], (name, errors[str(path)])
            assert f"error: {path}: {errors[str(path)]}" in result.stderr
        else:
            assert errors[str(path)] == "", (name, errors[str(path)])
    assert f"{len(files) - len(bad_names())} predicted, {len(bad_names())} failed" in result.stderr


# ---------------------------------------------------------------- config and CLI: refused before any work


@pytest.mark.parametrize(
    ("yaml_text", "flags", "field"),
    [
        ("epochs: 1\nlearning_rate: 0.1\n", [], "learning_rate"),
        ("epochs: ten\n", [], "epochs"),
        ("", ["--epochs", "ten"], "epochs"),
        ("", ["--epochs", "-1"], "epochs"),
        ("", ["--image-size", "0"], "image_size"),
        ("", ["--threshold-policy", "fixed:1.5"], "threshold_policy"),
        ("", ["--learning-rate", "0.1"], "learning-rate"),
    ],
    ids=["unknown-key", "wrong-type-yaml", "wrong-type-flag", "negative-epochs", "image-size-0", "threshold-1.5",
         "unknown-flag"],
)
def test_bad_config_fails_before_any_work_naming_the_field(cli, small_data, tmp_path, yaml_text, flags, field):
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text or "mode: finetune\n")
    out = tmp_path / "run"
    result = cli("train", "--config", config, "--train", small_data["train"], "--valid", small_data["valid"],
                 "--out", out, *flags)
    no_traceback(result)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert field in result.stderr, result.stderr
    assert not out.exists(), "a run folder was created before the config was checked"
    assert "Model:" not in result.stdout  # no model was built



# ---------------------------------------------------------------- every file of a split gone


@pytest.mark.parametrize("mode", ["finetune", "linear"])
@pytest.mark.parametrize(("split", "damage"), [("valid", "deleted"), ("train", "deleted"), ("train", "junk")])
def test_train_stops_clearly_when_no_file_of_a_split_is_usable(cli, data_dir, tmp_path, mode, split, damage):
    """All files of a split deleted (or all turned to junk) after indexing: a clear error naming the manifest and
    the files, never a traceback from inside the loss or a 'trained' model that saw no image."""
    manifests = {}
    for name in ("train", "valid"):
        root = tmp_path / name
        for diagnosis in ISIC2017_LABELS:
            (root / diagnosis).mkdir(parents=True)
            for src in sorted((data_dir / name / diagnosis).glob("*.jpg"))[:2]:
                shutil.copy(src, root / diagnosis / src.name)
        manifests[name] = skincancer.save_manifest(skincancer.index_folder(root, ISIC2017_LABELS),
                                                   tmp_path / f"{name}.csv")
    victims = sorted((tmp_path / split).rglob("*.jpg"))
    for path in victims:
        path.unlink() if damage == "deleted" else path.write_text("<html>404 Not Found</html>\n")
    out, config = tmp_path / "run", tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"cache_dir": str(tmp_path / "cache"), **CHEAP_PROBE}))  # JSON is YAML
    result = cli("train", "--config", config, "--mode", mode, "--train", manifests["train"], "--valid",
                 manifests["valid"], "--out", out, "--epochs", 1, "--image-size", 64, "--batch-size", 4,
                 "--num-workers", 0)
    no_traceback(result)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error:" in result.stderr, result.stderr[-3000:]
    error = result.stderr[result.stderr.rindex("error:"):]
    if damage == "deleted":
        assert f"{manifests[split]}: none of the {split} manifest's 6 files exists" in error, error
        assert str(victims[0]) in error
    else:
        assert f"{manifests[split]}: none of the 6 {split} images can be read" in error, error  # before any work
        assert_reported(result.stderr, victims)
    assert not (out / "model").exists()


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_output_path_taken_by_a_file_is_a_clear_error(cli, small_data, tiny_run, tmp_path, command):
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    if command == "train":
        args = ["train", "--mode", "linear", "--train", small_data["train"], "--valid", small_data["valid"]]
    else:
        args = ["evaluate", "--model", tiny_run, "--data", small_data["test"]]
    result = cli(*args, "--out", taken / "sub" if command == "train" else taken)
    no_traceback(result)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {taken}" in result.stderr and "a file is in the way" in result.stderr, result.stderr[-3000:]
    assert taken.read_text() == "keep me\n"  # never lost work


def test_train_never_replaces_a_run_or_fills_a_data_folder_unasked(small_data, cache_dir, tmp_path):
    settings = dict(train=str(small_data["train"]), valid=str(small_data["valid"]), mode="linear", linear_c=[1.0],
                    num_workers=0, cache_dir=str(cache_dir), **CHEAP_PROBE)
    out = tmp_path / "run"
    skincancer.train(skincancer.load_config(None, out=str(out), **settings))
    weights = (out / "model" / "model.safetensors").read_bytes()
    (out / "test").mkdir()  # an evaluation the user wrote into the run folder
    again = skincancer.load_config(None, out=str(out), seed=5, **settings)
    with pytest.raises(DataError, match="already holds a trained run.*--overwrite"):
        skincancer.train(again)
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    skincancer.train(again, overwrite=True)
    assert json.loads((out / "model" / "model.json").read_text())["weights_sha256"]
    assert (out / "test").is_dir()  # only the run's own files are replaced
    images = tmp_path / "images"
    images.mkdir()
    (images / "lesion.jpg").write_bytes(b"not really")
    with pytest.raises(DataError, match="not empty and not a run folder"):
        skincancer.train(skincancer.load_config(None, out=str(images), **settings), overwrite=True)
    assert sorted(p.name for p in images.iterdir()) == ["lesion.jpg"]
