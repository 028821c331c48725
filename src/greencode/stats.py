"""Paired bootstrap helpers and the ROC AUC, on the lowest floor (numpy only), so that training's
ablations, the RL stage's analysis and the evaluation's summary draw their intervals the same way
without training or RL importing evaluation.

:mod:`greencode.eval.stats` builds the summary's intervals on these and re-exports them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

CI_LEVEL = 0.95


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` sample indices drawn with replacement (shared by every method, so
    differences are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def mean_ci(values: np.ndarray, idx: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean of ``values``."""
    means = values[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(values.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def auc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """ROC AUC by the rank formula (Mann-Whitney U; tied scores share their average rank): the
    probability that a random positive scores above a random negative (ties count one half).
    None when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks (1-based) over runs of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def group_resamples(groups: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """Cluster-bootstrap resamples of the rows of ``groups`` (one label per row: a file, a sequence):
    each draws as many groups as there are, with replacement, and takes all their rows, so rows of one
    group (tokens of one file, which are not independent) move together."""
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[g] for g in rng.integers(0, len(uniq), size=len(uniq))])
            for _ in range(int(resamples))]


def auc_table(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], groups: Sequence[np.ndarray], *,
              resamples: int = 200, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """The AUC of several score/label sets over the same rows (e.g. one per exit point, each row a token),
    each with its cluster-bootstrap interval (:func:`group_resamples` over ``groups``), and their mean with
    its interval (each resample's mean over the sets, so the sets move together).
    Returns ``{"auc": [...], "ci": [[lo, hi], ...], "mean": m, "mean_ci": [lo, hi], "resamples": n,
    "mean_draws": array}``; ``mean_draws`` (each resample's mean, NaN where undefined) pairs two tables drawn
    with the same ``groups`` and ``seed`` (:func:`paired_auc_difference`); a set with one class absent has AUC
    None and is left out of the mean."""
    if not (len(scores) == len(labels) == len(groups)):
        raise ValueError("scores, labels and groups must come in sets of the same number")
    point = [auc(s, y) for s, y in zip(scores, labels)]
    a = (1.0 - level) / 2.0
    cis, draws = [], []
    for s, y, g in zip(scores, labels, groups):
        s, y = np.asarray(s), np.asarray(y)
        d = [auc(s[idx], y[idx]) for idx in group_resamples(g, resamples, seed)]
        d = np.array([np.nan if v is None else v for v in d], dtype=np.float64)
        draws.append(d)
        ok = d[~np.isnan(d)]
        cis.append([float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a))] if ok.size else None)
    used = [i for i, v in enumerate(point) if v is not None]
    mean = float(np.mean([point[i] for i in used])) if used else None
    mean_ci, mean_draws = None, np.full(int(resamples), np.nan)
    if used:
        stacked = np.stack([draws[i] for i in used])
        mean_draws = np.where(np.isnan(stacked).any(axis=0), np.nan, stacked.mean(axis=0))
        m = mean_draws[~np.isnan(mean_draws)]
        mean_ci = [float(np.quantile(m, a)), float(np.quantile(m, 1 - a))] if m.size else None
    return {"auc": point, "ci": cis, "mean": mean, "mean_ci": mean_ci, "resamples": int(resamples),
            "mean_draws": mean_draws}


def paired_auc_difference(a: dict, b: dict, level: float = CI_LEVEL) -> Optional[dict]:
    """``a``'s mean AUC minus ``b``'s with the paired interval, from two :func:`auc_table` results drawn on
    the same rows with the same groups and seed (so each resample is the same files for both). None when
    either mean is undefined."""
    if a.get("mean") is None or b.get("mean") is None:
        return None
    d = np.asarray(a["mean_draws"]) - np.asarray(b["mean_draws"])
    d = d[~np.isnan(d)]
    if not d.size:
        return None
    q = (1.0 - level) / 2.0
    lo, hi = float(np.quantile(d, q)), float(np.quantile(d, 1 - q))
    return {"diff": float(a["mean"] - b["mean"]), "ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}


__all__ = ["CI_LEVEL", "auc", "auc_table", "bootstrap_indices", "group_resamples", "mean_ci", "paired_auc_difference"]
