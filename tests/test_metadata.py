"""Age/sex metadata: reading and checking it, the metadata model, and its late fusion with image probabilities."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CHEAP_PROBE
from sklearn.metrics import roc_auc_score

from skincancer import evaluate, load_config, load_manifest, load_model, save_manifest, train
from skincancer.data import DataError
from skincancer.metadata import (
    MetadataError,
    MetadataModel,
    attach,
    encode,
    normalise_rows,
    parse_age,
    parse_sex,
    pattern,
    read_metadata_csv,
    records,
)

META_CSV = "ISIC-2017_Training_Data_metadata.csv"


def test_parse_age_and_sex_accept_unknowns_and_name_bad_values():
    assert parse_age("55") == 55 and parse_age("unknown") is None and parse_age(float("nan")) is None
    assert parse_sex("Female") == "female" and parse_sex("M") == "male" and parse_sex("unknown") is None
    with pytest.raises(MetadataError, match=r"row 3, age_approximate.*'fifty'"):
        parse_age("fifty", "row 3, age_approximate")
    with pytest.raises(MetadataError, match="0-120"):
        parse_age(300)
    with pytest.raises(MetadataError, match=r"--sex.*'other'"):
        parse_sex("other", "--sex")


def test_encode_by_feature_names_and_patterns_of_known_fields():
    np.testing.assert_allclose(encode(50, "female"), [0.5, 0.25, 0])  # age, age squared, male
    np.testing.assert_allclose(encode(50, "male", ["male", "age"]), [1, 0.5])
    np.testing.assert_allclose(encode(None, "female"), [0, 0, 0])
    assert [pattern(50, "male"), pattern(50, None), pattern(None, "male"), pattern(None, None)] == [
        "age+sex", "age", "sex", None]


def _synthetic(n: int = 600, seed: int = 0):
    """Class 1 patients are older: the metadata model should learn it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    ages = np.clip(rng.normal(40 + 25 * y, 10), 5, 95).round()
    rows = [{"age": float(a), "sex": "male" if i % 2 else "female"} for i, a in enumerate(ages)]
    return rows, y


def test_metadata_model_learns_age_and_fusion_follows_bayes_rule():
    rows, y = _synthetic()
    model = MetadataModel.fit(rows, y, 2)
    assert model.proba(80, "male")[1] > 0.8 > 0.2 > model.proba(25, "female")[1]
    np.testing.assert_allclose(model.prior, np.bincount(y) / len(y))
    image = np.array([[0.5, 0.5], [0.9, 0.1], [np.nan, np.nan], [0.3, 0.7]])
    fused = model.fuse(image, [{"age": 80, "sex": "male"}, {"age": 25, "sex": None}, {"age": 80, "sex": None},
                               None])
    odds = image[0, 1] / image[0, 0] * (model.proba(80, "male")[1] / model.prior[1]) / (
        model.proba(80, "male")[0] / model.prior[0])
    assert fused[0, 1] == pytest.approx(odds / (1 + odds))
    assert fused[1, 1] < image[1, 1]  # young: less likely class 1
    assert np.isnan(fused[2]).all()  # unreadable image stays unreadable
    np.testing.assert_array_equal(fused[3], image[3])  # no metadata: the image's own probabilities
    np.testing.assert_allclose(fused[:2].sum(1), 1)
    assert model.fuse(image, None) is image


def test_metadata_model_round_trips_and_refuses_other_features():
    rows, y = _synthetic()
    model = MetadataModel.fit(rows, y, 2)
    again = MetadataModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(again.proba(61, "female"), model.proba(61, "female"))
    saved = model.to_dict()
    assert set(saved["parts"]) == {"age+sex", "age", "sex"}
    with pytest.raises(MetadataError, match="features"):
        MetadataModel.from_dict({**saved, "parts": {**saved["parts"], "age": {**saved["parts"]["age"],
                                                                              "features": ["age"]}}})
    with pytest.raises(MetadataError, match="per-pattern models"):
        MetadataModel.from_dict({"prior": saved["prior"], "features": ["age", "male"]})
    with pytest.raises(MetadataError, match="not every class"):
        MetadataModel.fit([None] * 4 + rows[:2], np.array([0, 1, 0, 1, 0, 0]), 2)


def test_a_field_not_given_is_left_out_not_read_as_evidence():
    """Sex says nothing about the class here; the few images without an age are all class 1 (as one source of an
    archive might be). Giving only a sex must not move a prediction by what those images happened to be."""
    rows, y = _synthetic(n=1000, seed=1)
    y = np.concatenate([y, np.ones(30, int)])
    rows = rows + [{"age": None, "sex": "female" if i % 2 else "male"} for i in range(30)]
    model = MetadataModel.fit(rows, y, 2)
    assert (model.parts["age+sex"].n, model.parts["age"].n, model.parts["sex"].n) == (1000, 1000, 1030)
    image = np.array([[0.7, 0.3]])
    only_sex = model.fuse(image, [{"age": None, "sex": "female"}])
    assert only_sex[0, 1] == pytest.approx(0.3, abs=0.02)  # p(class | sex) / p(class) is about 1
    assert model.fuse(image, [{"age": 70, "sex": None}])[0, 1] > 0.5  # age alone is evidence: its own model
    # one model for every pattern, with "age unknown" as a feature, read it as evidence of class 1: the very shift
    # this guards against
    from sklearn.linear_model import LogisticRegression

    def one_model_features(age, sex):  # age, age squared, age unknown, male, female
        return [*encode(age, sex, ["age", "age_squared"]), float(age is None), float(sex == "male"),
                float(sex == "female")]

    old = LogisticRegression(max_iter=2000).fit(np.array([one_model_features(r["age"], r["sex"]) for r in rows]), y)
    assert old.predict_proba([one_model_features(None, "female")])[0, 1] > 0.6
    # a metadata model saved that way (never released) is refused, not read as a per-pattern one
    with pytest.raises(MetadataError, match="expected per-pattern models"):
        MetadataModel.from_dict({"features": ["age", "age_squared", "age_unknown", "male", "female"],
                                 "coef": [[0.0] * 5] * 2, "intercept": [0.0] * 2, "prior": [0.5, 0.5]})


def test_metadata_rows_name_a_single_dict_and_unknown_keys():
    assert normalise_rows({"age": 50}, 1) == [{"age": 50.0, "sex": None}]
    with pytest.raises(MetadataError, match="a single dict for 2 images"):
        normalise_rows({"age": 50}, 2)
    with pytest.raises(MetadataError, match=r"metadata\[0\]: unknown key\(s\) agee"):
        normalise_rows([{"agee": 65}], 1)
    with pytest.raises(MetadataError, match=r"metadata\[1\]: expected a dict"):
        normalise_rows([None, 65], 2)


def test_rows_are_checked_and_must_match_the_images():
    assert normalise_rows([{"age_approximate": "40", "sex": "unknown"}, None, {}], 3) == [
        {"age": 40.0, "sex": None}, None, None]
    with pytest.raises(MetadataError, match=r"2 rows for 3 images"):
        normalise_rows([None, None], 3)
    with pytest.raises(MetadataError, match=r"metadata\[1\].sex"):
        normalise_rows([None, {"sex": "x"}], 2)


def test_read_metadata_csv_checks_columns_and_values(data_dir, tmp_path):
    table = read_metadata_csv(data_dir / META_CSV)
    assert len(table) == 2000 and list(table.columns) == ["age_approximate", "sex"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,weight\nISIC_1,70\n")
    with pytest.raises(MetadataError, match=r"bad.csv: expected columns"):
        read_metadata_csv(bad)
    bad.write_text("image_id,age_approximate,sex\nISIC_1,40,male\nISIC_2,old,female\n")
    with pytest.raises(MetadataError, match=r"bad.csv, row 2, age_approximate: 'old'"):
        read_metadata_csv(bad)
    with pytest.raises(MetadataError, match="no such file"):
        read_metadata_csv(tmp_path / "missing.csv")


def test_index_joins_metadata_and_names_a_bad_file(cli, data_dir, tmp_path):
    out = tmp_path / "valid.csv"
    result = cli("index", data_dir / "valid", "-o", out, "--metadata",
                 data_dir / "ISIC-2017_Validation_Data_metadata.csv")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "age or sex known for" in result.stdout + result.stderr
    manifest = load_manifest(out)
    assert len(manifest) == 150 and {"age_approximate", "sex"} <= set(manifest.columns)
    bad = tmp_path / "meta.csv"
    bad.write_text("image_id,age_approximate,sex\nISIC_1,40,robot\n")
    result = cli("index", data_dir / "valid", "-o", tmp_path / "x.csv", "--metadata", bad)
    assert result.returncode != 0 and "meta.csv, row 1, sex" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.csv").exists()


@pytest.fixture(scope="module")
def metadata_run(small_data, cache_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    patient = pd.concat([read_metadata_csv(data_dir / META_CSV),
                         read_metadata_csv(data_dir / "ISIC-2017_Validation_Data_metadata.csv")])
    manifests = {}
    for split in ("train", "valid"):
        manifests[split] = save_manifest(attach(load_manifest(small_data[split]), patient), root / f"{split}.csv")
    config = load_config(None, train=str(manifests["train"]), valid=str(manifests["valid"]), out=str(root / "run"),
                         mode="linear", cache_dir=str(cache_dir), linear_c=[0.1, 1.0], num_workers=0, metadata=True,
                         **CHEAP_PROBE)
    return train(config), manifests


@pytest.mark.slow
def test_training_with_metadata_stores_and_validates_the_metadata_model(metadata_run):
    run, _ = metadata_run
    meta = json.loads((Path(run) / "model" / "model.json").read_text())
    parts = meta["metadata_model"]["parts"]
    assert {kind: part["features"] for kind, part in parts.items()} == {
        "age+sex": ["age", "age_squared", "male"], "age": ["age", "age_squared"], "sex": ["male"]}
    assert all(len(part["coef"]) == 3 for part in parts.values())  # one row per diagnosis
    assert 0 <= meta["validation"]["auc_with_metadata"] <= 1 and meta["validation"]["n_with_metadata"] > 0


@pytest.mark.slow
def test_model_with_metadata_predicts_with_and_without_it(metadata_run, tiny_run, small_data):
    run, _ = metadata_run
    classifier = load_model(run)
    paths = list(load_manifest(small_data["test"])["filepath"][:4])
    plain, _ = classifier.predict_proba(paths)
    image_only, _ = load_model(tiny_run).predict_proba(paths)
    np.testing.assert_allclose(plain, image_only, atol=1e-6)  # same features and C: metadata changes nothing
    rows = [{"age": 85, "sex": "male"}, {"age": 15, "sex": "female"}, None, {"age": 50}]
    fused, _ = classifier.predict_proba(paths, metadata=rows)
    expected = classifier.metadata_model.fuse(plain, rows)
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    assert not np.allclose(fused[0], plain[0]) and np.allclose(fused[2], plain[2])
    assert list(classifier.predict(paths, metadata=rows)["metadata_used"]) == [True, True, False, True]
    by_id = pd.DataFrame({"image_id": [Path(paths[1]).stem, Path(paths[0]).stem], "age_approximate": [15, 85],
                          "sex": ["female", "male"]})  # in another order than the images: matched by image_id
    np.testing.assert_allclose(classifier.predict_proba(paths[:2], metadata=by_id)[0], fused[:2], atol=1e-6)
    np.testing.assert_allclose(classifier.predict_proba(paths[:2], metadata=by_id.set_index("image_id"))[0],
                               fused[:2], atol=1e-6)
    with pytest.raises(MetadataError, match="reordered index"):
        classifier.predict_proba(paths[:2], metadata=by_id.drop(columns="image_id").iloc[::-1])
    failed = classifier.predict(["/no/such.jpg", paths[0]], metadata=[{"age": 85, "sex": "male"}, None])
    assert list(failed["metadata_used"]) == [False, False]  # an unreadable image used nothing
    assert "metadata_used" not in classifier.predict(paths)  # no metadata given: no column
    one = classifier.predict(paths[0], metadata={"age": 85, "sex": "male"})
    assert one["melanoma"].iloc[0] == pytest.approx(fused[0, 0], abs=1e-6)


@pytest.mark.slow
def test_evaluate_and_predict_cli_fuse_metadata(cli, metadata_run, tmp_path):
    run, manifests = metadata_run
    metrics = evaluate(run, manifests["valid"], tmp_path / "with", num_workers=0, n_boot=50)
    without = evaluate(run, manifests["valid"], tmp_path / "without", num_workers=0, n_boot=50, use_metadata=False)
    assert metrics["n_with_metadata"] > 0 and without["n_with_metadata"] == 0
    validation = json.loads((Path(run) / "model" / "model.json").read_text())["validation"]
    assert metrics["auc"] == pytest.approx(validation["auc_with_metadata"], abs=1e-6)
    # and its like-for-like partner: the same images scored without their metadata
    assert without["auc"] == pytest.approx(validation["auc_same_images_without_metadata"], abs=1e-6)
    image = load_manifest(manifests["valid"])["filepath"].iloc[0]
    old = cli("predict", image, "--model", run, "--engine", "torch", "--age", "85", "--sex", "male", "--format",
              "json")
    young = cli("predict", image, "--model", run, "--engine", "torch", "--age", "15", "--sex", "female")
    assert old.returncode == 0 and young.returncode == 0, old.stderr + young.stderr
    assert (old.stdout, old.stderr) != (young.stdout, young.stderr)
    bad = cli("predict", image, "--model", run, "--sex", "robot")
    assert bad.returncode != 0 and "--sex: 'robot'" in bad.stderr and "Traceback" not in bad.stderr
    # a metadata CSV that misses an image: a column says whose age/sex were fused, a note names the rest
    images = list(load_manifest(manifests["valid"])["filepath"][:3])
    table = tmp_path / "meta.csv"
    table.write_text(f"image_id,age_approximate,sex\n{Path(images[0]).stem},70,male\n"
                     f"{Path(images[1]).stem},unknown,female\n")
    both = cli("predict", *images, "--model", run, "--engine", "torch", "--metadata", table)
    assert both.returncode == 0, both.stderr
    assert list(pd.read_csv(io.StringIO(both.stdout))["metadata_used"]) == [True, True, False]
    assert f"1 of 3 images have no age or sex in {table}" in both.stderr and Path(images[2]).name in both.stderr
    assert "not a medical device" in both.stderr  # tables carry the notice too, on stderr
    # a model whose metadata model covers sex alone (too few training images with an age) says when the fields
    # given are not used
    old = tmp_path / "old"
    shutil.copytree(Path(run) / "model", old / "model")
    meta = json.loads((old / "model" / "model.json").read_text())
    meta["metadata_model"] = {"parts": {"sex": {"features": ["male"], "coef": [[0.0]] * 3, "intercept": [0.0] * 3,
                                                "prior": [1 / 3] * 3, "n": 30}},
                              "prior": [1 / 3] * 3, "fusion": "bayes"}
    (old / "model" / "model.json").write_text(json.dumps(meta))
    alone = cli("predict", images[0], "--model", old, "--engine", "torch", "--age", "60")
    assert alone.returncode == 0 and "the age or sex of 1 image(s) is not used" in alone.stderr, alone.stderr
    unknown = cli("predict", images[0], "--model", old, "--engine", "torch", "--sex", "unknown")
    assert unknown.returncode == 0 and "not used" not in unknown.stderr  # nothing given, nothing to go unused


def test_metadata_on_without_metadata_columns_is_a_clear_error(small_data, cache_dir, tmp_path):
    config = load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]),
                         out=str(tmp_path / "run"), mode="linear", cache_dir=str(cache_dir), linear_c=[0.1],
                         num_workers=0, metadata=True)
    with pytest.raises(DataError, match=r"train.csv: metadata is on.*--metadata"):
        train(config)
    assert not (tmp_path / "run").exists()  # an input check: the failed start leaves no folder behind


def test_records_reads_manifest_columns():
    frame = pd.DataFrame({"age_approximate": ["40", "unknown", None], "sex": ["male", "unknown", "female"]})
    assert records(frame) == [{"age": 40.0, "sex": "male"}, None, {"age": None, "sex": "female"}]


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", [False, True], ids=["model", "ensemble_with_a_metadata_member"])
def test_web_api_takes_optional_age_and_sex(metadata_run, tiny_run, ensemble):
    from fastapi.testclient import TestClient

    from skincancer.ensemble import load_models
    from skincancer.serve import create_app

    run, manifests = metadata_run
    image = Path(load_manifest(manifests["valid"])["filepath"].iloc[0])
    classifier = load_models([run, tiny_run], engine="torch") if ensemble else load_model(run, engine="torch")
    assert classifier.uses_metadata and not load_model(tiny_run).uses_metadata
    expected, _ = classifier.predict_proba([str(image)], metadata=[{"age": 85, "sex": "male"}])
    with TestClient(create_app(classifier)) as client:
        assert client.get("/api/model").json()["metadata"] is True
        assert 'id="patient" hidden' not in client.get("/").text
        files = {"file": ("lesion.jpg", image.read_bytes(), "image/jpeg")}
        answer = client.post("/api/predict", files=files, data={"age": "85", "sex": "male"}).json()
        assert answer["metadata_used"] is True
        assert answer["probabilities"]["melanoma"] == pytest.approx(expected[0, 0], abs=1e-5)
        plain = client.post("/api/predict", files=files).json()
        assert plain["metadata_used"] is False and plain["probabilities"] != answer["probabilities"]
        bad = client.post("/api/predict", files=files, data={"sex": "robot"})
        assert bad.status_code == 422 and "sex: 'robot'" in bad.json()["detail"]
        several = client.post("/api/predict/batch", files=[("files", files["file"])] * 2,
                              data={"age": ["85", ""], "sex": ["male", ""]}).json()["results"]
        assert [r["metadata_used"] for r in several] == [True, False]
        assert several[0]["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-5)
        assert several[1]["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-5)
    with TestClient(create_app(load_model(tiny_run, engine="torch"))) as client:
        assert 'id="patient" hidden' in client.get("/").text
        answer = client.post("/api/predict", files=files, data={"age": "85"}).json()
        assert answer["metadata_used"] is False



@pytest.mark.slow
def test_evaluate_reports_each_sex_and_age_band(cli, metadata_run, tiny_run, tmp_path):
    run, manifests = metadata_run
    result = cli("evaluate", "--model", tiny_run, "--data", manifests["valid"], "--out", tmp_path / "eval",
                 "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    table = pd.read_csv(tmp_path / "eval" / "predictions.csv").merge(
        load_manifest(manifests["valid"])[["image_id", "sex", "age_approximate"]], on="image_id")
    sexes = metrics["subgroups"]["sex"]
    assert sum(g["n"] for g in sexes.values()) == metrics["n"] == 15
    assert set(sexes) <= {"female", "male", "unknown"} and set(sexes) & {"female", "male"}
    for sex, group in sexes.items():
        rows = table[table["sex"].fillna("unknown").replace("", "unknown") == sex]
        assert group["n"] == len(rows) and group["n_positive"] == rows["label"].sum()
        if rows["label"].nunique() == 2:
            assert group["auc"] == pytest.approx(roc_auc_score(rows["label"], rows["malignant"]))
            low, high = group["auc_ci95"]
            assert low <= group["auc"] <= high
            assert f"AUC sex: {sex}" in result.stdout and f"({low:.4f}-{high:.4f})" in result.stdout
    ages = metrics["subgroups"]["age"]
    assert sum(g["n"] for g in ages.values()) == 15
    bands = ["under 30", "30-49", "50-69", "70 and over", "unknown"]
    assert list(ages) == [band for band in bands if band in ages]  # youngest first
    assert "<h2>Subgroups</h2>" in (tmp_path / "eval" / "report.html").read_text()


@pytest.mark.slow
def test_an_unreadable_age_skips_subgroups_under_no_metadata(cli, metadata_run, tiny_run, tmp_path):
    _, manifests = metadata_run
    manifest = pd.read_csv(manifests["valid"], dtype=str)
    manifest.loc[0, "age_approximate"] = "old"
    manifest["filepath"] = [str((Path(manifests["valid"]).parent / p).resolve()) for p in manifest["filepath"]]
    bad = tmp_path / "bad.csv"
    manifest.to_csv(bad, index=False)

    def run(*flags):
        return cli("evaluate", "--model", tiny_run, "--data", bad, "--out", tmp_path / f"eval{len(flags)}",
                   "--num-workers", "0", *flags)

    refused = run()
    assert refused.returncode == 2 and "row 1, age_approximate: 'old'" in refused.stderr
    plain = run("--no-metadata")
    assert plain.returncode == 0 and "no subgroup figures" in plain.stderr
    assert "subgroups" not in json.loads((tmp_path / "eval1" / "metrics.json").read_text())
