"""Token agreement and paired bootstrap intervals (greencode.eval.stats), on hand-made records."""

import pytest

from greencode.eval.stats import add_agreement, add_confidence, significance_marks, token_agreement


def test_token_agreement_hand_cases():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == (1.0, 3)
    assert token_agreement([1, 9, 3], [1, 2, 3]) == (pytest.approx(2 / 3), 1)
    assert token_agreement([1, 2], [1, 2, 3, 4]) == (0.5, 2)  # positions past the shorter output disagree
    assert token_agreement([1, 2, 3, 4], [1, 2]) == (1.0, 2)
    assert token_agreement([], []) == (1.0, 0)
    assert token_agreement([5], []) == (0.0, 0)
    assert token_agreement([7, 2, 3], [1, 2, 3]) == (pytest.approx(2 / 3), 0)


def _methods(values_by_method):
    return {m: {"records": [{"index": i, "tokens": toks, "metrics": {"edit_similarity": es}}
                            for i, (toks, es) in enumerate(vals)]}
            for m, vals in values_by_method.items()}


def test_paired_bootstrap_detects_a_constant_shift_and_not_identity():
    n = 40
    full = [([1, 2, 3], 50.0 + (i % 7)) for i in range(n)]
    same = [([1, 2, 3], 50.0 + (i % 7)) for i in range(n)]
    worse = [([1, 2, 9], 40.0 + (i % 7)) for i in range(n)]  # 10 points lower on every sample
    noisy = [([1, 2, 3], 50.0 + (i % 7) + (1.0 if i % 2 else -1.0)) for i in range(n)]  # +-1, mean 0
    methods = _methods({"full": full, "same": same, "worse": worse, "noisy": noisy})
    rows = [{"id": m} for m in methods]
    add_agreement(methods, "full")
    add_confidence(rows, methods, "full", resamples=500, seed=3)
    r = {row["id"]: row for row in rows}
    assert r["full"]["token_agreement_mean"] == 1.0 and r["full"]["edit_similarity_diff"] is None
    assert r["same"]["edit_similarity_diff"] == 0.0 and r["same"]["edit_similarity_diff_ci"] == [0.0, 0.0]
    assert r["same"]["edit_similarity_diff_significant"] is False
    assert r["worse"]["edit_similarity_diff"] == pytest.approx(-10.0)
    assert r["worse"]["edit_similarity_diff_ci"] == [pytest.approx(-10.0), pytest.approx(-10.0)]
    assert r["worse"]["edit_similarity_diff_significant"] is True
    assert r["worse"]["token_agreement_mean"] == pytest.approx(2 / 3)
    assert r["worse"]["prefix_match_diff"] == pytest.approx(-1.0) and r["worse"]["prefix_match_diff_significant"]
    lo, hi = r["noisy"]["edit_similarity_diff_ci"]
    assert lo < 0 < hi and not r["noisy"]["edit_similarity_diff_significant"]
    assert significance_marks(r["worse"])["edit_similarity"] == "-"
    assert significance_marks(r["noisy"])["edit_similarity"] == ""
    # the mean's interval lies inside the range of the per-sample values and around the mean
    lo, hi = r["full"]["edit_similarity_ci"]
    assert 50.0 <= lo <= r["full"]["edit_similarity_mean"] <= hi <= 56.0


def test_no_resamples_gives_means_only_and_missing_reference_gives_no_diffs():
    methods = _methods({"a": [([1], 1.0), ([2], 3.0)]})
    rows = [{"id": "a"}]
    add_agreement(methods, None)
    add_confidence(rows, methods, None, resamples=0)
    assert rows[0]["edit_similarity_mean"] == 2.0 and rows[0]["edit_similarity_ci"] is None
    assert rows[0]["token_agreement_mean"] is None and rows[0]["edit_similarity_diff"] is None


def test_latency_intervals_use_the_timed_samples_only_and_are_paired():
    def recs(lat):
        return [{"index": i, "metrics": {}, "latency_s": v} for i, v in enumerate(lat)]

    methods = {"full": {"records": recs([1.0, 2.0, None, None])},  # samples 2, 3: accuracy only, untimed
               "gc": {"records": recs([1.5, 2.5, None, None])}}
    rows = [{"id": "full"}, {"id": "gc"}]
    add_confidence(rows, methods, "full", resamples=200, seed=0)
    gc = rows[1]
    assert gc["latency_s_mean"] == 2.0 and gc["latency_s_diff"] == 0.5
    assert gc["latency_s_diff_ci"] == [0.5, 0.5] and gc["latency_s_diff_significant"] is True  # paired: no spread
    assert 1.5 <= gc["latency_s_ci"][0] <= gc["latency_s_ci"][1] <= 2.5
