"""The AUC's cluster bootstrap (greencode.stats): intervals over groups (files, sequences), the paired
difference between two signals, against cases whose answer is known without the code under test."""

import numpy as np
import pytest

from greencode.stats import auc, auc_table, group_resamples, paired_auc_difference


def test_group_resamples_move_whole_groups():
    groups = np.array([7, 7, 7, 3, 3, 9])
    for idx in group_resamples(groups, resamples=50, seed=1):
        # every drawn row brings its whole group: each group's count is a multiple of its size
        counts = {g: int(np.sum(groups[idx] == g)) for g in (7, 3, 9)}
        assert counts[7] % 3 == 0 and counts[3] % 2 == 0
        assert sum(c // s for c, s in zip(counts.values(), (3, 2, 1))) == 3  # three groups drawn


def test_separable_scores_give_auc_one_with_a_degenerate_interval():
    y = np.array([0, 1] * 50)
    s = y + 0.01 * np.arange(100)  # positives all above negatives
    groups = np.repeat(np.arange(20), 5)
    tab = auc_table([s], [y], [groups], resamples=50, seed=0)
    assert tab["auc"] == [1.0] and tab["ci"] == [[1.0, 1.0]] and tab["mean_ci"] == [1.0, 1.0]


def test_interval_covers_the_known_auc_and_clusters_widen_it():
    # two normal classes one standard deviation apart: AUC = Phi(1 / sqrt 2) = 0.7602
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n).astype(bool)
    s = rng.standard_normal(n) + y
    independent = auc_table([s], [y], [np.arange(n)], resamples=200, seed=0)
    lo, hi = independent["ci"][0]
    assert lo < 0.7602 < hi and hi - lo < 0.06
    # the same rows copied 10 times within each group: the AUC is unchanged, but 400 groups carry the
    # information of 400 rows, so a bootstrap over groups must be about sqrt(10) x wider than one over rows
    s10, y10 = np.repeat(s[:400], 10), np.repeat(y[:400], 10)
    by_row = auc_table([s10], [y10], [np.arange(4000)], resamples=200, seed=0)
    by_group = auc_table([s10], [y10], [np.repeat(np.arange(400), 10)], resamples=200, seed=0)
    assert by_row["auc"] == by_group["auc"] == [pytest.approx(auc(s[:400], y[:400]))]
    w_row = by_row["ci"][0][1] - by_row["ci"][0][0]
    w_group = by_group["ci"][0][1] - by_group["ci"][0][0]
    assert w_group > 2.0 * w_row


def test_mean_over_sets_and_one_class_absent():
    y1, s1 = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])  # AUC 1
    y2, s2 = np.array([0, 1, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2])  # AUC 0
    y3, s3 = np.ones(4, int), np.arange(4.0)  # one class: undefined, left out of the mean
    g = np.arange(4)
    tab = auc_table([s1, s2, s3], [y1, y2, y3], [g, g, g], resamples=20, seed=0)
    assert tab["auc"] == [1.0, 0.0, None] and tab["mean"] == 0.5


def test_paired_difference_of_a_signal_with_itself_and_with_a_worse_one():
    rng = np.random.default_rng(3)
    n = 3000
    y = rng.integers(0, 2, n).astype(bool)
    groups = np.repeat(np.arange(300), 10)
    good = rng.standard_normal(n) + 2 * y
    bad = rng.standard_normal(n) + 0.3 * y
    a = auc_table([good], [y], [groups], resamples=200, seed=5)
    b = auc_table([bad], [y], [groups], resamples=200, seed=5)
    same = paired_auc_difference(a, a)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and not same["excludes_zero"]
    d = paired_auc_difference(a, b)
    assert d["diff"] == pytest.approx(a["mean"] - b["mean"]) and d["excludes_zero"] and d["ci"][0] > 0.2
