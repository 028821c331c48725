"""Paired bootstrap helpers, on the lowest floor (numpy only), so that training's ablations and the
evaluation's summary draw their intervals the same way without training importing evaluation.

:mod:`greencode.eval.stats` builds the summary's intervals on these and re-exports them.
"""

from __future__ import annotations

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


__all__ = ["CI_LEVEL", "bootstrap_indices", "mean_ci"]
