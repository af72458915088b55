"""`skincancer compare`: two evaluations matched by image id; columns found by name; inputs never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from skincancer import compare  # as the README gives it
from skincancer.data import DataError
from skincancer.metrics import delong_test

RNG = np.random.default_rng(0)
LABELS = (RNG.uniform(size=60) < 0.3).astype(int)


def evaluation(folder: Path, malignant, columns: dict | None = None, model: dict | None = None,
               ids=None) -> Path:
    """A folder as `evaluate` writes it: metrics.json and predictions.csv (columns in `evaluate`'s order)."""
    folder.mkdir(parents=True)
    metrics = {"auc": 0.5, "n": len(malignant), "threshold": 0.5, "skipped": [],
               "model": model if model is not None else {"class_names": ["malignant", "benign"],
                                                          "positive_name": "malignant"}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    ids = ids if ids is not None else [f"ISIC_{i:07d}" for i in range(len(malignant))]
    table = {"image_id": ids, "diagnosis": np.where(LABELS[:len(ids)] == 1, "melanoma", "nevus"),
             "label": LABELS[:len(ids)], **(columns or {"malignant": malignant}), "predicted": 0, "error": ""}
    pd.DataFrame(table).to_csv(folder / "predictions.csv", index=False)
    return folder


def test_the_malignant_column_is_found_by_name_not_by_place(tmp_path):
    good = LABELS + RNG.normal(scale=0.7, size=60)
    a = evaluation(tmp_path / "a", good)
    # a class named like the positive class, listed first: the column before `predicted` is the benign one
    b = evaluation(tmp_path / "b", good, columns={"malignant": good, "benign": -good})
    result = compare(a, b)
    assert result["auc_b"] == pytest.approx(result["auc_a"]) and result["difference"] == 0
    assert result["p_value"] == 1.0 and result["difference_ci95"] == [0.0, 0.0]
    # a model whose malignant class is called 'cancer': --task cancer means its malignant probability
    c = evaluation(tmp_path / "c", good, columns={"melanoma": good, "cancer": good},
                   model={"class_names": ["melanoma", "nevus"], "positive_name": "cancer"})
    assert compare(a, c, task="cancer")["auc_b"] == pytest.approx(result["auc_a"])


def test_a_model_fitted_on_the_compared_images_is_flagged(cli, tmp_path):
    good = LABELS + RNG.normal(scale=0.7, size=60)
    a, b = evaluation(tmp_path / "a", good), evaluation(tmp_path / "b", good + RNG.normal(size=60))
    assert "seen_in_fitting" not in compare(a, b)
    metrics = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**metrics, "seen_in_fitting": {"train": 40, "valid": 0}}))
    assert compare(a, b)["seen_in_fitting"] == {"second": {"train": 40, "valid": 0}}
    result = cli("compare", a, b)
    assert result.returncode == 0 and "the second model was fitted on 40" in result.stderr


def test_p_value_and_interval_follow_from_the_delong_variance():
    a = LABELS + RNG.normal(size=60)
    b = 0.5 * LABELS + RNG.normal(size=60)
    result = delong_test(LABELS, a, b)
    sd = (result["difference_ci95"][1] - result["difference"]) / norm.ppf(0.975)
    assert result["p_value"] == pytest.approx(2 * norm.sf(abs(result["difference"]) / sd))  # two-sided
    with pytest.raises(ValueError, match="at least 2 images of both classes"):
        delong_test([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], [0.5, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match="a score for every image"):
        delong_test(LABELS, np.where(np.arange(60) == 3, np.nan, a), b)
    flat = delong_test([1, 1, 0, 0], [1, 1, 0, 0], [0.5] * 4)  # a difference with no spread to test it by
    assert flat["difference"] == 0.5 and np.isnan(flat["p_value"])


def test_images_are_matched_by_id_as_text_and_unscored_ones_left_out(tmp_path):
    scores = LABELS + RNG.normal(size=60)
    ids = [f"{i:04d}" for i in range(60)]
    a = evaluation(tmp_path / "a", scores, ids=ids)
    b_scores = scores.copy()
    b_scores[:5] = np.nan  # unreadable images
    b = evaluation(tmp_path / "b", b_scores, ids=ids)
    result = compare(a, b)
    assert result["n"] == 55 and result["only_in_first"] == 5
    c = evaluation(tmp_path / "c", scores, ids=[str(i) for i in range(60)])  # '1' is not '0001'
    with pytest.raises(DataError, match="no image scored by both"):
        compare(a, c)


def test_bad_inputs_are_named_and_never_overwritten(cli, tmp_path):
    scores = LABELS + RNG.normal(size=60)
    a, b = evaluation(tmp_path / "a", scores), evaluation(tmp_path / "b", scores[::-1].copy())
    before = (b / "metrics.json").read_text()
    for out in (b / "metrics.json", b / "new.json"):
        refused = cli("compare", a, b, "-o", out)
        assert refused.returncode == 2 and "inside the evaluation" in refused.stderr
    assert (b / "metrics.json").read_text() == before and not (b / "new.json").exists()
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    refused = cli("compare", a, b, "-o", other)
    assert refused.returncode == 2 and "not an earlier comparison" in refused.stderr
    assert cli("compare", a, b, "-o", tmp_path / "c.json").returncode == 0
    assert cli("compare", a, b, "-o", tmp_path / "c.json").returncode == 0  # an earlier comparison may be replaced

    one = evaluation(tmp_path / "one", scores)
    pd.read_csv(one / "predictions.csv").assign(label=[1] + [0] * 59).to_csv(one / "predictions.csv", index=False)
    pd.read_csv(a / "predictions.csv").assign(label=[1] + [0] * 59).to_csv(a / "predictions.csv", index=False)
    single = cli("compare", a, one)
    assert single.returncode == 2 and "at least 2 of each class" in single.stderr
    assert "Warning" not in single.stderr and "Traceback" not in single.stderr
    (one / "predictions.csv").write_text("")
    empty = cli("compare", a, one)
    assert empty.returncode == 2 and "predictions.csv: unreadable" in empty.stderr and "Traceback" not in empty.stderr
