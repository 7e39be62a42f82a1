"""AUROC confidence intervals and paired tests: DeLong's method, a bootstrap, Holm's correction.

DeLong et al. (1988) estimate the variance of an empirical AUROC from its structural components;
Sun & Xu (2014, IEEE Signal Processing Letters 21(11)) compute them in O(n log n) with midranks
instead of the O(n^2) pairwise comparisons. Several classifiers scored on the SAME cases give a
covariance matrix, hence a paired test of two correlated AUROCs: with only 200 validation studies
the two AUROCs of two models share most of their noise, and the paired test removes it.

Labels are 1 (positive) / 0 (negative); scores are any real numbers (ties count one half, as in
the Mann-Whitney statistic and ``sklearn.metrics.roc_auc_score``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))


class AUROCUndefined(ValueError):
    """AUROC needs at least one positive and one negative case."""


def midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing the mean of their ranks (Sun & Xu, Alg. 1)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]]) if n else np.zeros(0, int)
    ends = np.r_[starts[1:], n]
    group_rank = 0.5 * (starts + ends - 1) + 1.0   # mean of the 1-based ranks start+1 .. end
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat(group_rank, ends - starts)
    return out


def _split(labels: Sequence[float], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or scores.shape[-1] != len(labels):
        raise ValueError(f"labels ({labels.shape}) and scores ({scores.shape}) do not match")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise AUROCUndefined(f"AUROC needs both classes (positives {int(pos.sum())}, "
                             f"negatives {int(neg.sum())})")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores[:, pos], scores[:, neg]


def delong_covariance(labels: Sequence[float], *score_sets: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their DeLong covariance matrix (k, k) for k score sets on the same cases
    (NaN when a class has fewer than two cases)."""
    scores = np.atleast_2d(np.asarray(score_sets, dtype=np.float64))
    x, y = _split(labels, scores)            # positives (k, m), negatives (k, n)
    m, n = x.shape[1], y.shape[1]
    k = scores.shape[0]
    tx = np.stack([midrank(x[r]) for r in range(k)])
    ty = np.stack([midrank(y[r]) for r in range(k)])
    tz = np.stack([midrank(np.concatenate([x[r], y[r]])) for r in range(k)])
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v01 = (tz[:, :m] - tx) / n               # per positive: share of negatives scored below it
    v10 = 1.0 - (tz[:, m:] - ty) / m         # per negative: share of positives scored above it
    if m < 2 or n < 2:   # one case in a class has no spread: the variance is undefined, not 0
        return aucs, np.full((k, k), np.nan)
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def undefined_variance(n_pos: int, n_neg: int) -> str:
    """Why there is no variance ('' when there is one): each class needs two cases, since DeLong's
    variance is the spread of per-case components over the cases of each class."""
    short = [f"{k} {name}" for k, name in ((n_pos, "positive"), (n_neg, "negative")) if k < 2]
    if not short:
        return ""
    return (f"{' and '.join(short)} case{'s' if len(short) > 1 else ''} only: DeLong variance "
            "undefined (needs 2 of each class), no interval or test")


def degenerate_interval(auroc: float) -> str:
    return (f"degenerate: AUROC {auroc:.4g} with zero DeLong variance (every positive scored on "
            "one side of every negative); the interval is not certainty")


@dataclass(frozen=True)
class AUROCInterval:
    auroc: float
    variance: float
    low: float
    high: float
    n_pos: int
    n_neg: int
    note: str = ""          # why low/high are NaN or degenerate; '' for an ordinary interval


def auroc_ci(labels: Sequence[float], scores: Sequence[float], level: float = 0.95) -> AUROCInterval:
    """AUROC with its DeLong variance and a Wald interval ``auc +- z * sd`` clipped to [0, 1].

    With fewer than two cases in a class the interval is NaN with the reason in ``note``; with zero
    variance (perfect separation) it is [auc, auc], marked degenerate in ``note``."""
    labels = np.asarray(labels)
    aucs, cov = delong_covariance(labels, scores)
    auc = float(aucs[0])
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    why = undefined_variance(n_pos, n_neg)
    if why:
        return AUROCInterval(auc, math.nan, math.nan, math.nan, n_pos, n_neg, why)
    var = max(float(cov[0, 0]), 0.0)
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    half = z * math.sqrt(var)
    return AUROCInterval(auc, var, max(0.0, auc - half), min(1.0, auc + half), n_pos, n_neg,
                         degenerate_interval(auc) if var == 0 else "")


@dataclass(frozen=True)
class PairedTest:
    auroc_a: float
    auroc_b: float
    difference: float       # a - b
    se: float               # standard error of the difference
    z: float
    p_value: float          # two-sided; NaN when there is no test (see note)
    n_pos: int
    n_neg: int
    note: str = ""


def paired_test(labels: Sequence[float], scores_a: Sequence[float],
                scores_b: Sequence[float]) -> PairedTest:
    """DeLong's two-sided test of AUROC(a) == AUROC(b) for two score sets on the same cases.

    No test (NaN) with fewer than two cases in a class, or when the difference has zero variance
    but is not zero; zero variance and zero difference (identical rankings) is p = 1."""
    labels = np.asarray(labels)
    aucs, cov = delong_covariance(labels, scores_a, scores_b)
    diff = float(aucs[0] - aucs[1])
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    why = undefined_variance(n_pos, n_neg)
    if why:
        return PairedTest(float(aucs[0]), float(aucs[1]), diff, math.nan, math.nan, math.nan,
                          n_pos, n_neg, why)
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    note = ""
    if se > 0:
        z = diff / se
        p = float(2.0 * stats.norm.sf(abs(z)))
    elif diff == 0:   # identical rankings (or both perfect): no evidence of a difference
        z, p = 0.0, 1.0
        note = "zero variance of the difference: identical rankings"
    else:
        z, p = math.nan, math.nan
        note = "degenerate: zero variance of a non-zero difference, no test"
    return PairedTest(float(aucs[0]), float(aucs[1]), diff, se, z, p, n_pos, n_neg, note)


def bootstrap_ci(labels: Sequence[float], scores: Sequence[float], n: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling positives and negatives separately
    (stratified, so every resample has both classes). Deterministic for a given ``seed``."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    x, y = _split(labels, scores[None, :])
    x, y = x[0], y[0]
    rng = np.random.default_rng(seed)
    m, k = len(x), len(y)
    aucs = []
    for start in range(0, int(n), 256):  # resamples in blocks: one vectorised ranking per block
        b = min(256, int(n) - start)
        pooled = np.concatenate([x[rng.integers(0, m, (b, m))], y[rng.integers(0, k, (b, k))]], axis=1)
        ranks = stats.rankdata(pooled, axis=1)   # midranks, as midrank() per row
        aucs.append((ranks[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * k))
    aucs = np.concatenate(aucs)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1.0 - alpha))


def mann_whitney_auroc(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> float:
    """AUROC = U / (m n) via ranks of the pooled scores (ties count one half)."""
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    m, n = len(pos), len(neg)
    ranks = midrank(np.concatenate([pos, neg]))
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate); NaN stays NaN and does not
    count towards the family size."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(order)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out
