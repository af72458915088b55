"""The linear probe: a logistic head on cached frozen features, C chosen by lesion-grouped cross-validation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import atomic_write, unwrap
from .config import TrainConfig
from .data import (
    DataError,
)
from .features import cached_features
from .metrics import roc_auc
from .progress import progress
from .sources import fold_groups, grouped_folds

log = logging.getLogger("skincancer")


def fit_linear(model: nn.Module, config: TrainConfig, prep: dict, train_df: pd.DataFrame, train_targets: np.ndarray,
               valid_df: pd.DataFrame, valid_targets: np.ndarray, class_names: list[str], out: Path,
               writer: SummaryWriter, keys: list[str | None]) -> tuple[np.ndarray, pd.DataFrame] | None:
    """Frozen backbone; logistic regression on cached features; its weights become the model's classifier.

    C is chosen by stratified k-fold cross-validation (more stable than 150 validation images). With
    linear_fit='train+valid' the folds span both splits, the head is fitted on both, and the out-of-fold
    probabilities (with the rows they belong to) come back for choosing the threshold; otherwise None.

    The head is trained on `feature_views` dihedral views of each image; held-out images are scored as the model
    will score them, by the mean of their first `tta` views' probabilities.

    keys: content_keys of the training then the validation files (hashed once a run, by `train`)."""
    pooled = config.linear_fit == "train+valid"
    fit_df = pd.concat([train_df, valid_df], ignore_index=True) if pooled else train_df
    targets = np.concatenate([train_targets, valid_targets]) if pooled else train_targets
    views, scored = config.feature_views, config.tta

    if len(keys) != len(train_df) + len(valid_df):
        raise ValueError(f"fit_linear: {len(keys)} content keys for {len(train_df)} + {len(valid_df)} files")
    train_keys, valid_keys = keys[:len(train_df)], keys[len(train_df):]

    x, ok = _view_features(model, config, prep, fit_df["filepath"], "train+valid" if pooled else "train",
                           max(views, scored), keys if pooled else train_keys)
    y = targets[ok]
    groups = fold_groups(fit_df, keys if pooled else train_keys)[ok]  # a lesion's images stay in one fold
    judged = config.judged(fit_df)[ok]  # the rows whose out-of-fold AUC chooses C (--select-on)
    valid = None  # without pooling: the validation images' features, labels and judged rows
    if not pooled:
        valid_x, valid_ok = _view_features(model, config, prep, valid_df["filepath"], "valid", scored, valid_keys)
        valid = (valid_x, valid_df["label"].to_numpy()[valid_ok], config.judged(valid_df)[valid_ok])
    head = _Head(x, y, views, scored, None if config.class_balance == "none" else "balanced")

    folds = min(5, int(np.bincount(y[judged]).min())) if judged.any() else 0
    if pooled and folds < 2:
        raise DataError(f"{config.train_name} + {config.valid}: too few images of a class for cross-validation")
    splits = _source_folds(y, groups, judged, folds, config.seed) if folds >= 2 else []
    rows, best = _search_c(head, judged, splits, valid, config, class_names, writer)
    atomic_write(out / "summary.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    _, c, (clf, mean, std), oof = best
    log.info("chose C=%g by %s AUC %.4f (%d images)", c, "cross-validated" if splits else "validation", best[0],
             len(y))
    _set_classifier(unwrap(model).get_classifier(), clf, mean, std)
    if not pooled:
        return None
    held_out = fit_df.assign(split=["train"] * len(train_df) + ["valid"] * len(valid_df))
    return oof, held_out[ok].reset_index(drop=True)


def _view_features(model: nn.Module, config: TrainConfig, prep: dict, paths: pd.Series, split: str, n: int,
                   file_keys: list) -> tuple[np.ndarray, np.ndarray]:
    """[n views, usable images, D] and the mask of usable images (readable in every view)."""
    per_view = [cached_features(model, paths, config, prep, view, split, file_keys) for view in range(n)]
    ok = np.logical_and.reduce([mask for _, mask in per_view])
    return np.stack([features[ok] for features, _ in per_view]), ok


@dataclass
class _Head:
    """Logistic regression on standardised features x [views, N, D] with targets y [N]: fitted on the first
    `views` views of each image, scoring an image by the mean of its first `scored` views' probabilities."""

    x: np.ndarray
    y: np.ndarray
    views: int
    scored: int
    class_weight: str | None

    def fit(self, rows: np.ndarray, c: float) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
        x, views = self.x, self.views
        mean, std = x[0, rows].mean(0), x[0, rows].std(0)
        # a near-constant feature (std 2e-4 against a median of 0.4 in the demo's) would be scaled up thousands of
        # times, and a new image that moves it a little would swing the logits to 0 or 1: floor the spread
        std = np.maximum(std, 0.1 * np.median(std) + 1e-6)
        clf = LogisticRegression(C=c, class_weight=self.class_weight, max_iter=3000)
        clf.fit(((x[:views, rows] - mean) / std).reshape(-1, x.shape[-1]), np.tile(self.y[rows], views))
        return clf, mean, std

    def proba(self, fitted: tuple, features: np.ndarray) -> np.ndarray:
        """features [views, N, D] -> probabilities [N, classes], the mean over the first `scored` views."""
        clf, mean, std = fitted
        return np.mean([clf.predict_proba((features[v] - mean) / std) for v in range(self.scored)], axis=0)


def _search_c(head: _Head, judged: np.ndarray, splits: list, valid: tuple | None, config: TrainConfig,
              class_names: list[str], writer: SummaryWriter) -> tuple[list[dict], tuple]:
    """Fit the head for every C of config.linear_c; the summary rows and the best (score, C, fitted, out-of-fold
    probabilities). The score: the cross-validated AUC over `splits` (none: the validation AUC on `valid`)."""
    y = head.y
    positive = config.positive_indices(class_names)
    is_positive = np.isin(y, positive).astype(int)
    rows, best = [], None
    for c in progress(config.linear_c, desc="fitting linear head", unit="C", leave=False):
        cv_auc, oof = float("nan"), np.full((len(y), len(class_names)), np.nan)
        if splits:
            for kept, held in splits:
                oof[held] = head.proba(head.fit(kept, c), head.x[:, held])
            cv_auc = roc_auc(is_positive[judged], oof[judged][:, positive].sum(1))
        row = {"C": c, "cv_auc": cv_auc}
        fitted = head.fit(np.arange(len(y)), c)
        if valid is not None:
            valid_x, valid_labels, valid_judged = valid
            row["valid_auc"] = roc_auc(valid_labels[valid_judged],
                                       head.proba(fitted, valid_x[:, valid_judged])[:, positive].sum(1))
        score = cv_auc if splits and not math.isnan(cv_auc) else row["valid_auc"]
        rows.append(row)
        for key, value in row.items():
            if key != "C":
                writer.add_scalar(f"linear/{key}", value, len(rows))
        log.info("linear head C=%g: %s", c, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "C"))
        if best is None or score > best[0]:
            best = (score, c, fitted, oof)
    return rows, best


def _set_classifier(classifier: nn.Linear, clf: LogisticRegression, mean: np.ndarray, std: np.ndarray) -> None:
    """The fitted head as the model's classifier layer, its standardisation folded in."""
    weight_matrix, bias = clf.coef_, clf.intercept_
    if weight_matrix.shape[0] == 1:  # sklearn's binary case: one logit for class 1; softmax over [0, w] is the same
        weight_matrix, bias = np.vstack([np.zeros_like(weight_matrix), weight_matrix]), np.concatenate([[0.0], bias])
    # Fold the standardisation into the layer: w.(x - m)/s + b = (w/s).x + (b - w.(m/s)).
    folded_w = weight_matrix / std
    folded_b = bias - (weight_matrix * (mean / std)).sum(1)
    with torch.no_grad():
        classifier.weight.copy_(torch.as_tensor(folded_w, dtype=torch.float32))
        classifier.bias.copy_(torch.as_tensor(folded_b, dtype=torch.float32))


def _source_folds(y: np.ndarray, groups: np.ndarray, judged: np.ndarray, folds: int, seed: int) -> list:
    """Grouped, stratified folds over the judged rows (--select-on's source, or all); the other sources' rows are
    training rows in every fold (except a copy of a held-out image), so the judged source's folds are the same with
    or without them."""
    rows, others = np.flatnonzero(judged), np.flatnonzero(~judged)
    splits = []
    for kept, held in grouped_folds(y[rows], groups[rows], folds, seed):
        extra = others[~np.isin(groups[others], groups[rows[held]])]
        splits.append((np.concatenate([rows[kept], extra]), rows[held]))
    return splits

