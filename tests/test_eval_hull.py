"""The static hull (greencode.eval.hull): hand-made rows and per-sample values whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from greencode.eval.hull import (ABOVE, BELOW, ON, OUTSIDE, calibration_hull, hull_at, hull_vertices, judge,
                                 paired_difference, render_hull, static_hull, write_hull)
from greencode.eval.stats import bootstrap_indices, mean_ci

N = 200
RESAMPLES, SEED = 500, 7

# (compute, edit similarity): fixed@3 lies under the chord fixed@1 - fixed@5, fixed@9 under fixed@5 - full,
# saturation@0.999 costs more than the full model for less: none of them is a vertex
POINTS = {"fixed@1": ("fixed", 0.4, 30.0), "fixed@3": ("fixed", 0.5, 31.0), "fixed@5": ("fixed", 0.6, 36.0),
          "fixed@9": ("fixed", 0.9, 37.0), "full": ("full", 1.0, 38.0), "saturation@0.999": ("saturation", 1.05, 37.5)}


def _points():
    return {k: {"family": f, "compute": c, "value": v} for k, (f, c, v) in POINTS.items()}


def test_vertices_leave_out_dominated_points():
    ids = list(POINTS)
    verts = hull_vertices([(POINTS[k][1], POINTS[k][2]) for k in ids], +1)
    assert [ids[i] for i in verts] == ["fixed@1", "fixed@5", "full"]
    # a point exactly on a segment is not a vertex either; equally cheap points: the best one
    pts = [(0.4, 30.0), (0.5, 33.0), (0.6, 36.0), (0.4, 29.0), (1.0, 38.0)]
    assert hull_vertices(pts, +1) == [0, 2, 4]


def test_lower_hull_for_risk():
    # risk falls with compute; (0.6, 0.25) is above the chord (0.4, 0.4) - (1.0, 0.0): not a vertex
    pts = [(0.4, 0.4), (0.6, 0.25), (0.8, 0.1), (1.0, 0.0), (1.1, 0.0)]
    assert hull_vertices(pts, -1) == [0, 2, 3]


def test_weight_and_value_at_a_compute():
    verts = [(0.4, 30.0), (0.6, 36.0), (1.0, 38.0)]
    at = hull_at(verts, 0.7)
    assert at["region"] == "between" and (at["a"], at["b"]) == (1, 2)
    assert at["w"] == pytest.approx(0.75)  # 0.75 * 0.6 + 0.25 * 1.0 = 0.7
    assert 0.75 * 0.6 + 0.25 * 1.0 == pytest.approx(0.7)
    assert at["value"] == pytest.approx(0.75 * 36.0 + 0.25 * 38.0)
    at = hull_at(verts, 0.6)  # at a vertex: that vertex alone
    assert (at["a"], at["b"], at["w"], at["value"]) == (1, 1, 1.0, 36.0)
    assert hull_at(verts, 0.3)["region"] == "below_range" and hull_at(verts, 0.3)["value"] is None
    at = hull_at(verts, 1.7)  # past the best static point: that point, at less compute
    assert at["region"] == "past_best" and at["value"] == 38.0 and at["w"] == 1.0


def _samples(rng, mean, sd=3.0):
    """Per-sample values whose mean is exactly ``mean``."""
    x = rng.normal(0.0, sd, N)
    return {i: float(v) for i, v in enumerate(x - x.mean() + mean)}


def _per_sample(rng):
    return {k: _samples(rng, v) for k, (_, _, v) in POINTS.items()}


def _judge(extra_points, extra_samples, rng):
    points = {**_points(), **extra_points}
    per = {**_per_sample(rng), **extra_samples}
    for k, vals in per.items():  # the hull is built from the per-sample means
        points[k]["value"] = float(np.mean(list(vals.values())))
    idx = bootstrap_indices(N, RESAMPLES, SEED)
    pos = {i: i for i in range(N)}
    static = [k for k in POINTS]
    return judge(points, static, list(extra_points), +1, per, pos, idx), per, idx


def test_row_equal_to_a_vertex_is_on_the_hull():
    rng = np.random.default_rng(0)
    per = _per_sample(rng)
    res, _, _ = _judge({"gc@0.9": {"family": "gc", "compute": 0.6, "value": None}}, {"gc@0.9": dict(per["fixed@5"]),
                                                                                       **per}, rng)
    (e,) = res["rows"]
    assert e["hull"]["a"] == e["hull"]["b"] == "fixed@5" and e["hull"]["w_a"] == 1.0
    assert e["diff"] == 0.0 and e["diff_ci"] == [0.0, 0.0]
    assert e["verdict"] == ON and e["better"] == "level"
    assert res["vertices"] == ["fixed@1", "fixed@5", "full"]


def test_rows_clearly_above_and_below_and_outside():
    rng = np.random.default_rng(1)
    per = _per_sample(rng)
    w = 0.75  # compute 0.7 between fixed@5 (0.6) and full (1.0)
    mix = {i: w * per["fixed@5"][i] + (1 - w) * per["full"][i] for i in range(N)}
    noise = rng.normal(0, 1.0, N)
    up = {i: mix[i] + 3.0 + noise[i] for i in range(N)}
    down = {i: mix[i] - 3.0 + noise[i] for i in range(N)}
    res, _, idx = _judge({"up": {"family": "gc", "compute": 0.7, "value": None},
                          "down": {"family": "confidence", "compute": 0.7, "value": None},
                          "cheap": {"family": "classifier", "compute": 0.3, "value": None}},
                         {"up": up, "down": down, "cheap": _samples(rng, 20.0), **per}, rng)
    rows = {e["id"]: e for e in res["rows"]}
    for rid, sign in (("up", +1), ("down", -1)):
        e = rows[rid]
        assert (e["hull"]["a"], e["hull"]["b"]) == ("fixed@5", "full")
        assert e["hull"]["w_a"] == pytest.approx(w) and e["hull"]["compute"] == pytest.approx(0.7)
        d = np.array([(up if rid == "up" else down)[i] - mix[i] for i in range(N)])
        mean, lo, hi = mean_ci(d, idx)  # the summary's own indices, the summary's own interval
        assert e["diff"] == pytest.approx(mean) and e["diff"] == pytest.approx(sign * 3.0, abs=0.3)
        assert e["diff_ci"] == pytest.approx([lo, hi])
        assert e["n"] == N
        assert e["value"] - e["hull"]["value"] == pytest.approx(e["diff"])
    assert rows["up"]["verdict"] == ABOVE and rows["up"]["better"] == "better"
    assert rows["down"]["verdict"] == BELOW and rows["down"]["better"] == "worse"
    cheap = rows["cheap"]
    assert cheap["region"] == "below_range" and cheap["verdict"] == OUTSIDE
    assert cheap["diff"] is None and cheap["hull"] is None


def test_paired_difference_uses_only_shared_samples():
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    b = {0: 3.0, 1: 4.0, 2: 5.0}
    row = {0: 2.5, 1: 3.5}
    out = paired_difference(row, a, b, 0.5)
    assert out["n"] == 2 and out["diff"] == pytest.approx(0.5) and out["diff_ci"] is None


def _methods_and_rows(rng):
    """Summary rows and records as the evaluation writes them (per-sample metrics, token agreement)."""
    spec = {"full": ("full", 1.0, 38.0, 1.0), "fixed@1": ("fixed", 0.4, 30.0, 0.3), "fixed@5": ("fixed", 0.6, 36.0, 0.5),
            "gc@0.9": ("gc", 0.7, 30.0, 0.3), "base": ("base", 1.0, 20.0, 0.2),
            "hf_early_exit@5": ("hf_early_exit", 12.3, 38.0, 1.0)}
    rows, methods = [], {}
    for mid, (fam, c, es, ta) in spec.items():
        rows.append({"id": mid, "family": fam, "compute_ratio": c})
        methods[mid] = {"records": [{"index": i, "tokens": [1, 2], "token_agreement": ta,
                                     "metrics": {"edit_similarity": float(es + rng.normal(0, 2)), "codebleu": 0.3}}
                                    for i in range(N)]}
    return rows, methods


def test_static_hull_block_from_summary_rows_and_records():
    rng = np.random.default_rng(2)
    rows, methods = _methods_and_rows(rng)
    forced = {"fixed@1": {str(i): 0.4 for i in range(N)}, "fixed@5": {str(i): 0.2 for i in range(N)},
              "gc@0.9": {str(i): 0.3 for i in range(N)}}
    block = static_hull(rows, methods, forced=forced, resamples=RESAMPLES, seed=SEED)
    assert set(block["metrics"]) == {"edit_similarity", "token_agreement", "codebleu", "token_risk"}
    es = block["metrics"]["edit_similarity"]
    # base and HF's self-speculative rows are not judged; static rows are the hull
    assert [e["id"] for e in es["rows"]] == ["gc@0.9"]
    (g,) = es["rows"]
    assert g["verdict"] == BELOW and g["diff"] == pytest.approx(30.0 - (0.75 * 36 + 0.25 * 38), abs=0.6)
    risk = block["metrics"]["token_risk"]
    assert risk["hull"] == "lower" and risk["vertices"] == ["fixed@1", "fixed@5", "full"]
    (r,) = risk["rows"]  # 0.3 against 0.75 * 0.2 + 0.25 * 0 = 0.15: above the lower hull, worse
    assert r["diff"] == pytest.approx(0.15) and r["verdict"] == ABOVE and r["better"] == "worse"
    # only fixed exits static: saturation would be judged (the static set is a parameter)
    block2 = static_hull(rows, methods, static_families=("full", "fixed", "gc"), resamples=0)
    assert block2["metrics"]["edit_similarity"]["rows"] == []
    assert "gc@0.9" in [p["id"] for p in block2["metrics"]["edit_similarity"]["static_points"]]
    md = render_hull(block)
    assert "| `gc@0.9` |" in md and "below the hull (worse)" in md


def test_calibration_report_view_means_only():
    cal = {"split": "validation", "num_samples": 240, "criteria": {"token": {"risk": "token", "families": {
        "fixed": {"samples": 233, "candidates": [{"id": "fixed@1", "compute_ratio": 0.4, "mean_disagreement": 0.4},
                                                 {"id": "fixed@5", "compute_ratio": 0.6, "mean_disagreement": 0.2}]},
        "gc": {"samples": 233, "candidates": [{"id": "gc@0.9", "compute_ratio": 0.7, "mean_disagreement": 0.1},
                                              {"id": "gc@0.5", "compute_ratio": 0.3, "mean_disagreement": 0.5}]}}}}}
    res = calibration_hull(cal)["criteria"]["token"]
    assert res["vertices"] == ["fixed@1", "fixed@5", "full"]
    rows = {e["id"]: e for e in res["rows"]}
    assert rows["gc@0.9"]["diff"] == pytest.approx(0.1 - 0.15) and rows["gc@0.9"]["verdict"] is None
    assert rows["gc@0.5"]["verdict"] == OUTSIDE


def test_write_hull_reads_an_eval_folder_and_leaves_it_alone(tmp_path):
    rng = np.random.default_rng(3)
    rows, methods = _methods_and_rows(rng)
    ev = tmp_path / "eval"
    (ev / "methods").mkdir(parents=True)
    summary = {"format": "greencode-eval-summary/1", "rows": rows, "reference_method": "full", "num_samples": N,
               "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "level": 0.95}}
    (ev / "summary.json").write_text(json.dumps(summary))
    for mid, e in methods.items():
        (ev / "methods" / f"{mid}.json").write_text(json.dumps({"records": e["records"]}))
    before = {p.name: p.read_bytes() for p in ev.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    block = write_hull(ev, out)
    assert (out / "hull.json").is_file() and (out / "hull.md").is_file()
    assert {p.name: p.read_bytes() for p in ev.rglob("*") if p.is_file()} == before
    assert block["bootstrap"]["resamples"] == RESAMPLES and block["bootstrap"]["seed"] == SEED
    assert "token_risk" not in block["metrics"]  # no teacher-forced pass in this folder
    write_hull(ev)  # in place: the summary carries the block too
    assert json.loads((ev / "summary.json").read_text())["hull"]["metrics"]["edit_similarity"]["vertices"] == \
        block["metrics"]["edit_similarity"]["vertices"]


def test_figure_from_an_eval_folder(tmp_path):
    from greencode.plots.hull import plot_static_hull
    from greencode.plots.inputs import recording_reads

    rng = np.random.default_rng(4)
    rows, methods = _methods_and_rows(rng)
    ev = tmp_path / "res" / "eval"
    (ev / "methods").mkdir(parents=True)
    (ev / "summary.json").write_text(json.dumps({"format": "greencode-eval-summary/1", "rows": rows,
                                                 "bootstrap": {"resamples": 100, "seed": 0}}))
    for mid, e in methods.items():
        (ev / "methods" / f"{mid}.json").write_text(json.dumps({"records": e["records"]}))
    with recording_reads() as reads:
        files = plot_static_hull(tmp_path / "res", tmp_path / "figs")
    assert [p.name for p in files] == ["static_hull.png", "static_hull.pdf"]
    assert ev / "summary.json" in reads and ev / "methods" / "gc@0.9.json" in reads  # provenance: its inputs


def test_the_evaluation_writes_the_hull_with_the_static_rows_teacher_forced(tmp_path, monkeypatch):
    """A tiny run: calibration (token criterion) then the evaluation of the fixed exits and the calibrated
    confidence rows: hull.json, hull.md and the summary's hull block, token risk for the fixed exits too."""
    import sys
    from pathlib import Path

    import greencode.data
    from greencode.eval import evaluate
    from greencode.eval.calibration import calibrate
    from greencode.utils import read_json

    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_evaluator import fake_samples, make_run

    monkeypatch.setattr(greencode.data, "samples_for_config",
                        lambda cfg, tok: fake_samples(tok, cfg.eval.num_samples), raising=False)
    cfg, paths, _ = make_run(tmp_path, "eval.methods=[full,fixed,calibrated]", "calibration.families=[confidence]",
                             "calibration.criteria=[token]", "calibration.num_samples=3",
                             "calibration.confidence_thresholds=[0.9,0.5]", "eval.bootstrap_resamples=50",
                             policy=False)
    calibrate(cfg)
    out = evaluate(cfg)
    block = read_json(out / "hull.json")
    assert read_json(out / "summary.json")["hull"] == block
    assert (out / "hull.md").read_text().startswith("# Controllers against the static hull")
    es = block["metrics"]["edit_similarity"]
    assert {p["id"] for p in es["static_points"]} >= {"full", "fixed@1", "fixed@2"}
    forced = read_json(out / "teacher_forced.json")["methods"]
    assert {"fixed@1", "fixed@2"} <= set(forced)  # the static rows are teacher-forced too
    risk = block["metrics"]["token_risk"]
    assert {"fixed@1", "fixed@2", "full"} == {p["id"] for p in risk["static_points"]}
    assert all(r["verdict"] in (ABOVE, BELOW, ON, OUTSIDE) for r in es["rows"] + risk["rows"])
    assert "calibration" in block and "token" in block["calibration"]["criteria"]
