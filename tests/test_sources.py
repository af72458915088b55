"""Several data sources: the HAM10000 and ISIC 2018/2019 layouts, lesion-grouped folds, training on several manifests
with selection on one source, and the licences a model carries (issue 21). Small real subsets; no accuracy figure."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import subset

from skincancer import load_config, save_manifest, train
from skincancer.config import DEFAULT_LABELS, ConfigError
from skincancer.data import DataError, load_manifest
from skincancer.metadata import attach, read_metadata_csv
from skincancer.sources import fold_groups, grouped_folds, index_csv, read_sources

HAM = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ham10000").resolve()


@pytest.fixture(scope="session")
def ham() -> pd.DataFrame:
    """HAM10000's own metadata (all 10,015 rows); the tests that need it skip where the data set is absent."""
    if not (HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 not found at {HAM} (see README: ../shared/data)")
    return pd.read_csv(HAM / "HAM10000_metadata.csv", dtype=str)


def ham_rows(ham: pd.DataFrame, per_dx: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Whole lesions (every image of each), per_dx[dx] lesions of each diagnosis."""
    rng = np.random.default_rng(seed)
    picked = []
    for dx, n in per_dx.items():
        lesions = ham.loc[ham["dx"] == dx, "lesion_id"].unique()
        chosen = rng.choice(sorted(lesions), n, replace=False)
        picked.append(ham[ham["lesion_id"].isin(chosen)])
    return pd.concat(picked, ignore_index=True)


def one_hot(rows: pd.DataFrame, codes: list[str]) -> pd.DataFrame:
    """ISIC 2018/2019 ground truth for HAM rows (the 2018 training set is HAM10000)."""
    code_of = {"mel": "MEL", "nv": "NV", "bkl": "BKL", "bcc": "BCC", "akiec": codes[3], "vasc": "VASC", "df": "DF"}
    table = pd.DataFrame({"image": rows["image_id"]})
    for code in codes:
        table[code] = [1.0 if code_of[dx] == code else 0.0 for dx in rows["dx"]]
    return table


def test_ham_metadata_indexes_into_the_shared_vocabulary_with_lesions_metadata_and_licence(ham, tmp_path):
    rows = ham_rows(ham, {"mel": 2, "nv": 2, "bkl": 2, "bcc": 1, "akiec": 1, "vasc": 1, "df": 1})
    rows.to_csv(tmp_path / "ham.csv", index=False)
    manifest = index_csv(tmp_path / "ham.csv", HAM / "images", DEFAULT_LABELS)
    assert list(manifest.columns[:7]) == ["image_id", "filepath", "diagnosis", "label", "source", "group", "licence"]
    by_id = manifest.set_index("image_id")
    expected = {"mel": "melanoma", "nv": "nevus", "bkl": "seborrheic_keratosis", "bcc": "basal_cell_carcinoma",
                "akiec": "actinic_keratosis", "vasc": "vascular_lesion", "df": "dermatofibroma"}
    for _, row in rows.iterrows():
        got = by_id.loc[row["image_id"]]
        assert got["diagnosis"] == expected[row["dx"]] and got["label"] == int(row["dx"] == "mel")
        assert got["group"] == row["lesion_id"] and Path(got["filepath"]).is_file()
        assert got["sex"] == row["sex"] and got["anatom_site"] == row["localization"]
    assert set(manifest["source"]) == {"ham10000"} and set(manifest["licence"]) == {"CC BY-NC 4.0"}
    # a manifest round trip keeps the columns the tool reads back
    saved = load_manifest(save_manifest(manifest, tmp_path / "m.csv"))
    assert list(saved["group"]) == list(manifest["group"]) and "age_approximate" in saved


def test_isic_2018_and_2019_one_hot_layouts_are_read_by_their_header(ham, tmp_path):
    rows = ham_rows(ham, {"mel": 2, "nv": 2, "bkl": 1, "akiec": 1, "df": 1})
    one_hot(rows, ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]).to_csv(tmp_path / "2018.csv", index=False)
    table = one_hot(rows, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]).assign(UNK=0.0)
    table.to_csv(tmp_path / "2019.csv", index=False)
    for name, source in (("2018.csv", "isic2018"), ("2019.csv", "isic2019")):
        manifest = index_csv(tmp_path / name, HAM / "images", DEFAULT_LABELS)
        assert set(manifest["source"]) == {source} and "group" not in manifest  # no lesion ids in these files
        assert list(manifest["diagnosis"]) == [{"mel": "melanoma", "nv": "nevus", "bkl": "seborrheic_keratosis",
                                                "akiec": "actinic_keratosis", "df": "dermatofibroma"}[d]
                                               for d in rows["dx"]]
    table.loc[3, "UNK"] = 1.0
    table.to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match=r"two\.csv: row 5 \(ISIC_\d+\): 2 diagnosis columns are 1"):
        index_csv(tmp_path / "two.csv", HAM / "images", DEFAULT_LABELS)
    table.loc[3, "UNK"] = 0.0
    table = table.astype({"MEL": object})
    table.loc[2, "MEL"] = "yes"
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad\.csv: row 4 .*column MEL must be 0 or 1, got 'yes'"):
        index_csv(tmp_path / "bad.csv", HAM / "images", DEFAULT_LABELS)
    pd.DataFrame({"image": ["a"], "MEL": [1]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(DataError, match=r"other\.csv: not a known ground-truth layout"):
        index_csv(tmp_path / "other.csv", HAM / "images", DEFAULT_LABELS)


def test_a_diagnosis_outside_the_label_map_is_named_with_its_count(ham, tmp_path):
    ham_rows(ham, {"mel": 1, "nv": 1, "vasc": 2}).to_csv(tmp_path / "ham.csv", index=False)
    with pytest.raises(DataError, match=r"ham\.csv: diagnosis vascular_lesion \(\d+ images\) not in the label map"):
        index_csv(tmp_path / "ham.csv", HAM / "images", {"melanoma": 1, "nevus": 0})


def test_grouped_folds_keep_every_lesion_and_every_copy_on_one_side(ham):
    frame = ham.rename(columns={"lesion_id": "group"}).assign(source="ham10000")
    keys = [f"file{i}" for i in range(len(frame))]
    keys[10] = keys[5000] = "same bytes"  # two files with one content (HAM has such pairs): one group
    groups = fold_groups(frame, keys)
    assert groups[10] == groups[5000]
    assert len(np.unique(groups)) == frame["group"].nunique() - (frame["group"][10] != frame["group"][5000])
    y = (frame["dx"] == "mel").to_numpy().astype(int)
    held_in = np.full(len(frame), -1)
    for fold, (kept, held) in enumerate(grouped_folds(y, groups, 5, seed=0)):
        held_in[held] = fold
        assert not set(groups[kept]) & set(groups[held])
        assert 0.08 < y[held].mean() < 0.15  # stratified: about HAM's 11% melanoma in each fold
    for lesion, folds in pd.Series(held_in).groupby(frame["group"].to_numpy()):
        assert folds.nunique() == 1, f"lesion {lesion} straddles folds"
    # the same lesion id in two sources is two lesions
    two = pd.DataFrame({"group": ["L1", "L1"], "source": ["a", "b"]})
    assert len(set(fold_groups(two))) == 2


def test_training_manifests_that_share_an_image_are_refused(tmp_path):
    first = save_manifest(subset("train", 2), tmp_path / "a.csv")
    second = save_manifest(subset("train", 2), tmp_path / "b.csv")
    with pytest.raises(DataError, match=r"a\.csv and .*b\.csv: image_id 'ISIC_\d+' is in more than one training"):
        read_sources([first, second], DEFAULT_LABELS)
    frame = read_sources([first], DEFAULT_LABELS)
    assert set(frame["source"]) == {"a"} and set(frame["licence"]) == {"not stated"}  # no column: named by file


def test_isic_2019_metadata_brings_lesion_and_site(tmp_path):
    manifest = subset("train", 2)
    pd.DataFrame({"image": manifest["image_id"], "age_approx": ["55"] * 6, "anatom_site_general": ["torso"] * 6,
                  "lesion_id": ["BCN_1", "BCN_1", "BCN_2", "", "BCN_3", "BCN_4"], "sex": ["male"] * 6}
                 ).to_csv(tmp_path / "meta.csv", index=False)
    joined = attach(manifest, read_metadata_csv(tmp_path / "meta.csv"))
    assert list(joined["age_approximate"]) == ["55"] * 6 and list(joined["anatom_site"]) == ["torso"] * 6
    groups = fold_groups(joined)
    assert groups[0] == groups[1] and len(set(groups)) == 5  # an empty lesion id is a lesion of its own


def test_config_takes_one_or_several_training_sources():
    assert load_config(None, train=["a.csv"]).train == "a.csv"  # one source: config.yaml as before
    several = load_config(None, train=["a.csv", "b.csv"])
    assert several.train_paths == ["a.csv", "b.csv"] and several.train == ["a.csv", "b.csv"]
    with pytest.raises(ConfigError, match="train: expected a path or a list of paths"):
        load_config(None, train=["a.csv", 3])


@pytest.mark.slow
def test_two_sources_train_select_on_one_and_carry_their_licences(ham, cache_dir, tmp_path, monkeypatch):
    """A probe on ISIC 2017 + HAM10000, chosen on ISIC alone: the folds keep HAM lesions together, the threshold
    and validation figures come from ISIC images only, and every description of the model names HAM's licence."""
    from fastapi.testclient import TestClient

    from skincancer.evaluate import evaluate
    from skincancer.serve import create_app
    from skincancer.sources import with_source

    rows = ham_rows(ham, {"mel": 6, "nv": 6, "bkl": 6}, seed=1)
    rows.to_csv(tmp_path / "ham.csv", index=False)
    ham_manifest = index_csv(tmp_path / "ham.csv", HAM / "images", DEFAULT_LABELS)
    isic_train = with_source(subset("train", 8), "isic2017")
    isic_valid = with_source(subset("valid", 5), "isic2017")
    ham_held = ham_manifest.iloc[-8:]  # HAM rows in a validation manifest must not choose anything
    paths = {"isic": save_manifest(isic_train, tmp_path / "isic.csv"),
             "ham": save_manifest(ham_manifest.iloc[:-8], tmp_path / "ham-train.csv"),
             "valid": save_manifest(pd.concat([isic_valid, ham_held], ignore_index=True),
                                    tmp_path / "valid.csv")}
    training = importlib.import_module("skincancer.linear")
    splits = []
    real = training.grouped_folds
    monkeypatch.setattr(training, "grouped_folds", lambda y, groups, *a, **k: splits.append(
        (groups, folds := real(y, groups, *a, **k))) or folds)
    config = load_config(None, train=[str(paths["isic"]), str(paths["ham"])], valid=str(paths["valid"]),
                         out=str(tmp_path / "run"), mode="linear", linear_fit="train+valid", select_on="isic2017",
                         cache_dir=str(cache_dir), linear_c=[0.1], feature_views=1, num_workers=0, pooling="final",
                         class_balance="weighted_loss")
    run = train(config)

    assert splits, "the probe's C was not chosen by grouped folds"
    for groups, folds in splits:
        assert len(groups) == 24 + 15  # folds over the ISIC images alone: HAM is training data in every fold
        for kept, held in folds:
            assert not set(groups[kept]) & set(groups[held])
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["select_on"] == "isic2017"
    sources = {s["name"]: s for s in meta["sources"]}
    assert sources["ham10000"]["licence"] == "CC BY-NC 4.0" and sources["ham10000"]["train_images"] == len(
        ham_manifest) - 8 and sources["ham10000"]["valid_images"] == 8
    assert sources["isic2017"]["train_images"] == 24 and sources["isic2017"]["valid_images"] == 15
    # out of fold over train+valid, the threshold and figures come from the ISIC images alone
    assert meta["validation"]["n"] == 24 + 15
    predictions = pd.read_csv(run / "valid_predictions.csv")
    assert set(predictions["source"]) == {"isic2017", "ham10000"}

    card = (run / "model" / "MODEL_CARD.md").read_text()
    assert "non-commercial use (CC BY-NC 4.0)" in card and "| ham10000 | CC BY-NC 4.0 |" in card
    with TestClient(create_app(run)) as client:
        info = client.get("/api/model").json()
        page = client.get("/").text
    assert "non-commercial use (CC BY-NC 4.0)" in info["licence"]
    assert {s["name"] for s in info["sources"]} == {"isic2017", "ham10000"}
    assert 'id="licence"' in page and "non-commercial use (CC BY-NC 4.0)" in page

    test = save_manifest(pd.concat([with_source(subset("test", 3), "isic2017"), ham_held]), tmp_path / "test.csv")
    metrics = evaluate(run, test, tmp_path / "eval", n_boot=50, num_workers=0, group_by=["source"])
    assert {name: group["n"] for name, group in metrics["subgroups"]["source"].items()} == {
        "isic2017": 9, "ham10000": 8}


def test_select_on_a_source_without_held_out_images_is_refused(cache_dir, tmp_path):
    from skincancer.sources import with_source

    train_csv = save_manifest(with_source(subset("train", 4), "isic2017"), tmp_path / "t.csv")
    valid_csv = save_manifest(with_source(subset("valid", 3), "isic2017"), tmp_path / "v.csv")
    config = load_config(None, train=str(train_csv), valid=str(valid_csv), out=str(tmp_path / "run"),
                         mode="linear", select_on="ham10000", cache_dir=str(cache_dir), num_workers=0)
    with pytest.raises(DataError, match=r"select_on: no held-out images of source 'ham10000'; the sources are "
                                        r"isic2017"):
        train(config)
    assert not (tmp_path / "run").exists()  # a refused start leaves nothing behind


@pytest.mark.slow
def test_a_fine_tune_on_two_sources_chooses_its_epoch_and_threshold_on_one(ham, cache_dir, tmp_path, monkeypatch):
    from skincancer.sources import with_source

    rows = ham_rows(ham, {"mel": 3, "nv": 3, "bkl": 3}, seed=2)
    rows.to_csv(tmp_path / "ham.csv", index=False)
    ham_manifest = index_csv(tmp_path / "ham.csv", HAM / "images", DEFAULT_LABELS)
    train_paths = [save_manifest(with_source(subset("train", 4), "isic2017"), tmp_path / "isic.csv"),
                   save_manifest(ham_manifest.iloc[:-6], tmp_path / "ham-train.csv")]
    valid = save_manifest(pd.concat([with_source(subset("valid", 4), "isic2017"), ham_manifest.iloc[-6:]]),
                          tmp_path / "valid.csv")
    config = load_config(None, train=[str(p) for p in train_paths], valid=str(valid), out=str(tmp_path / "run"),
                         mode="finetune", image_size=64, epochs=2, max_steps_per_epoch=2, batch_size=8,
                         num_workers=0, select_on="isic2017", cache_dir=str(cache_dir), guard=False,
                         source_weights={"ham10000": 2.0}, resize="crop")
    with pytest.raises(DataError, match=r"source_weights: no training images of source\(s\) 'ham'; the training "
                                        r"sources are ham10000, isic2017"):
        train(config.replace(source_weights={"ham": 0.5}))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    import skincancer.finetune
    samplers = []

    class Recorded(skincancer.finetune.ShardedSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(skincancer.finetune, "ShardedSampler", Recorded)
    run = train(config)
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["validation"]["n"] == 12  # the ISIC validation images alone chose the threshold
    assert {s["name"] for s in meta["sources"]} == {"isic2017", "ham10000"}
    assert set(pd.read_csv(run / "valid_predictions.csv")["source"]) == {"isic2017", "ham10000"}
    n_ham = len(ham_manifest) - 6  # each HAM10000 image drawn twice an epoch, each ISIC image once
    assert meta["source_weights"] == {"ham10000": 2.0} and len(samplers[0]) == 12 + 2 * n_ham
    assert f"| {n_ham} (each drawn 2.0 times an epoch) |" in (run / "model" / "MODEL_CARD.md").read_text()
    assert f"an epoch draws {12 + 2 * n_ham} images: ham10000 {2 * n_ham} (weight 2), isic2017 12 (weight 1)" in (
        run / "train.log").read_text()
    # HAM10000's 200 x 150 frames were cropped to their centre square; the model predicts as it was trained
    assert meta["resize"] == "crop" and "64 px, the centre square of a non-square image" in (
        run / "model" / "MODEL_CARD.md").read_text()
    import torch

    from skincancer import load_model
    from skincancer.images import centre_square, load_image

    model, image = load_model(run, engine="torch"), load_image(ham_manifest["filepath"].iloc[0])
    assert image.size == (200, 150)
    assert torch.equal(model.transform()(image), model.transform()(centre_square(image)))
    np.testing.assert_array_equal(model.array_transform()(image), model.array_transform()(centre_square(image)))


def test_source_weights_are_checked_and_weigh_the_classes_as_drawn():
    from skincancer.config import parse_source_weights
    from skincancer.finetune import _class_weights, source_draws

    assert parse_source_weights(["ham10000=0.16", "isic2017=1"]) == {"ham10000": 0.16, "isic2017": 1.0}
    for bad, message in ((["ham10000"], "expected SOURCE=WEIGHT"), (["ham10000=x"], "expected SOURCE=WEIGHT"),
                         (["a=1", "a=2"], "a given twice")):
        with pytest.raises(ConfigError, match=message):
            parse_source_weights(bad)
    with pytest.raises(ConfigError, match="source_weights: ham10000: expected a weight above 0"):
        load_config(None, mode="finetune", source_weights={"ham10000": 0})
    with pytest.raises(ConfigError, match="source_weights: sampling by source is for fine-tuning"):
        load_config(None, mode="linear", source_weights={"ham10000": 0.5})
    config = load_config(None, mode="finetune", source_weights={"ham10000": 0.25})
    frame = pd.DataFrame({"source": ["isic2017"] * 4 + ["ham10000"] * 8})
    draws = source_draws(config, frame)
    assert draws.tolist() == [1.0] * 4 + [0.25] * 8
    # classes 0, 1: ISIC 2 + 2, HAM 0 + 8 -> drawn 2 and 2 + 2 = 4 an epoch: class 0 weighs twice class 1
    weights = _class_weights(config, np.array([0, 0, 1, 1] + [1] * 8), ["a", "b"], draws)
    assert weights.tolist() == [1.5, 0.75]


def test_a_fine_tune_started_from_a_ham_run_takes_its_weights_and_its_licence(ham, cache_dir, tmp_path):
    """Pre-train on HAM10000, then fine-tune on ISIC 2017 from those weights (init_from): the backbone comes from
    the HAM run, the classifier is new (other classes), and HAM's non-commercial licence travels on."""
    import torch

    from skincancer.backbones import build_model
    from skincancer.card import markdown_card
    from skincancer.checkpoint import StartingWeights, read_weights
    from skincancer.errors import CheckpointError
    from skincancer.evaluate import seen_in_fitting
    from skincancer.predict import load_model

    rows = ham_rows(ham, {"mel": 2, "nv": 2, "bkl": 2, "bcc": 2}, seed=3)
    rows.to_csv(tmp_path / "ham.csv", index=False)
    ham_manifest = index_csv(tmp_path / "ham.csv", HAM / "images", DEFAULT_LABELS)
    cheap = dict(mode="finetune", image_size=64, epochs=1, max_steps_per_epoch=1, batch_size=8, num_workers=0,
                 cache_dir=str(cache_dir), guard=False)
    isic = dict(train=str(save_manifest(subset("train", 3), tmp_path / "isic.csv")),
                valid=str(save_manifest(subset("valid", 2), tmp_path / "isic-valid.csv")), **cheap)
    pre = train(load_config(None, train=str(save_manifest(ham_manifest, tmp_path / "ham-train.csv")),
                            valid=isic["valid"], out=str(tmp_path / "pre"), **cheap))
    run = train(load_config(None, out=str(tmp_path / "run"), init_from=str(pre), **isic))
    meta = json.loads((run / "model" / "model.json").read_text())
    start = meta["initialised_from"]
    assert start["run"] == str(pre) and start["classifier"] == "new"
    assert "basal_cell_carcinoma" in start["class_names"] and "basal_cell_carcinoma" not in meta["class_names"]
    inherited = {s["name"]: s for s in meta["sources"] if "through the starting weights" in s["name"]}
    assert inherited[f"ham10000 (through the starting weights {pre})"]["licence"] == "CC BY-NC 4.0"
    card = markdown_card(load_model(run))
    assert "non-commercial" in card.lower() and f"started from the weights of {pre} (melanoma" in card
    assert "new classifier), not ImageNet's" in card

    # the HAM images count as images the model was fitted on: evaluate says so
    fitted = json.loads((run / "model" / "fitted_images.json").read_text())
    assert len(fitted["inherited"]["train"]) == len(rows) and len(fitted["train"]) == 9
    seen = seen_in_fitting(load_model(run), list(ham_manifest["filepath"]))
    assert seen["train"] == len(rows)

    # the weights: every one but the classifier's from the HAM run; the classifier too where the classes match
    pre_weights = read_weights(pre / "model")
    fresh = build_model("tf_efficientnet_lite0", 3, pretrained=False)
    next_config = load_config(None, out=str(tmp_path / "next"), **isic)
    StartingWeights(pre, next_config).load_into(fresh, meta["class_names"])
    assert torch.equal(fresh.state_dict()["conv_stem.weight"], pre_weights["conv_stem.weight"])
    assert fresh.classifier.weight.shape[0] == 3  # a new classifier, as small as the one put on ImageNet weights
    assert fresh.classifier.weight.abs().max() <= 1 / 1280 ** 0.5
    same = build_model("tf_efficientnet_lite0", 3, pretrained=False)
    record = StartingWeights(run, next_config).load_into(same, meta["class_names"])
    assert record["classifier"] == "kept"
    assert torch.equal(same.classifier.weight, read_weights(run / "model")["classifier.weight"])
    binary = build_model("tf_efficientnet_lite0", 3, pretrained=False)  # another head: a new classifier
    assert StartingWeights(run, next_config.replace(head="binary")).load_into(binary, meta["class_names"])[
        "classifier"] == "new"

    # a run from a starting run that has not finished is refused, and so is a run starting from itself
    unfinished = json.loads((pre / "model" / "model.json").read_text())
    (tmp_path / "half" / "model").mkdir(parents=True)
    for name in ("model.safetensors", "fitted_images.json"):
        (tmp_path / "half" / "model" / name).write_bytes((pre / "model" / name).read_bytes())
    (tmp_path / "half" / "model" / "model.json").write_text(json.dumps({**unfinished, "unfinished": True}))
    with pytest.raises(CheckpointError, match="has not finished"):
        train(load_config(None, out=str(tmp_path / "from-half"), init_from=str(tmp_path / "half"), **isic))
    with pytest.raises(CheckpointError, match="own folder"):
        train(load_config(None, out=str(run), init_from=str(run), **isic), overwrite=True)

    # another backbone is refused before its run folder is made; so is a linear probe
    with pytest.raises(CheckpointError, match="init_from: .* has backbone tf_efficientnet_lite0"):
        train(load_config(None, out=str(tmp_path / "lite1"), init_from=str(pre),
                          **{**isic, "backbone": "tf_efficientnet_lite1"}))
    assert not (tmp_path / "lite1").exists()
    with pytest.raises(ConfigError, match="init_from"):
        load_config(None, out=str(tmp_path / "linear"), init_from=str(pre), **{**isic, "mode": "linear"})

    # resumed after its last epoch with the HAM run gone: the checkpoint holds the weights; the record and the
    # inherited images and licence stay
    import shutil

    from skincancer.resume import resume_config

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    placeholder = resumed / "model" / "model.json"
    placeholder.write_text(json.dumps({**json.loads(placeholder.read_text()), "unfinished": True}))
    shutil.rmtree(pre)
    train(resume_config(resumed), resume=True)
    again = json.loads(placeholder.read_text())
    assert "unfinished" not in again and again["initialised_from"] == meta["initialised_from"]
    assert [s for s in again["sources"] if "CC BY-NC" in s["licence"]]
    assert json.loads((resumed / "model" / "fitted_images.json").read_text())["inherited"] == fitted["inherited"]
