from pathlib import Path

import pytest

from skincancer.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    load_config,
    parse_labels,
    parse_threshold_policy,
)


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
        ({"resize": "stretch"}, "resize: must be 'squash' or 'crop'"),
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


def test_the_unreleased_feature_flips_key_is_unknown(tmp_path):
    """feature_views' older name never reached a release: it is an unknown key like any other."""
    path = tmp_path / "c.yaml"
    path.write_text("mode: linear\nfeature_flips: true\n")
    with pytest.raises(ConfigError, match="unknown config key.*feature_flips"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown field.*feature_flips"):
        load_config(None, feature_flips=True)


# What load_config resolved each shipped config to before the defaults became the demo's recipe (computed once with
# config_to_dict at commit 90fff78): trimming the files to what differs must not change a single field.
_OLD_COMMON = {
    "train": "", "valid": "", "out": "", "backbone": "tf_efficientnet_lite0", "pretrained": True, "image_size": 224,
    "eval_image_size": 0, "head": "diagnosis",
    "labels": {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0, "basal_cell_carcinoma": 0,
               "actinic_keratosis": 0, "squamous_cell_carcinoma": 0, "vascular_lesion": 0, "dermatofibroma": 0},
    "positive_name": "malignant", "negative_name": "benign", "threshold_policy": "sensitivity:0.90", "select_on": "",
    "seed": 0, "batch_size": 32, "num_workers": 2, "epochs": 8, "lr": 0.0003, "weight_decay": 0.02,
    "warmup_epochs": 0.5, "patience": 3, "augment": "standard", "class_balance": "weighted_loss",
    "label_smoothing": 0.0, "max_steps_per_epoch": 0, "keep": "best", "ema_decay": 0.0, "tta": 1, "device": "auto",
    "metadata": False, "guard": True, "guard_false_rejection": 0.02,
    "linear_c": [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03], "pooling": "final", "feature_views": 2,
    "linear_fit": "train", "cache_dir": "",
    # added since, at defaults that change nothing for a run without a teacher
    "teacher": [], "distill_alpha": 0.7, "extra": [], "init_from": "", "source_weights": {}, "resize": "squash",
    "distill_out_of_fold": False,
}
_OLD_PROBE = {"mode": "linear", "class_balance": "none", "metadata": True, "linear_c": [0.0003, 0.001, 0.003],
              "pooling": "multiscale", "linear_fit": "train+valid"}
OLD_RESOLVED = {
    "isic2017.yaml": {**_OLD_COMMON, "mode": "finetune", "image_size": 256, "eval_image_size": 288, "epochs": 14,
                      "lr": 0.001, "patience": 0, "augment": "strong", "keep": "last", "ema_decay": 0.995, "tta": 8},
    "isic2017-lite2.yaml": {**_OLD_COMMON, "mode": "finetune", "backbone": "tf_efficientnet_lite2", "image_size": 256,
                            "lr": 0.001, "patience": 0, "keep": "last", "ema_decay": 0.995, "tta": 8},
    "linear.yaml": {**_OLD_COMMON, **_OLD_PROBE},
    # the benchmark's student (issue 24): 4 epochs from the Lite0 member at 224 px, run at 256 px with one view
    "student.yaml": {**_OLD_COMMON, "mode": "finetune", "init_from": "runs/benchmark/lite0", "image_size": 224,
                     "eval_image_size": 256, "epochs": 4, "lr": 0.0003, "patience": 0, "augment": "strong",
                     "keep": "last", "ema_decay": 0.995, "tta": 1, "distill_alpha": 0.5},
    "linear-8views.yaml": {**_OLD_COMMON, **_OLD_PROBE, "tta": 8, "feature_views": 8},
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(OLD_RESOLVED)


@pytest.mark.parametrize("name", sorted(OLD_RESOLVED))
def test_shipped_configs_resolve_as_before(name):
    resolved = config_to_dict(load_config(CONFIGS / name))
    assert sorted(resolved) == sorted(OLD_RESOLVED[name])
    for field, old in OLD_RESOLVED[name].items():
        assert (field, resolved[field]) == (field, old)
        assert type(resolved[field]) is type(old)


def test_linear_without_a_config_is_the_demos_probe_and_finetune_keeps_its_defaults():
    probe = config_to_dict(load_config(None, mode="linear"))
    assert probe == {**OLD_RESOLVED["linear.yaml"], "metadata": False}  # metadata needs the manifests' columns
    assert config_to_dict(TrainConfig()) == probe
    finetune = config_to_dict(load_config(None, mode="finetune"))
    assert finetune == {**_OLD_COMMON, "mode": "finetune"}
    # a field set by hand wins over the mode's default, in either mode
    assert load_config(None, mode="finetune", pooling="multiscale").pooling == "multiscale"
    assert load_config(None, mode="linear", class_balance="weighted_loss").class_balance == "weighted_loss"
