from pathlib import Path

import pytest

from skincancer.config import ConfigError, TrainConfig, load_config, parse_labels, parse_threshold_policy


def test_defaults_are_valid():
    config = TrainConfig()
    # every diagnosis of the vocabulary, melanoma alone malignant (as the ISIC 2017 task scores it)
    assert config.labels == {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0, "basal_cell_carcinoma": 0,
                             "actinic_keratosis": 0, "squamous_cell_carcinoma": 0, "vascular_lesion": 0,
                             "dermatofibroma": 0}
    assert config.threshold_policy == "sensitivity:0.90"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"epochs": -1}, "epochs"),
        ({"image_size": 0}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 5.0}, "lr"),
        ({"mode": "deep"}, "mode"),
        ({"threshold_policy": "fixed:1.5"}, "threshold_policy"),
        ({"threshold_policy": "median"}, "threshold_policy"),
        ({"epochs": "ten"}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"pretrained": "yes"}, "pretrained"),
        ({"labels": {"melanoma": 1}}, "labels"),
        ({"linear_c": [0.1, -1]}, "linear_c"),
    ],
)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, **overrides)


def test_unknown_keys_in_yaml_are_errors(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path)


def test_an_unknown_keyword_is_blamed_on_the_call_not_the_file(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("mode: linear\n")
    with pytest.raises(ConfigError, match=r"^load_config: unknown field\(s\) trian;") as caught:
        load_config(config, trian="x")
    assert str(config) not in str(caught.value)
    assert load_config(None, feature_flips=True).feature_views == 2  # the older name, as a keyword too


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.001\nmode: finetune\n")
    config = load_config(path, epochs=5, lr=None)
    assert (config.epochs, config.lr, config.mode) == (5, 0.001, "finetune")
    with pytest.raises(ConfigError, match="lr"):
        load_config(path, lr=1)


def test_parse_labels():
    assert parse_labels("melanoma=1, nevus=0,seborrheic_keratosis=0") == {
        "melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0}
    with pytest.raises(ConfigError, match="NAME=0"):
        parse_labels("melanoma:1,nevus=0")
    with pytest.raises(ConfigError, match="at least one"):
        parse_labels("melanoma=1")


def test_threshold_policies():
    assert parse_threshold_policy("youden") == ("youden", None)
    assert parse_threshold_policy("sensitivity:0.95") == ("sensitivity", 0.95)
    assert parse_threshold_policy("fixed:0.5") == ("fixed", 0.5)


def test_runs_saved_with_the_older_feature_flips_key_still_load(tmp_path):
    """Every run's config.yaml holds all fields; runs made before feature_views say feature_flips (--resume reads
    them back)."""
    for flips, views in ((True, 2), (False, 1)):
        path = tmp_path / f"{flips}.yaml"
        path.write_text(f"mode: linear\nfeature_flips: {str(flips).lower()}\n")
        assert load_config(path).feature_views == views
