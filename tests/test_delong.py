"""DeLong AUROC variance, paired test, bootstrap and Holm against independently computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from analysis import delong


def pairwise_auc_and_components(labels, *score_sets):
    """DeLong (1988) by its O(m n) definition: psi(x, y) = 1 if x > y, 1/2 if equal, else 0."""
    labels = np.asarray(labels)
    aucs, v10s, v01s = [], [], []
    for s in score_sets:
        s = np.asarray(s, dtype=float)
        x, y = s[labels == 1], s[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))   # one per positive
        v01s.append(psi.mean(axis=0))   # one per negative
    m, n = len(v10s[0]), len(v01s[0])
    cov = np.cov(np.stack(v10s)) / m + np.cov(np.stack(v01s)) / n
    return np.array(aucs), np.atleast_2d(cov)


def test_midrank_matches_hand_ranks():
    assert delong.midrank(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert delong.midrank(np.array([0.5, 0.5])).tolist() == [1.5, 1.5]


def test_auroc_equals_mann_whitney_on_hand_made_data():
    # Pairs (pos > neg): 0.9 beats 3, 0.8 beats 3, 0.4 beats 0.1 and ties 0.4 -> U = 7.5 of 9.
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.4, 0.5, 0.4, 0.1]
    ci = delong.auroc_ci(labels, scores)
    assert ci.auroc == pytest.approx(7.5 / 9, abs=1e-15)
    assert delong.mann_whitney_auroc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)
    u = stats.mannwhitneyu([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]).statistic
    assert ci.auroc == pytest.approx(u / 9, abs=1e-15)
    assert (ci.n_pos, ci.n_neg) == (3, 3)


def test_variance_and_covariance_equal_the_pairwise_definition():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    a = np.round(rng.normal(size=60) + labels, 1)          # rounded: many ties
    b = np.round(0.5 * a + rng.normal(size=60), 1)         # correlated with a
    aucs, cov = delong.delong_covariance(labels, a, b)
    ref_aucs, ref_cov = pairwise_auc_and_components(labels, a, b)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = rng.random(150).round(2) + 0.3 * labels
    assert delong.auroc_ci(labels, scores).auroc == pytest.approx(roc_auc_score(labels, scores),
                                                                  abs=1e-12)


def test_variance_within_tolerance_of_a_large_bootstrap():
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(80, int), np.zeros(120, int)]
    scores = rng.normal(size=200) + 1.0 * labels
    ci = delong.auroc_ci(labels, scores)
    x, y = scores[labels == 1], scores[labels == 0]
    # Stratified bootstrap, each AUROC by direct pairwise comparison (independent of midranks).
    boot = []
    for _ in range(8):
        xb, yb = rng.choice(x, (500, 80)), rng.choice(y, (500, 120))
        boot.append(((xb[:, :, None] > yb[:, None, :]).mean(axis=(1, 2))))
    boot = np.concatenate(boot)
    assert ci.variance == pytest.approx(boot.var(), rel=0.10)
    # The Wald interval and the percentile bootstrap agree to about a hundredth here.
    lo, hi = delong.bootstrap_ci(labels, scores, n=4000, seed=3)
    assert abs(lo - ci.low) < 0.015 and abs(hi - ci.high) < 0.015
    assert lo < ci.auroc < hi


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50)
    assert delong.bootstrap_ci(labels, scores, n=300, seed=5) == delong.bootstrap_ci(labels, scores, n=300, seed=5)
    assert delong.bootstrap_ci(labels, scores, n=300, seed=5) != delong.bootstrap_ci(labels, scores, n=300, seed=6)


def test_ci_covers_the_true_auroc_about_95_percent():
    # Binormal model: positives ~ N(d, 1), negatives ~ N(0, 1), true AUROC = Phi(d / sqrt 2).
    rng = np.random.default_rng(11)
    d = 1.0
    truth = stats.norm.cdf(d / math.sqrt(2))
    labels = np.r_[np.ones(60, int), np.zeros(90, int)]
    hits = 0
    for _ in range(400):
        scores = rng.normal(size=150) + d * labels
        ci = delong.auroc_ci(labels, scores)
        hits += ci.low <= truth <= ci.high
    assert 0.91 <= hits / 400 <= 0.98


def test_paired_test_matches_pairwise_definition_and_detects_a_difference():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(100, int), np.zeros(100, int)]
    noise = rng.normal(size=200)
    strong = noise + 2.0 * labels
    weak = noise + 0.3 * labels + 0.5 * rng.normal(size=200)
    t = delong.paired_test(labels, strong, weak)
    aucs, cov = pairwise_auc_and_components(labels, strong, weak)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert t.difference == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    assert t.se == pytest.approx(se, rel=1e-10)
    assert t.p_value == pytest.approx(2 * stats.norm.sf(abs((aucs[0] - aucs[1]) / se)), rel=1e-9)
    assert t.p_value < 1e-6
    same = delong.paired_test(labels, strong, strong * 2 + 1)   # same ranking
    assert same.difference == 0 and same.p_value == 1.0


def test_paired_test_of_unrelated_equal_classifiers_is_not_significant_too_often():
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(50, int), np.zeros(50, int)]
    rejections = 0
    for _ in range(300):
        a = rng.normal(size=100) + labels
        b = rng.normal(size=100) + labels
        rejections += delong.paired_test(labels, a, b).p_value < 0.05
    assert rejections / 300 < 0.09   # nominal 0.05


def test_undefined_auroc_raises():
    with pytest.raises(delong.AUROCUndefined):
        delong.auroc_ci([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        delong.auroc_ci([1, 0, 2], [0.1, 0.2, 0.3])


def test_holm_matches_hand_computation():
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06).
    adjusted = delong.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(delong.holm([0.5, float("nan"), 0.6]), [1.0, np.nan, 1.0])
    assert delong.holm([]).shape == (0,)


def test_a_single_case_in_a_class_gives_no_interval_and_no_test():
    """DeLong's variance is the spread of per-case components within each class: with one case
    in a class it is undefined, so the interval and the test are NaN with the reason (never the
    [x, x] that a zero variance estimate would print)."""
    labels = [1, 0, 0, 0, 0]
    ci = delong.auroc_ci(labels, [0.9, 0.1, 0.2, 0.95, 0.3])
    assert ci.auroc == pytest.approx(0.75) and (ci.n_pos, ci.n_neg) == (1, 4)
    assert math.isnan(ci.low) and math.isnan(ci.high) and math.isnan(ci.variance)
    assert ci.note.startswith("1 positive case only") and "undefined" in ci.note
    t = delong.paired_test(labels, [0.9, 0.1, 0.2, 0.95, 0.3], [0.5, 0.4, 0.3, 0.2, 0.1])
    assert math.isnan(t.p_value) and math.isnan(t.se) and "undefined" in t.note
    assert t.difference == pytest.approx(0.75 - 1.0)
    one_each = delong.auroc_ci([1, 0], [0.7, 0.2])
    assert math.isnan(one_each.low) and one_each.note.startswith("1 positive and 1 negative cases")
    assert delong.auroc_ci([1, 1, 0, 0], [0.9, 0.2, 0.5, 0.1]).note == ""


def test_perfect_separation_gives_a_marked_degenerate_interval():
    labels = [1, 1, 1, 0, 0, 0]
    ci = delong.auroc_ci(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert (ci.auroc, ci.low, ci.high, ci.variance) == (1.0, 1.0, 1.0, 0.0)
    assert ci.note.startswith("degenerate")
    # The stratified bootstrap cannot widen it: every resample is perfectly separated as well.
    assert delong.bootstrap_ci(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], n=200) == (1.0, 1.0)
    # Both perfect: identical rankings, p = 1. Perfect against all-tied: no test, not p = 0.
    both = delong.paired_test(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [6, 5, 4, 3, 2, 1])
    assert both.p_value == 1.0 and both.se == 0.0
    tied = delong.paired_test(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [0.5] * 6)
    assert tied.difference == 0.5 and math.isnan(tied.p_value) and tied.note.startswith("degenerate")


def test_covariance_is_nan_not_zero_with_a_single_case_in_a_class():
    aucs, cov = delong.delong_covariance([1, 0, 0], [0.9, 0.1, 0.5], [0.2, 0.3, 0.1])
    np.testing.assert_allclose(aucs, [1.0, 0.5])
    assert np.isnan(cov).all() and cov.shape == (2, 2)
