"""Calibrated targets: the Learn-then-Test arithmetic by hand, the choice rule on a fake
evaluation, and the guards (test split refused, missing calibration named)."""

import math

import numpy as np
import pytest

from greencode.config import ConfigError, config_from_dict
from greencode.eval.calibration import (calibrated_ids, candidate_specs, choose, fixed_sequence, hb_pvalue,
                                        targets_table, threshold_for)
from greencode.utils import write_json


def test_hoeffding_bentkus_by_hand():
    # r = 0, n = 100, alpha = 0.05: Hoeffding 0.95^100 = 0.00592 < Bentkus e * 0.95^100
    assert hb_pvalue(0.0, 100, 0.05) == pytest.approx(0.95 ** 100, rel=1e-9)
    # r = 0.02: h(0.02, 0.05) = 0.012143 -> exp(-1.2143) = 0.2969; Bentkus e * P(Bin <= 2) = 0.3215
    assert hb_pvalue(0.02, 100, 0.05) == pytest.approx(0.2969, abs=2e-4)
    # Bentkus wins when r is just below alpha and n is small: n = 10, r = 0.1, alpha = 0.3
    h = 0.1 * math.log(0.1 / 0.3) + 0.9 * math.log(0.9 / 0.7)
    bentkus = math.e * (0.7 ** 10 + 10 * 0.3 * 0.7 ** 9)
    assert hb_pvalue(0.1, 10, 0.3) == pytest.approx(min(math.exp(-10 * h), bentkus), rel=1e-9)
    assert hb_pvalue(0.05, 100, 0.05) == 1.0 and hb_pvalue(0.2, 100, 0.05) == 1.0  # at or above the target
    # certifying 1% at delta 0.1 with no disagreement at all needs n >= 230 (0.99^n <= 0.1)
    assert hb_pvalue(0.0, 229, 0.01) > 0.1 >= hb_pvalue(0.0, 230, 0.01)


def test_fixed_sequence_stops_at_the_first_failure():
    good, bad = np.zeros(300), np.full(300, 0.5)
    ok, p = fixed_sequence([good, good, bad, good], alpha=0.05, delta=0.1)
    assert ok == [True, True, False, False]  # the 4th would pass alone but comes after a failure
    assert p[3] < 0.1 and p[2] == 1.0


def _cfg(tmp_path, **cal):
    return config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                             "calibration": {"targets": [0.02, 0.1], "delta": 0.1, **cal}})


def test_candidates_are_ordered_most_conservative_first(tmp_path):
    cfg = _cfg(tmp_path, gc_thresholds=[0.5, 0.99, 0.9], entropy_thresholds=[2.0, 0.1, 0.5])
    specs = candidate_specs(cfg, [1, 2, 5])
    assert [s.id for s in specs["fixed"]] == ["fixed@5", "fixed@2", "fixed@1"]
    assert [s.param for s in specs["gc"]] == [0.99, 0.9, 0.5]
    assert [s.param for s in specs["entropy"]] == [0.1, 0.5, 2.0]  # low entropy threshold = rarely exits


def _fake_eval(path, per_method: dict[str, list[tuple[float, float]]]):
    """methods/<id>.json with records holding token agreement and cost, like the evaluator's."""
    for mid, rows in per_method.items():
        records = [{"index": i, "token_agreement": 1.0 - d, "cost": {"macs_done": c * 1000.0, "macs_full": 1000.0}}
                   for i, (d, c) in enumerate(rows)]
        write_json(path / "methods" / f"{mid}.json", {"records": records})


def test_choose_takes_the_cheapest_certified_candidate(tmp_path):
    cfg = _cfg(tmp_path, families=["gc", "fixed"], gc_thresholds=[0.99, 0.9, 0.5])
    n = 400
    # gc@0.99: no disagreement, compute 0.9; gc@0.9: 4 of 400 samples disagree fully (1%), compute 0.6;
    # gc@0.5: 20%, compute 0.3
    per = {"gc@0.99": [(0.0, 0.9)] * n,
           "gc@0.9": [(1.0, 0.6)] * 4 + [(0.0, 0.6)] * (n - 4),
           "gc@0.5": [(0.2, 0.3)] * n,
           "fixed@2": [(0.5, 0.5)] * n, "fixed@1": [(0.6, 0.3)] * n}
    _fake_eval(tmp_path / "eval", per)
    out = choose(cfg, tmp_path / "eval", candidate_specs(cfg, [1, 2]))
    gc = out["gc"]["targets"]
    # by hand: at 2%, gc@0.99 has p = 0.98^400 = 3e-4 (certified); gc@0.9 (mean 1%) has Hoeffding
    # exp(-400 h(0.01, 0.02)) = 0.287 and Bentkus e * P(Bin(400, 0.02) <= 4) = 0.265 > 0.1: testing stops there
    bentkus = math.e * sum(math.comb(400, i) * 0.02 ** i * 0.98 ** (400 - i) for i in range(5))
    assert bentkus == pytest.approx(0.2646, abs=1e-3)
    assert gc["0.02"]["certified"] == ["gc@0.99"] and gc["0.02"]["chosen"] == "gc@0.99"
    assert gc["0.02"]["p_values"]["gc@0.9"] == pytest.approx(bentkus, rel=1e-9)
    assert gc["0.1"]["chosen"] == "gc@0.9"  # gc@0.5 (20%) fails at 10%: the cheapest certified is gc@0.9
    assert out["fixed"]["targets"]["0.1"]["chosen"] is None  # the deepest fixed exit already disagrees 50%
    assert calibrated_ids({"families": out}) == ["gc@0.99", "gc@0.9"]
    cal = {"families": out, "targets": [0.02, 0.1], "delta": 0.1}
    assert threshold_for(cal, "gc", 0.1) == 0.9 and threshold_for(cal, "gc", 0.5) == 0.9  # the largest target <= it
    with pytest.raises(ConfigError, match="below the smallest calibrated target"):
        threshold_for(cal, "gc", 0.001)
    table = targets_table(cal, [{"id": "gc@0.9", "token_agreement": 0.97, "compute_ratio": 0.61}])
    row = next(r for r in table["rows"] if r["target"] == 0.1 and r["family"] == "gc")
    assert row["achieved_disagreement"] == pytest.approx(0.03) and row["meets_target"] is True


def test_calibration_refuses_the_test_split(tmp_path):
    from greencode.eval.calibration import calibrate

    with pytest.raises(ConfigError, match="validation split only"):
        calibrate(_cfg(tmp_path), split="test")


def test_calibrated_method_without_calibration_is_named(tmp_path):
    from greencode.eval.evaluator import _expand_calibrated

    cfg = _cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/calibrate.py"):
        _expand_calibrated(cfg, ["full", "calibrated"], explicit=True)
    assert _expand_calibrated(cfg, ["full", "calibrated"], explicit=False) == (["full"], None)


def _fake_eval_es(path, per_method: dict[str, list[tuple[float, float]]]):
    """methods/<id>.json whose records hold an edit similarity (0-100) and a cost, like the evaluator's."""
    for mid, rows in per_method.items():
        records = [{"index": i, "token_agreement": 1.0, "metrics": {"edit_similarity": es},
                    "cost": {"macs_done": c * 1000.0, "macs_full": 1000.0}} for i, (es, c) in enumerate(rows)]
        write_json(path / "methods" / f"{mid}.json", {"records": records})


def test_quality_and_token_criteria_use_their_own_losses(tmp_path):
    from greencode.eval.calibration import sample_losses

    cfg = _cfg(tmp_path, families=["gc"], gc_thresholds=[0.9, 0.5])
    n = 300
    # the full model: edit similarity 60 on every sample. gc@0.9: 61 (better: loss clipped to 0) on every
    # sample; gc@0.5: 30 points worse on every sample (loss 0.3)
    _fake_eval_es(tmp_path / "eval", {"full": [(60.0, 1.0)] * n, "gc@0.9": [(61.0, 0.7)] * n,
                                      "gc@0.5": [(30.0, 0.4)] * n})
    q = sample_losses(tmp_path / "eval", "gc@0.5", "quality")
    assert q[0] == (pytest.approx(0.3), pytest.approx(0.4))
    assert sample_losses(tmp_path / "eval", "gc@0.9", "quality")[5][0] == 0.0
    specs = candidate_specs(cfg, [1])
    quality = choose(cfg, tmp_path / "eval", specs, "quality")
    assert quality["gc"]["targets"]["0.02"]["chosen"] == "gc@0.9"
    # teacher-forced: gc@0.9 never differs, gc@0.5 on 1 position in 20 of every sample (5%)
    forced = {"gc@0.9": {str(i): 0.0 for i in range(n)}, "gc@0.5": {str(i): 0.05 for i in range(n)}}
    token = choose(cfg, tmp_path / "eval", specs, "token", forced)
    assert token["gc"]["targets"]["0.02"]["chosen"] == "gc@0.9"
    assert token["gc"]["targets"]["0.1"]["chosen"] == "gc@0.5"  # 5% mean is certified at 10% with n = 300
    assert sample_losses(tmp_path / "eval", "gc@0.5", "token") is None  # no teacher-forced pass: no token loss
    # the sequence criterion sees no disagreement at all here (token_agreement 1.0): all three differ
    seq = choose(cfg, tmp_path / "eval", specs, "sequence")
    assert seq["gc"]["targets"]["0.02"]["chosen"] == "gc@0.5"
    cal = {"targets": [0.02, 0.1], "delta": 0.1, "families": seq,
           "criteria": {"sequence": {"families": seq}, "quality": {"families": quality}, "token": {"families": token}}}
    assert threshold_for(cal, "gc", 0.02, "quality") == 0.9 and threshold_for(cal, "gc", 0.02) == 0.5
    assert threshold_for(cal, "gc", 0.1, "token") == 0.5
    with pytest.raises(ConfigError, match="not calibrated"):
        threshold_for({"criteria": {"sequence": {"families": seq}}}, "gc", 0.1, "token")
    assert set(calibrated_ids(cal)) == {"gc@0.9", "gc@0.5"}
    rows = [{"id": "gc@0.9", "token_agreement": 1.0, "compute_ratio": 0.7, "layers_skipped_share": 0.3},
            {"id": "gc@0.5", "token_agreement": 1.0, "compute_ratio": 0.4, "layers_skipped_share": 0.6},
            {"id": "oracle", "hypothetical_layers_skipped_share": 0.75}]
    table = targets_table(cal, rows, tmp_path / "eval", forced)
    q2 = next(r for r in table["rows"] if r["criterion"] == "quality" and r["target"] == 0.02)
    assert q2["method"] == "gc@0.9" and q2["achieved_disagreement"] == 0.0 and q2["meets_target"] is True
    assert q2["oracle_savings_share"] == pytest.approx(0.4)
    t10 = next(r for r in table["rows"] if r["criterion"] == "token" and r["target"] == 0.1)
    assert t10["achieved_disagreement"] == pytest.approx(0.05)


def test_smallest_certifiable_risk_by_hand():
    from greencode.eval.calibration import certifiable, max_certified_risk, smallest_certifiable_risk

    # at observed risk 0 the p-value is (1 - alpha)^n (Hoeffding; Bentkus is e times it): certified iff
    # (1 - alpha)^n <= delta, so the smallest certifiable target is 1 - delta^(1/n)
    assert smallest_certifiable_risk(240, 0.1) == pytest.approx(1 - math.exp(math.log(0.1) / 240), rel=1e-12)
    assert smallest_certifiable_risk(240, 0.1) == pytest.approx(0.009548, abs=1e-6)  # 0.95%
    assert smallest_certifiable_risk(1500, 0.1) == pytest.approx(0.0015339, abs=1e-7)  # 0.15%
    assert smallest_certifiable_risk(580, 0.1) == pytest.approx(0.0039622, abs=1e-6)  # 0.40%
    for n in (240, 580, 1500):  # it is the boundary: the test passes at it and fails just below
        a = smallest_certifiable_risk(n, 0.1)
        assert hb_pvalue(0.0, n, a * (1 + 1e-9)) <= 0.1 < hb_pvalue(0.0, n, a * (1 - 1e-6))
    # the architecture's numbers: at n = 240, 2% is certified only at an observed risk of about 0.4% ...
    assert max_certified_risk(240, 0.02, 0.1) == pytest.approx(0.0039, abs=4e-4)
    # ... and 1% almost never (only at observed 0); at n = 1500, 2% up to about 1.3%
    assert max_certified_risk(240, 0.01, 0.1) < 0.0005
    assert 0.012 < max_certified_risk(1500, 0.02, 0.1) < 0.015
    assert max_certified_risk(100, 0.01, 0.1) is None  # 0.99^100 = 0.366 > 0.1: never
    rep = certifiable(240, [0.01, 0.02], 0.1)
    assert rep["n"] == 240 and set(rep["max_observed_risk"]) == {"0.01", "0.02"}


def test_token_criterion_on_its_own_samples_with_its_own_compute(tmp_path):
    """The simulated pass's compute and layers skipped price the token criterion's candidates, also on
    samples the free-running evaluation never decoded; the oracle's savings share comes with them."""
    cfg = _cfg(tmp_path, families=["gc"], gc_thresholds=[0.9, 0.5])
    _fake_eval_es(tmp_path / "eval", {"full": [(60.0, 1.0)] * 10, "gc@0.9": [(61.0, 0.7)] * 10,
                                      "gc@0.5": [(30.0, 0.4)] * 10})
    n = 600  # more than the 10 free-running samples
    forced = {"gc@0.9": {str(i): 0.0 for i in range(n)}, "gc@0.5": {str(i): 0.05 for i in range(n)}}
    compute = {"gc@0.9": {str(i): 0.8 for i in range(n)}, "gc@0.5": {str(i): 0.5 for i in range(n)}}
    skipped = {"gc@0.9": {str(i): 0.2 for i in range(n)}, "gc@0.5": {str(i): 0.5 for i in range(n)}}
    oracle = {str(i): 0.625 for i in range(n)}
    specs = candidate_specs(cfg, [1])
    token = choose(cfg, tmp_path / "eval", specs, "token", forced, compute, skipped, oracle)["gc"]
    assert token["samples"] == n
    t = token["targets"]["0.1"]
    assert t["chosen"] == "gc@0.5" and t["calibration_compute_ratio"] == pytest.approx(0.5)
    assert t["oracle_savings_share"] == pytest.approx(0.8)  # 0.5 / 0.625
    assert token["targets"]["0.02"]["oracle_savings_share"] == pytest.approx(0.32)  # gc@0.9: 0.2 / 0.625
    assert token["certifiable"]["smallest_certifiable_risk"] == pytest.approx(1 - 0.1 ** (1 / n))
