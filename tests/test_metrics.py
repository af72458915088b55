import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from skincancer.metrics import (
    binary_report,
    bootstrap_auc_ci,
    calibration,
    choose_threshold,
    delong_test,
    operating_point,
    roc_auc,
    specificity_at_sensitivity,
    subgroup_report,
    wilson_interval,
)

LABELS = np.array([0, 0, 0, 0, 1, 1, 1])
PROBS = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9, 0.7])


def test_auc_by_hand():
    # Pairs (pos, neg) with pos > neg: 0.3 beats 0.1 (1); 0.9 beats all 4; 0.7 beats 3 -> 8 of 12.
    assert roc_auc(LABELS, PROBS) == pytest.approx(8 / 12)


def test_auc_counts_ties_as_half():
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.2, 0.6, 0.6]) == pytest.approx(0.75)


def test_auc_single_class_is_nan():
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_operating_point_by_hand():
    point = operating_point(LABELS, PROBS, 0.5)
    # predicted positive: 0.8 (neg), 0.9, 0.7 (pos) -> tp 2, fp 1, fn 1, tn 3
    assert (point["tp"], point["fp"], point["fn"], point["tn"]) == (2, 1, 1, 3)
    assert point["sensitivity"] == pytest.approx(2 / 3)
    assert point["specificity"] == pytest.approx(3 / 4)
    assert point["ppv"] == pytest.approx(2 / 3)
    assert point["npv"] == pytest.approx(3 / 4)
    assert point["accuracy"] == pytest.approx(5 / 7)
    assert point["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_threshold_keeps_sensitivity():
    # Highest threshold that still catches all three melanomas is the lowest positive score, 0.3.
    assert choose_threshold(LABELS, PROBS, "sensitivity:1.0") == pytest.approx(0.3)
    # Two of three (0.667) is enough for sensitivity 0.6: the highest such threshold is 0.7.
    assert choose_threshold(LABELS, PROBS, "sensitivity:0.6") == pytest.approx(0.7)
    assert choose_threshold(LABELS, PROBS, "fixed:0.42") == pytest.approx(0.42)


def test_youden_threshold():
    # At 0.7: sens 2/3, spec 3/4 -> J 0.417; at 0.3: sens 1, spec 1/4 -> 0.25; at 0.9: 1/3 + 1 - 1 = 0.333.
    assert choose_threshold(LABELS, PROBS, "youden") == pytest.approx(0.7)


def test_specificity_at_sensitivity():
    assert specificity_at_sensitivity(LABELS, PROBS, 1.0) == pytest.approx(0.25)
    assert specificity_at_sensitivity(LABELS, PROBS, 0.6) == pytest.approx(0.75)


def test_bootstrap_ci_brackets_auc_and_is_reproducible():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.normal(0.4, 0.2, 300), 0, 1)
    auc = roc_auc_score(labels, probs)
    low, high = bootstrap_auc_ci(labels, probs, n_boot=500, seed=3)
    assert low < auc < high
    assert 0.02 < high - low < 0.2
    assert bootstrap_auc_ci(labels, probs, n_boot=500, seed=3) == [low, high]


def test_report_auc_is_from_probabilities_not_labels():
    report = binary_report(LABELS, PROBS, 0.5, n_boot=100)
    thresholded = roc_auc_score(LABELS, PROBS >= 0.5)
    assert report["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert report["auc"] != pytest.approx(thresholded)
    assert set(report["specificity_at_sensitivity"]) == {"0.82", "0.89", "0.95"}


def test_calibration_by_hand():
    # PROBS fall in bins 1 (0.1), 3 (0.35, 0.3), 4 (0.4), 7 (0.7), 8 (0.8), 9 (0.9)
    result = calibration(LABELS, PROBS)
    assert result["brier"] == pytest.approx(np.mean((PROBS - LABELS) ** 2))
    assert result["brier_reference"] == pytest.approx(3 / 7 * 4 / 7)
    assert [b["n"] for b in result["bins"]] == [1, 2, 1, 1, 1, 1]
    third = result["bins"][1]
    assert (third["low"], third["high"]) == pytest.approx((0.3, 0.4))
    assert third["mean_probability"] == pytest.approx(0.325) and third["observed"] == pytest.approx(0.5)
    gaps = [0.1, 2 * 0.175, 0.4, 0.3, 0.8, 0.1]  # |observed - mean probability| per bin, weighted by its count
    assert result["ece"] == pytest.approx(sum(gaps) / 7)
    assert calibration([0, 1], [0.0, 1.0])["bins"][-1]["high"] == 1.0  # 1.0 falls in the last bin, not an 11th
    with pytest.raises(ValueError, match="probabilities in"):
        calibration([0, 1], [0.2, float("nan")])  # would land in bin 0 and make every figure NaN


def test_calibration_tells_honest_from_overconfident_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0, 1, 20_000)
    labels = (rng.uniform(0, 1, probs.size) < probs).astype(int)  # malignant with exactly the stated probability
    honest = calibration(labels, probs)
    assert honest["ece"] < 0.02
    assert honest["brier"] < honest["brier_reference"]
    overconfident = calibration(labels, np.where(probs > 0.5, 0.99, 0.01))  # same ranking, extreme numbers
    assert overconfident["ece"] > 0.2
    assert "calibration" in binary_report(labels[:200], probs[:200], 0.5, n_boot=10)


def test_wilson_interval_by_hand_and_at_the_edges():
    # against scipy's implementation: 106 of 117 (the headline ensemble's melanomas caught on test), and the edges
    from scipy.stats import binomtest

    for successes, trials in ((106, 117), (5, 5), (0, 5), (2, 3)):
        expected = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(successes, trials) == pytest.approx([expected.low, expected.high], abs=1e-6)
    low, high = wilson_interval(5, 5)
    assert high == 1.0 and 0.5 < low < 0.6  # 5 of 5 is not certainty
    assert wilson_interval(0, 5)[0] == 0.0
    assert all(np.isnan(wilson_interval(0, 0)))
    report = binary_report(LABELS, PROBS, 0.5, n_boot=10)
    assert report["sensitivity_ci95"] == wilson_interval(2, 3) and report["specificity_ci95"] == wilson_interval(3, 4)


def brute_force_delong(labels, a, b):
    """DeLong's variance from its definition: pairwise comparisons of every positive with every negative."""
    pos, neg = labels == 1, labels == 0
    components = []
    for scores in (a, b):
        psi = (scores[pos][:, None] > scores[neg][None, :]) + 0.5 * (scores[pos][:, None] == scores[neg][None, :])
        components.append((psi.mean(), psi.mean(1), psi.mean(0)))
    s10 = np.cov(np.array([c[1] for c in components]))
    s01 = np.cov(np.array([c[2] for c in components]))
    covariance = s10 / pos.sum() + s01 / neg.sum()
    return components[0][0] - components[1][0], covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]


def test_delong_matches_its_definition_and_the_bootstrap():
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=300) < 0.25).astype(int)
    a = np.round(labels + rng.normal(size=300), 1)  # rounded: ties within and across classes
    b = np.round(0.6 * labels + 0.5 * a + rng.normal(size=300), 1)
    result = delong_test(labels, a, b)
    difference, variance = brute_force_delong(labels, a, b)
    assert result["difference"] == pytest.approx(difference)
    assert (result["auc_a"], result["auc_b"]) == pytest.approx((roc_auc(labels, a), roc_auc(labels, b)))
    half = result["difference_ci95"][1] - result["difference"]
    assert half == pytest.approx(1.959964 * np.sqrt(variance), rel=1e-6)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    boot = []
    for _ in range(1000):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boot.append(roc_auc(labels[i], a[i]) - roc_auc(labels[i], b[i]))
    assert np.std(boot) == pytest.approx(np.sqrt(variance), rel=0.15)
    assert 0 < result["p_value"] < 1


def test_delong_of_a_model_with_itself_and_of_a_clear_winner():
    rng = np.random.default_rng(2)
    labels = (rng.uniform(size=400) < 0.3).astype(int)
    good = labels + rng.normal(scale=0.5, size=400)
    same = delong_test(labels, good, good)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    noise = rng.normal(size=400)
    assert delong_test(labels, good, noise)["p_value"] < 1e-6
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.ones(5), good[:5], noise[:5])


def test_subgroup_report_by_hand():
    groups = ["f", "f", "m", "m", "f", "m", "f"]  # LABELS 0 0 0 0 1 1 1, PROBS .1 .4 .35 .8 .3 .9 .7
    report = subgroup_report(LABELS, PROBS, 0.5, groups)
    assert list(report) == ["f", "m"]
    f, m = report["f"], report["m"]
    assert (f["n"], f["n_positive"], m["n"], m["n_positive"]) == (4, 2, 3, 1)
    assert f["auc"] == pytest.approx(roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.3, 0.7]))  # 3 of 4 pairs
    assert (f["sensitivity"], f["specificity"]) == (0.5, 1.0)  # 0.7 caught, 0.3 missed; 0.1 and 0.4 cleared
    assert f["sensitivity_ci95"] == wilson_interval(1, 2)
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.5)
    assert np.isnan(subgroup_report([0, 0], [0.1, 0.2], 0.5, ["a", "a"])["a"]["auc"])  # one class: no AUC


# Figures the hand-written code gave (ranks, Wilson and the bootstrap loop before they moved onto scipy.stats),
# recorded on fixed inputs so the library versions can be held to them.
def _tied_set():
    rng = np.random.default_rng(7)
    labels = (rng.uniform(size=400) < 0.3).astype(int)
    probs = np.round(np.clip(0.25 * labels + rng.normal(0.4, 0.2, 400), 0, 1), 1)  # rounded: many ties
    return labels, probs


OLD_WILSON = {(0, 1): [0.0, 0.7934506882081973], (1, 1): [0.2065493117918027, 1.0], (0, 5): [0.0, 0.43448246865939283],
              (5, 5): [0.5655175313406071, 1.0], (2, 3): [0.2076595988078242, 0.9385080559790691],
              (1, 2): [0.09453120463920084, 0.9054687953607992], (3, 4): [0.3006418400969081, 0.954412739704631],
              (106, 117): [0.8394644926088968, 0.9466895382963376], (50, 100): [0.40383152963549296, 0.596168470364507],
              (3, 1000): [0.0010207838732076793, 0.008783014121212225],
              (999, 1000): [0.9943574413400738, 0.9998234536313233]}


def test_wilson_agrees_with_the_old_figures():
    # the old code used z = 1.959964 (rounded); the exact 97.5% normal quantile moves the ends by under 1e-8
    for (successes, trials), old in OLD_WILSON.items():
        assert wilson_interval(successes, trials) == pytest.approx(old, abs=1e-8)


def test_delong_agrees_with_the_old_figures():
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=300) < 0.25).astype(int)
    a = np.round(labels + rng.normal(size=300), 1)
    b = np.round(0.6 * labels + 0.5 * a + rng.normal(size=300), 1)
    result = delong_test(labels, a, b)
    assert result["auc_a"] == pytest.approx(0.7450364191729323, abs=1e-12)
    assert result["auc_b"] == pytest.approx(0.7605733082706767, abs=1e-12)
    assert result["difference_ci95"] == pytest.approx([-0.08952829674955083, 0.05845451855406199], abs=1e-12)
    assert result["p_value"] == pytest.approx(0.680663546997589, abs=1e-12)
    tied_labels, tied_probs = _tied_set()
    other = np.round(tied_probs + rng.normal(0, 0.1, 400), 1)
    result = delong_test(tied_labels, tied_probs, other)
    assert (result["auc_a"], result["auc_b"]) == pytest.approx((0.8280899548431472, 0.8042854152337091), abs=1e-12)
    assert result["difference_ci95"] == pytest.approx([-0.0029005676812274735, 0.05050964690010361], abs=1e-12)
    assert result["p_value"] == pytest.approx(0.08062293307721156, abs=1e-12)


def test_bootstrap_agrees_with_the_old_figures():
    # the resamples are drawn differently from the same seed, so the ends agree only up to Monte Carlo noise
    # (about 0.002 with 2000 resamples here): 0.01 is several times that
    labels, probs = _tied_set()
    assert bootstrap_auc_ci(labels, probs) == pytest.approx([0.7862215526780107, 0.8687389724573102], abs=0.01)
    assert bootstrap_auc_ci(labels, probs, seed=1) == pytest.approx([0.7851307604892491, 0.8683875863512664],
                                                                     abs=0.01)
    # one melanoma: it is in every resample, so the interval is the AUC itself, as before
    assert bootstrap_auc_ci([0, 0, 1], [0.35, 0.8, 0.9], n_boot=1000) == [1.0, 1.0]
    groups = subgroup_report(LABELS, PROBS, 0.5, ["f", "f", "m", "m", "f", "m", "f"])
    assert (groups["f"]["auc_ci95"], groups["m"]["auc_ci95"]) == ([0.0, 1.0], [1.0, 1.0])


def test_the_bootstrap_statistic_is_the_auc_for_every_resample():
    from skincancer.metrics import _mann_whitney_auc

    labels, probs = _tied_set()
    pos, neg = probs[labels == 1], probs[labels == 0]
    assert _mann_whitney_auc(pos, neg) == pytest.approx(roc_auc(labels, probs), abs=1e-12)
    rng = np.random.default_rng(0)
    rows_pos, rows_neg = rng.choice(pos, (5, len(pos))), rng.choice(neg, (5, len(neg)))
    resample_labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    expected = [roc_auc(resample_labels, np.r_[p, n]) for p, n in zip(rows_pos, rows_neg, strict=True)]
    assert _mann_whitney_auc(rows_pos, rows_neg) == pytest.approx(expected, abs=1e-12)
    assert _mann_whitney_auc(rows_pos.T, rows_neg.T, axis=0) == pytest.approx(expected, abs=1e-12)
