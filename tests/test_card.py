"""Model cards: MODEL_CARD.md beside each trained model, and `skincancer card` for a run or an ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skincancer import NOTICE
from skincancer.card import CARD_FILE, markdown_card
from skincancer.ensemble import load_models
from skincancer.predict import load_model

pytestmark = pytest.mark.slow


def test_training_writes_a_card_from_what_the_run_recorded(tiny_run):
    text = (Path(tiny_run) / "model" / CARD_FILE).read_text()
    meta = json.loads((Path(tiny_run) / "model" / "model.json").read_text())
    assert text.startswith("# Model card: linear\n") and NOTICE in text
    assert meta["environment"]["data"]["train"]["diagnoses"] == {"melanoma": 10, "nevus": 10,
                                                                 "seborrheic_keratosis": 10}
    assert "- train: 30 images (melanoma 10, nevus 10, seborrheic_keratosis 10); data fingerprint " in text
    assert "- valid: 15 images (melanoma 5, nevus 5, seborrheic_keratosis 5)" in text
    chosen = "(sensitivity:0.90, chosen on the validation split)"
    assert f"at a probability of {meta['threshold']:.4g} or more {chosen}" in text
    assert f"| AUC | {meta['validation']['auc']:.4f} |" in text
    assert "(training data: 33.3% malignant)" in text  # 10 melanomas of 30
    assert "frozen, with a logistic-regression head; input 224 px; one view." in text
    assert "on 15 images they are also uncertain" in text
    assert meta["class_balance"] == "weighted_loss" and "Trained with class weights or a balanced sampler" in text
    assert text == markdown_card(load_model(tiny_run))  # the card describes the saved model as it loads


def test_a_binary_heads_card_names_the_diagnoses_and_names_are_escaped(small_data, cache_dir, tmp_path):
    from skincancer import load_config, train

    run = tmp_path / "a|b<i>"  # a folder name that would break a Markdown table or inject HTML
    train(load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(run),
                      mode="linear", head="binary", cache_dir=str(cache_dir), linear_c=[0.1], num_workers=0,
                      labels={"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0, "bcc": 1},  # no bcc images
                      threshold_policy="fixed:0.5", class_balance="none", pooling="final", linear_fit="train"))
    text = (run / "model" / CARD_FILE).read_text()
    assert text.startswith("# Model card: a\\|b&lt;i&gt;\n") and "<i>" not in text
    assert "- Trained on the diagnoses melanoma, nevus, seborrheic_keratosis: malignant = melanoma; benign = nevus, " \
           "seborrheic_keratosis." in text
    assert "the malignant probability is its malignant output." in text
    assert "- It was trained on melanoma, nevus, seborrheic_keratosis only." in text  # bcc: in the map, no images
    assert "at a probability of 0.5 or more (fixed:0.5, not chosen on data)." in text
    assert "These images chose the model's settings" in text and "class weights" not in text


def test_card_cli_for_a_run_and_an_ensemble(cli, tiny_run, finetune_run, tmp_path):
    out = tmp_path / "cards" / "card.md"
    result = cli("card", "--model", tiny_run, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (Path(tiny_run) / "model" / CARD_FILE).read_text()
    assert cli("card", "--model", tiny_run, "-o", out).returncode == 0  # an earlier card may be replaced

    notes = tmp_path / "README.md"
    notes.write_text("# my notes\n")
    refused = cli("card", "--model", tiny_run, "-o", notes)
    assert refused.returncode == 2 and "is not a model card" in refused.stderr
    assert notes.read_text() == "# my notes\n"
    assert "expected a .md file name" in cli("card", "--model", tiny_run, "-o", tmp_path / "card.txt").stderr
    other = Path(finetune_run) / "model" / CARD_FILE
    before = other.read_text()
    refused = cli("card", "--model", tiny_run, "-o", other)
    assert refused.returncode == 2 and "another run's model folder" in refused.stderr and other.read_text() == before

    both = cli("card", "--model", tiny_run, "--model", finetune_run)
    assert both.returncode == 0, both.stderr
    assert both.stdout.startswith("# Model card: linear + finetune\n")
    assert "An ensemble of 2 runs" in both.stdout and "| finetune | tf_efficientnet_lite0 | fine-tuned" in both.stdout
    ensemble = load_models([tiny_run, finetune_run], engine="torch")
    assert f"at a probability of {ensemble.threshold:.4g} or more" in both.stdout
    assert "- linear: trained " in both.stdout and "- finetune: trained " in both.stdout
