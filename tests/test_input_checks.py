"""Tests: bad input (label maps, ISIC CSVs, manifests, config files, download options) gets an error naming it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from skincancer import download
from skincancer.config import DEFAULT_LABELS, ConfigError, load_config, parse_labels
from skincancer.data import DataError, load_manifest, resolve_data
from skincancer.download import DownloadError, download_dataset, download_file, isic2017_archives, load_archive_list
from skincancer.sources import index_isic_csv

# ---------------------------------------------------------------- label maps and config values


@pytest.mark.parametrize(("text", "key"), [
    ("melanoma=1,nevus=0,nevus=1,seborrheic_keratosis=0", "nevus"),
    ("melanoma=1,nevus=0,seborrheic_keratosis=0,melanoma=0", "melanoma"),
])
def test_label_given_twice_is_named(text, key):
    with pytest.raises(ConfigError, match=f"labels: {key} given twice"):
        parse_labels(text)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"warmup_epochs": float("inf")}, "warmup_epochs"),
    ({"linear_c": [0.1, float("nan")]}, "linear_c"),
    ({"linear_c": [0.1, float("inf")]}, "linear_c"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
])
def test_non_finite_floats_and_seed_out_of_range_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        load_config(None, **overrides)
    assert load_config(None, seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize(("content", "message"), [
    ("weight_decay: .nan\n", "weight_decay: must be a finite number"),
    ("mode: finetune  # r\xe9glage\n".encode("latin-1"), r"c\.yaml: not UTF-8"),
    ("lr: 0.001\nepochs: 3\nlr: 0.01\n", r"c\.yaml: key 'lr' given twice \(lines 1 and 3\)"),
    ("labels: {melanoma: 1, nevus: 0, melanoma: 0}\n", "key 'melanoma' given twice"),
], ids=["nan", "not-utf8", "key-twice", "nested-key-twice"])
def test_bad_yaml_names_the_file_or_field(tmp_path: Path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_yaml_exponent_floats_are_numbers(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-2\nlinear_c: [1e-4, 1e-2, 1]\n")
    config = load_config(path)
    assert (config.lr, config.weight_decay, config.linear_c) == (0.001, 0.05, [1e-4, 1e-2, 1.0])
    path.write_text("lr: '1e-3'\n")
    with pytest.raises(ConfigError, match="lr: .*without quotes"):
        load_config(path)


def test_cuda_device_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^device: 'cuda'"):
        load_config(None, device="cuda")
    assert load_config(None, device="auto").device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(None, device="cuda").device == "cuda"


# ---------------------------------------------------------------- official ISIC ground-truth CSVs

GOOD_ROWS = ["ISIC_0000000,0.0,0.0", "ISIC_0000001,1.0,0.0", "ISIC_0000002,0.0,1.0"]


@pytest.mark.parametrize(("bad_row", "message"), [
    ("ISIC_0000009,,0.0", r"row 5 \(ISIC_0000009\): column melanoma is empty"),
    ("ISIC_0000009,0.0,", r"row 5 \(ISIC_0000009\): column seborrheic_keratosis is empty"),
    ("ISIC_0000009,1.0,1.0", r"row 5 \(ISIC_0000009\): columns melanoma and seborrheic_keratosis are both 1"),
    ("ISIC_0000009,7,0", r"row 5 \(ISIC_0000009\): column melanoma must be 0 or 1, got '7'$"),
    ("ISIC_0000009,0,0.5", r"row 5 \(ISIC_0000009\): column seborrheic_keratosis must be 0 or 1, got '0.5'$"),
    ("ISIC_0000001,0.0,0.0", r"image_id 'ISIC_0000001' appears more than once \(rows 3, 5\)"),
    (",0.0,0.0", r"row 5: column image_id is empty"),
])
def test_bad_isic_ground_truth_cells_are_named(tmp_path: Path, bad_row, message):
    csv = tmp_path / "gt.csv"
    csv.write_text("\n".join(["image_id,melanoma,seborrheic_keratosis", *GOOD_ROWS, bad_row]) + "\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"gt\.csv: " + message):
        index_isic_csv(csv, tmp_path / "images", DEFAULT_LABELS)
    csv.write_text("\n".join(["image_id,melanoma,seborrheic_keratosis", *GOOD_ROWS]) + "\n")
    assert list(index_isic_csv(csv, tmp_path / "images", DEFAULT_LABELS)["diagnosis"]) == [
        "nevus", "melanoma", "seborrheic_keratosis"]


# ---------------------------------------------------------------- manifests


def write_manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(["image_id,filepath,diagnosis,label", *rows]) + "\n")
    return path


@pytest.mark.parametrize(("rows", "message"), [
    (["a,a.jpg,nevus,0", "b,,melanoma,1"], r"m\.csv: row 3: column filepath is empty"),
    (["a,a.jpg,nevus,0", "b,b.jpg,melanoma,"], r"m\.csv: row 3: column label is empty"),
    (["a,a.jpg,nevus,0", "b,b.jpg,melanoma,2"], r"m\.csv: row 3: column label must hold 0 or 1, found 2$"),
    (["a,a.jpg,nevus,0", "b,b.jpg,melanoma,1", "a,c.jpg,nevus,0"],
     r"m\.csv: image_id 'a' appears more than once \(rows 2, 4\)"),
    (["a,a.jpg,nevus,0", "b,b.jpg,melanoma,1", "c,./a.jpg,nevus,0"],
     r"m\.csv: filepath '.*a\.jpg' appears more than once \(rows 2, 4\)"),
    (["a,a.jpg,melanoma,1", "b,b.jpg,nevus,0", "c,c.jpg,melanoma,0"],
     r"m\.csv: diagnosis 'melanoma' has label 0 \(row 4\) and label 1 \(row 2\)"),
])
def test_bad_manifest_rows_are_named(tmp_path: Path, rows, message):
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(DataError, match=message):
        load_manifest(manifest)
    with pytest.raises(DataError, match=message):  # what preview, train and evaluate call
        resolve_data(manifest, DEFAULT_LABELS)


def test_good_manifest_still_loads(tmp_path: Path):
    manifest = load_manifest(write_manifest(tmp_path / "m.csv", ["a,a.jpg,melanoma,1", "b,b.jpg,nevus,0",
                                                                 "c,c.jpg,nevus,0.0"]))
    assert list(manifest["label"]) == [1, 0, 0]
    assert list(manifest["filepath"]) == [str(tmp_path / f"{x}.jpg") for x in "abc"]


# ---------------------------------------------------------------- download options


def test_base_url_that_is_not_a_url_is_named(cli):
    with pytest.raises(DownloadError, match="'notaurl/' is not an http"):
        isic2017_archives("notaurl")
    result = cli("download", "isic2017", "--dest", "unused", "--base-url", "notaurl")
    assert result.returncode == 2 and "error: --base-url: 'notaurl/' is not an http" in result.output


def test_url_list_entries_must_be_urls(tmp_path: Path):
    path = tmp_path / "urls.yaml"
    path.write_text("hello: world\n")
    with pytest.raises(DownloadError, match=r"urls\.yaml: entry 1: 'world' is not an http"):
        load_archive_list(path)
    path.write_text("- ftp://h/train.zip\n")
    with pytest.raises(DownloadError, match="ftp://h/train.zip"):
        load_archive_list(path)
    path.write_text("- {url: 'http://h/a.zip', sha256: zz}\n")
    with pytest.raises(DownloadError, match="sha256 must be 64 hexadecimal digits"):
        load_archive_list(path)
    path.write_text("train: {url: 'http://h/a.zip', size: 10}\n")
    assert load_archive_list(path) == [download.Archive("train", "http://h/a.zip", None, 10)]


def test_negative_retries_are_refused(tmp_path: Path):
    with pytest.raises(DownloadError, match="retries must be a whole number >= 0, got -1"):
        download_dataset(isic2017_archives("http://127.0.0.1:9/"), tmp_path / "d", retries=-1, progress=False)
    with pytest.raises(DownloadError, match="retries"):
        download_file("http://127.0.0.1:9/a.zip", tmp_path / "a.zip", retries=-1, progress=False)
    assert not (tmp_path / "d").exists()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refused_connection_fails_without_waiting(tmp_path: Path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    url = f"http://127.0.0.1:{closed_port()}/train.zip"
    with pytest.raises(DownloadError, match="train.zip: connection refused"):
        download_file(url, tmp_path / "train.zip", retries=5, retry_wait=2.0, progress=False)
    assert waits == []


def test_retry_waits_grow_but_are_capped(tmp_path: Path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(download.time, "sleep", waits.append)

    def broken(*args, **kwargs):
        raise download._Retryable("connection reset")

    monkeypatch.setattr(download, "_fetch_into", broken)
    with pytest.raises(DownloadError, match="gave up after 20 retries"):
        download_file("http://h/a.zip", tmp_path / "a.zip", retries=20, retry_wait=2.0, progress=False)
    assert waits[:3] == [2.0, 4.0, 6.0] and max(waits) == download.MAX_RETRY_WAIT


# ---------------------------------------------------------------- folder trees, evaluation data, output paths


def test_same_file_name_in_two_class_folders_gets_distinct_ids(tmp_path: Path, data_dir):
    from skincancer import index_folder, save_manifest

    sources = sorted((data_dir / "train" / "nevus").glob("*.jpg"))[:2]
    for diagnosis, source in (("melanoma", sources[0]), ("nevus", sources[1])):
        (tmp_path / "tree" / diagnosis).mkdir(parents=True)
        (tmp_path / "tree" / diagnosis / "001.jpg").write_bytes(source.read_bytes())
    (tmp_path / "tree" / "nevus" / "002.jpg").write_bytes(sources[0].read_bytes())
    frame = index_folder(tmp_path / "tree", DEFAULT_LABELS)
    assert sorted(frame["image_id"]) == ["002", "melanoma/001", "nevus/001"]
    loaded = load_manifest(save_manifest(frame, tmp_path / "m.csv"))  # refuses duplicate ids: these load
    assert len(loaded) == 3


def test_evaluate_needs_both_labels_and_writes_strict_json(tiny_run, small_data, tmp_path: Path):
    import json

    import pandas as pd

    from skincancer import evaluate, load_model

    classifier = load_model(tiny_run, engine="torch")
    test = pd.read_csv(small_data["test"])
    benign = tmp_path / "benign.csv"
    test[test["label"] == 0].assign(filepath=lambda t: [str(Path(small_data["test"]).parent / f) for f in t["filepath"]]
                                    ).to_csv(benign, index=False)
    with pytest.raises(DataError, match="every image is benign"):
        evaluate(classifier, benign, tmp_path / "one", num_workers=0, n_boot=20)
    no_keratosis = tmp_path / "no_sk.csv"
    keep = test[test["diagnosis"] != "seborrheic_keratosis"]
    keep.assign(filepath=[str(Path(small_data["test"]).parent / f) for f in keep["filepath"]]).to_csv(
        no_keratosis, index=False)
    evaluate(classifier, no_keratosis, tmp_path / "two", num_workers=0, n_boot=20)
    text = (tmp_path / "two" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert metrics["class_auc"].get("seborrheic_keratosis") is None
    assert 0 <= metrics["auc"] <= 1


@pytest.mark.parametrize(("args", "message"), [
    (["preview", "{manifest}", "-o", "{image}"], "expected a .png file name"),
    (["preview", "{manifest}", "--n", "0"], "--n: expected 1 or more"),
    (["predict", "{image}", "--model", "{run}", "-o", "{image}"], "expected a .csv or .json file name"),
    (["predict", "{image}", "--model", "{run}", "--format", "json", "-o", "{copy}.json"], None),
    (["predict", "{image}", "--model", "{run}", "--tta", "3"], "--tta: must be 1, 2, 4, 8 or a multiple"),
    (["predict", "{image}", "--model", "{run}", "--batch-size", "0"], "--batch-size: expected 1 or more"),
    (["predict", "{image}", "--model", "{run}", "--cam", "{image}"], "--cam"),
    (["evaluate", "--model", "{run}", "--data", "{manifest}", "--out", "{tmp}/e", "--num-workers", "-1"],
     "--num-workers"),
    (["export", "--model", "{run}", "-o", "{image}"], "expected a .onnx file name"),
    (["index", "{tree}", "-o", "{image}"], "expected a .csv file name"),
    (["serve", "--model", "{run}", "--port", "70000"], "--port: expected 0-65535"),
    (["serve", "--model", "{run}", "--max-upload-mb", "-5"], "--max-upload-mb"),
    (["serve", "--model", "{run}", "--max-batch", "0"], "--max-batch: expected 1-1000 files"),
    (["train", "--train", "{manifest}", "--valid", "{manifest}", "--out", "{tmp}/r", "--nproc", "0"], "--nproc"),
])
def test_cli_options_and_output_paths_are_checked_before_any_work(cli, tiny_run, small_data, data_dir, tmp_path: Path,
                                                                   args, message):
    tree = tmp_path / "tree" / "nevus"
    tree.mkdir(parents=True)
    image = tree / "lesion.jpg"
    original = sorted((data_dir / "test" / "nevus").glob("*.jpg"))[0].read_bytes()
    image.write_bytes(original)
    names = {"manifest": small_data["test"], "image": image, "run": tiny_run, "tmp": tmp_path,
             "tree": tmp_path / "tree", "copy": tmp_path / "copy"}
    result = cli(*(a.format(**names) for a in args))
    assert image.read_bytes() == original  # the input is never overwritten
    if message is None:
        assert result.returncode == 0, result.output
        return
    assert result.returncode == 2, result.output
    assert message in result.output, result.output


def test_serve_names_a_port_in_use_before_loading_the_model(cli, tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("serve", "--model", str(tmp_path / "no-such-run"), "--port", str(port))
    assert result.returncode == 2, result.output
    assert f"--port {port}: cannot listen there: already in use" in result.output


def test_positive_and_negative_names_must_differ():
    with pytest.raises(ConfigError, match="positive_name / negative_name"):
        load_config(None, positive_name="x", negative_name="x")


def test_predict_age_must_be_a_number(cli, tiny_run, data_dir):
    image = sorted((data_dir / "test" / "nevus").glob("*.jpg"))[0]
    result = cli("predict", str(image), "--model", str(tiny_run), "--age", "nan")
    assert result.returncode == 2 and "--age" in result.output, result.output


def test_identical_images_are_reported_and_conflicting_labels_refused(cli, tmp_path: Path, data_dir):
    source = sorted((data_dir / "train" / "nevus").glob("*.jpg"))
    for diagnosis, names in (("nevus", ["a", "b", "c"]), ("melanoma", ["d"])):
        (tmp_path / "tree" / diagnosis).mkdir(parents=True)
        for name, src in zip(names, source, strict=False):
            (tmp_path / "tree" / diagnosis / f"{name}.jpg").write_bytes(src.read_bytes())
    (tmp_path / "tree" / "nevus" / "copy_of_b.jpg").write_bytes(source[1].read_bytes())
    result = cli("index", str(tmp_path / "tree"), "-o", str(tmp_path / "m.csv"))
    # d.jpg (melanoma) has the bytes of a.jpg (nevus)
    assert result.returncode == 2 and "error: " in result.stderr, result.output  # the DataError, as main() prints it
    error = result.stderr.split("error: ", 1)[1]
    assert "labelled both malignant and benign" in error and "a.jpg" in error
    (tmp_path / "tree" / "melanoma" / "d.jpg").write_bytes(source[5].read_bytes())
    result = cli("index", str(tmp_path / "tree"), "-o", str(tmp_path / "m.csv"))
    assert result.returncode == 0, result.output
    assert "identical files (one image counted 2 times)" in result.output and "copy_of_b.jpg" in result.output


def test_training_names_validation_images_that_are_training_images(tmp_path: Path, data_dir, caplog):
    import pandas as pd

    from skincancer.runfolder import warn_shared_images

    files = sorted((data_dir / "train" / "nevus").glob("*.jpg"))[:3]
    copy = tmp_path / "renamed.jpg"
    copy.write_bytes(files[0].read_bytes())
    other = str(sorted((data_dir / "valid" / "nevus").glob("*.jpg"))[0])
    train = pd.DataFrame({"filepath": [str(f) for f in files]})
    with caplog.at_level("WARNING", logger="skincancer"):
        warn_shared_images(train, pd.DataFrame({"filepath": [str(copy), other]}))
        assert f"{copy} is also in train as {files[0]}" in caplog.text
        caplog.clear()
        warn_shared_images(train.iloc[1:], pd.DataFrame({"filepath": [str(copy), other]}))
        assert caplog.text == ""
    # validation made only of training images (--valid the same as --train): nothing could be chosen honestly
    with pytest.raises(DataError, match="v.csv: every validation image is also a training image"):
        warn_shared_images(train, pd.DataFrame({"filepath": [str(copy), str(files[1])]}), valid_source="v.csv")


def test_python_api_names_odd_image_inputs(tiny_run):
    import numpy as np

    from skincancer import load_model

    classifier = load_model(tiny_run, engine="torch")
    for images, error, message in [
        ([np.full((64, 64, 3), np.nan, np.float32)], ValueError, "image 0: array holds NaN"),
        ([np.zeros((3, 64, 64), np.uint8)], ValueError, "channels-first"),
        ([None], TypeError, "image 0: expected a path"),
        (None, TypeError, "images: expected an image"),
        (b"\xff\xd8 a JPEG's bytes", TypeError, "encoded bytes"),
        ([np.zeros((64, 64), bool)], ValueError, "array of bool"),
        ([np.zeros((64, 64, 2), np.uint8)], ValueError, "H x W x 1, 3 or 4"),
    ]:
        with pytest.raises(error, match=message):
            classifier.predict(images)
    table = classifier.predict([np.zeros((64, 64, 3), np.float32)])
    assert table["error"].iloc[0] == "" and 0 <= table["malignant"].iloc[0] <= 1


def test_python_api_reads_arrays_by_their_type_and_answers_each_image(tiny_run, data_dir):
    import numpy as np
    from PIL import Image

    from skincancer import load_model

    classifier = load_model(tiny_run, engine="torch")
    rgb = np.asarray(Image.open(sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0]).convert("RGB"))
    expected, _ = classifier.predict_proba([rgb])
    rounded = rgb / 255.0
    rounded[0, 0, 0] = 1.0001  # float arithmetic a hair above 1: still a 0..1 image
    for i, same in enumerate([rgb.astype(np.uint16) * 257, rgb.astype(">u2") * 257, rgb / 255.0, rounded,
                              rgb.astype(np.float32), rgb.astype(np.int64)]):
        np.testing.assert_allclose(classifier.predict_proba([same])[0], expected, atol=2e-3, err_msg=str(i))
    np.testing.assert_allclose(classifier.predict_proba(rgb)[0], expected, atol=1e-6)  # one array, not its rows
    np.testing.assert_allclose(classifier.predict_proba([rgb[..., :1]])[0],
                               classifier.predict_proba([rgb[..., 0]])[0], atol=1e-6)  # H x W x 1 is grey
    for refused, words in [(rgb / 255.0 * 2 - 1, "normalised tensor"), (rgb * 300.0, "expected 0..255"),
                           (rgb.astype(np.int32) * 1000, "int32 array with values")]:
        with pytest.raises(ValueError, match=words):
            classifier.predict_proba([refused])
    probs, errors = classifier.predict_proba([Image.new("RGB", (2, 2)), rgb])  # a tiny image is that image's error
    assert errors == [(0, "image too small (2x2, need at least 8 px a side)")]
    assert np.isnan(probs[0]).all() and np.allclose(probs[1], expected[0], atol=1e-6)
    import pickle

    from skincancer.data import ImageError

    again = pickle.loads(pickle.dumps(ImageError("<image 0>", "image too small")))  # crosses into spawned workers
    assert (again.path, again.reason, str(again)) == ("<image 0>", "image too small", "<image 0>: image too small")


def test_predict_never_overwrites_a_file_it_did_not_write_and_honours_format(cli, tiny_run, small_data, data_dir,
                                                                            tmp_path: Path):
    import json

    image = str(sorted((data_dir / "test" / "nevus").glob("*.jpg"))[0])
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(Path(small_data["test"]).read_bytes())
    result = cli("predict", image, "--model", str(tiny_run), "-o", str(manifest))
    assert result.returncode == 2 and "not a table this command wrote" in result.output, result.output
    assert manifest.read_bytes() == Path(small_data["test"]).read_bytes()
    table = tmp_path / "p.csv"
    for _ in range(2):  # its own table it may replace
        result = cli("predict", image, "--model", str(tiny_run), "-o", str(table))
        assert result.returncode == 0, result.output
    result = cli("predict", image, "--model", str(tiny_run), "--format", "json")
    assert result.returncode == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert rows[0]["source"] == image


def test_an_unfinished_model_is_flagged_by_the_api_and_the_report(tiny_run, small_data, tmp_path: Path):
    import json
    import shutil

    from fastapi.testclient import TestClient

    from skincancer import evaluate, load_model
    from skincancer.serve import create_app

    run = tmp_path / "killed"
    shutil.copytree(Path(tiny_run) / "model", run / "model")
    card = run / "model" / "model.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "unfinished": True, "epoch": 2}))
    with TestClient(create_app(run)) as client:
        assert "warning" in client.get("/api/health").json()
        assert client.get("/api/model").json()["unfinished"] is True
        frame = __import__("pandas").read_csv(small_data["test"])
        photo = Path(small_data["test"]).parent / frame["filepath"].iloc[0]
        answer = client.post("/api/predict", files={"file": ("x.jpg", photo.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200 and "has not finished" in answer.json()["warning"]
        answer = client.post("/api/predict", files={"file": ("x.jpg", photo.read_bytes(), "image/jpeg")},
                             data={"age": "nan"})
        assert answer.status_code == 422 and "age" in answer.json()["detail"]
    metrics = evaluate(load_model(run, engine="torch"), small_data["test"], tmp_path / "eval", num_workers=0,
                       n_boot=20)
    assert metrics["unfinished_models"] == [str(run / "model")]
    assert "Unfinished training" in (tmp_path / "eval" / "report.html").read_text()
