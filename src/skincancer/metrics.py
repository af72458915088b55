"""Metrics: ROC AUC from probabilities, bootstrap confidence intervals, operating points, threshold choice and
calibration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap, norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from .config import parse_threshold_policy

ISIC_SENSITIVITIES = (0.82, 0.89, 0.95)  # the ISIC 2017 scorer's specificity-at-sensitivity levels


def _check(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = np.asarray(labels).astype(int).ravel(), np.asarray(probs, dtype=float).ravel()
    if labels.shape != probs.shape:
        raise ValueError(f"labels ({labels.shape[0]}) and probabilities ({probs.shape[0]}) differ in length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return labels, probs


def roc_auc(labels, probs) -> float:
    """Area under the ROC curve of continuous scores (NaN when only one class is present)."""
    labels, probs = _check(labels, probs)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, probs))


def _mann_whitney_auc(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC as P(score_pos > score_neg) + 0.5 P(tie), from the ranks of the pooled scores; one per row when the scores
    come stacked (the bootstrap's resamples)."""
    pos, neg = np.moveaxis(pos, axis, -1), np.moveaxis(neg, axis, -1)
    m, n = pos.shape[-1], neg.shape[-1]
    ranks = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :m].sum(axis=-1) - m * (m + 1) / 2) / (m * n)


def bootstrap_auc_ci(labels, probs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the AUC, resampling positives and negatives separately (stratified)."""
    labels, probs = _check(labels, probs)
    pos, neg = probs[labels == 1], probs[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return [float("nan"), float("nan")]
    # scipy wants two or more observations per sample; a lone image is in every resample anyway, and doubling it
    # leaves the AUC (a mean over positive-negative pairs) unchanged
    pos, neg = (np.repeat(x, 2) if len(x) == 1 else x for x in (pos, neg))
    # resamples are ranked a batch at a time, about 2 million scores in all: memory stays bounded on large test sets
    result = bootstrap((pos, neg), _mann_whitney_auc, n_resamples=n_boot, confidence_level=1 - alpha,
                       method="percentile", vectorized=True, batch=max(1, 2_000_000 // (len(pos) + len(neg))),
                       rng=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def delong_test(labels, scores_a, scores_b) -> dict:
    """DeLong's test of two correlated AUCs (the same images scored by two models; DeLong et al. 1988, in the fast
    midrank form of Sun & Xu 2014): both AUCs, their difference a - b with its 95% interval, and the two-sided
    p-value of 'no difference'."""
    labels, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("comparing AUCs needs a score for every image (leave out the images a model did not score)")
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if min(m, n) < 2:
        raise ValueError(f"comparing AUCs needs at least 2 images of both classes (got {m} positive, {n} negative)")
    aucs, v10, v01 = [], [], []
    for scores in (a, b):
        pos, neg = scores[positive], scores[~positive]
        t_all, t_pos, t_neg = rankdata(np.concatenate([pos, neg])), rankdata(pos), rankdata(neg)
        aucs.append((t_all[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((t_all[:m] - t_pos) / n)  # per positive: the share of negatives it outranks
        v01.append(1 - (t_all[m:] - t_neg) / m)  # per negative: the share of positives that outrank it
    covariance = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = float(aucs[0] - aucs[1])
    if variance <= 1e-15:  # no spread to test against: identical rankings (p 1), or nothing to say
        p, half = (1.0, 0.0) if difference == 0 else (float("nan"), float("nan"))
    else:
        z = difference / np.sqrt(variance)
        p, half = float(2 * norm.sf(abs(z))), float(norm.ppf(0.975) * np.sqrt(variance))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": difference,
            "difference_ci95": [difference - half, difference + half], "p_value": p, "n": int(len(labels)),
            "n_positive": m}


def confusion_counts(labels, probs, threshold: float) -> dict[str, int]:
    """Counts at 'malignant when probability >= threshold'."""
    labels, probs = _check(labels, probs)
    predicted = probs >= threshold
    return {
        "tp": int(np.sum(predicted & (labels == 1))),
        "fn": int(np.sum(~predicted & (labels == 1))),
        "tn": int(np.sum(~predicted & (labels == 0))),
        "fp": int(np.sum(predicted & (labels == 0))),
    }


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def wilson_interval(successes: int, trials: int, confidence_level: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion (sensitivity, specificity): unlike the normal approximation it stays
    inside [0, 1] and is not zero-width at 0/n or n/n."""
    if trials == 0:
        return [float("nan"), float("nan")]
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence_level, method="wilson")
    return [float(interval.low), float(interval.high)]


def _intervals(point: dict) -> dict[str, list[float]]:
    """Wilson 95% intervals of an operating point's sensitivity and specificity, from its counts."""
    return {"sensitivity_ci95": wilson_interval(point["tp"], point["tp"] + point["fn"]),
            "specificity_ci95": wilson_interval(point["tn"], point["tn"] + point["fp"])}


def operating_point(labels, probs, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, accuracy and balanced accuracy at one threshold."""
    c = confusion_counts(labels, probs, threshold)
    sensitivity, specificity = _ratio(c["tp"], c["tp"] + c["fn"]), _ratio(c["tn"], c["tn"] + c["fp"])
    return {
        "threshold": float(threshold),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": _ratio(c["tn"], c["tn"] + c["fn"]),
        "accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        **c,
    }


def specificity_at_sensitivity(labels, probs, sensitivity: float) -> float:
    """Best specificity among thresholds whose sensitivity reaches the target."""
    labels, probs = _check(labels, probs)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, probs)
    ok = tpr >= sensitivity - 1e-12
    return float(1 - fpr[ok].min())


def choose_threshold(labels, probs, policy: str = "sensitivity:0.90") -> float:
    """Pick the decision threshold on (validation) probabilities.

    sensitivity:S  the highest threshold whose sensitivity is >= S (most specific among those that catch enough)
    specificity:S  the lowest threshold whose specificity is >= S
    youden         the threshold maximising sensitivity + specificity - 1
    fixed:T        T
    """
    kind, value = parse_threshold_policy(policy)
    if kind == "fixed":
        return float(value)
    labels, probs = _check(labels, probs)
    if labels.min() == labels.max():
        raise ValueError("choosing a threshold needs both classes in the validation data")
    candidates = np.unique(probs)[::-1]  # descending: each candidate t means 'positive when p >= t'
    positives, negatives = probs[labels == 1], probs[labels == 0]
    sens = np.array([(positives >= t).mean() for t in candidates])
    spec = np.array([(negatives < t).mean() for t in candidates])
    if kind == "sensitivity":
        ok = np.flatnonzero(sens >= value - 1e-12)
        return float(candidates[ok[0]])  # first (highest) threshold that reaches the sensitivity
    if kind == "specificity":
        ok = np.flatnonzero(spec >= value - 1e-12)
        return float(candidates[ok[-1]]) if len(ok) else float(np.nextafter(candidates[0], np.inf))
    return float(candidates[int(np.argmax(sens + spec - 1))])


def calibration(labels, probs, n_bins: int = 10) -> dict:
    """How far the probabilities can be read as frequencies: of the images given about 30%, are about 30% malignant?

    brier            mean squared error of the probabilities (0 is perfect)
    brier_reference  the Brier score of always answering the data's prevalence (a model that knows nothing)
    ece              expected calibration error: the |observed - predicted| gap of `n_bins` equal-width bins,
                     weighted by their share of the images
    bins             per non-empty bin: its range, image count, mean probability and observed malignant share
    """
    labels, probs = _check(labels, probs)
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("calibration needs probabilities in [0, 1] (leave out the images that were not predicted)")
    prevalence = float(labels.mean())
    # bin i holds [i/n, (i+1)/n), the last bin includes 1.0
    index = np.clip((probs * n_bins).astype(int), 0, n_bins - 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        inside = index == i
        if not inside.any():
            continue
        predicted, observed = float(probs[inside].mean()), float(labels[inside].mean())
        ece += inside.mean() * abs(observed - predicted)
        bins.append({"low": i / n_bins, "high": (i + 1) / n_bins, "n": int(inside.sum()),
                     "mean_probability": predicted, "observed": observed})
    return {
        "brier": float(np.mean((probs - labels) ** 2)),
        "brier_reference": prevalence * (1 - prevalence),
        "ece": float(ece),
        "mean_probability": float(probs.mean()),
        "prevalence": prevalence,
        "bins": bins,
    }


def validation_summary(labels, probs, threshold: float) -> dict:
    """The validation figures a model card records: AUC, the operating point at the chosen threshold, calibration."""
    labels, probs = _check(labels, probs)
    point, calibrated = operating_point(labels, probs, threshold), calibration(labels, probs)
    return {"n": int(len(labels)), "auc": roc_auc(labels, probs),
            **{k: point[k] for k in ("sensitivity", "specificity", "balanced_accuracy", "accuracy")},
            "brier": calibrated["brier"], "ece": calibrated["ece"]}


def subgroup_report(labels, probs, threshold: float, groups: Sequence[str]) -> dict:
    """Per subgroup (e.g. sex, age band): n, positives, AUC (NaN with one class) with its stratified bootstrap interval,
    and sensitivity / specificity with Wilson intervals at the model's threshold."""
    labels, probs = _check(labels, probs)
    groups = np.asarray(groups, dtype=object)
    if groups.shape != labels.shape:
        raise ValueError(f"groups ({groups.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    report = {}
    for group in sorted(set(groups), key=str):
        inside = groups == group
        point = operating_point(labels[inside], probs[inside], threshold)
        report[str(group)] = {
            "n": int(inside.sum()), "n_positive": int(labels[inside].sum()),
            "auc": roc_auc(labels[inside], probs[inside]),
            "auc_ci95": bootstrap_auc_ci(labels[inside], probs[inside], n_boot=1000),
            "sensitivity": point["sensitivity"], "specificity": point["specificity"], **_intervals(point),
        }
    return report


def binary_report(labels, probs, threshold: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything evaluate writes to metrics.json for one binary task."""
    labels, probs = _check(labels, probs)
    at_threshold = operating_point(labels, probs, threshold)
    report = {
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
        "auc": roc_auc(labels, probs),
        "auc_ci95": bootstrap_auc_ci(labels, probs, n_boot=n_boot, seed=seed),
        "threshold": float(threshold),
        **{k: at_threshold[k] for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv")},
        **_intervals(at_threshold),
        "confusion": {k: at_threshold[k] for k in ("tp", "fn", "tn", "fp")},
        "at_0.5": operating_point(labels, probs, 0.5),
        "specificity_at_sensitivity": {
            f"{s:.2f}": specificity_at_sensitivity(labels, probs, s) for s in ISIC_SENSITIVITIES
        },
        "calibration": calibration(labels, probs),
    }
    return report
