"""Summary arithmetic, deltas, method names and atomic writing of the evaluator (no model)."""

import json

import pytest

from greencode.config import ConfigError, EvalConfig
from greencode.eval.methods import expand_methods, parse_method_name, split_names
from greencode.eval.summary import (SHARD_FORMAT, aggregate_efficiency, build_rows, delta_pct, merge_shards,
                                    overhead_ab_summary, summary_table, write_results)


def rec(index, tokens, exit_layers, latency, energy=None, layers_run=0, steps=0, done=0.0, full=1.0, counters=None):
    return {"index": index, "id": f"s{index}", "prediction": " ".join(map(str, tokens)), "reference": "1 2 3",
            "tokens": tokens, "new_tokens": len(tokens), "exit_layers": exit_layers, "latency_s": latency,
            "energy_j": energy, "energy_note": None if energy is not None else "no counter", "counters": counters,
            "cost": {"decode_steps": steps, "layers_run": layers_run, "layer_steps_full": steps * 4,
                     "macs_done": done, "macs_full": full}}


def test_delta_pct():
    assert delta_pct(0.9, 1.0) == pytest.approx(-10.0)
    assert delta_pct(3.0, 2.0) == pytest.approx(50.0)
    assert delta_pct(-1.0, -2.0) == pytest.approx(50.0)  # relative to |reference|
    assert delta_pct(1.0, 0.0) is None and delta_pct(None, 1.0) is None and delta_pct(1.0, None) is None


def test_aggregate_efficiency_arithmetic():
    records = [
        rec(0, [5, 6, 7, 8], [3, 1, 3, 1], 1.0, energy=2.0, layers_run=8, steps=3, done=30.0, full=60.0,
            counters={"controller_time_s": 0.1, "decode_time_s": 0.5}),
        rec(1, [5, 6, 7, 8, 9, 9], [3, 2, 2, 2, 2, 2], 3.0, energy=None, layers_run=15, steps=5, done=50.0,
            full=100.0, counters={"controller_time_s": 0.2, "decode_time_s": 1.5}),
    ]
    agg = aggregate_efficiency(records)
    assert agg["num_samples"] == 2 and agg["latency_s"] == 2.0 and agg["latency_s_median"] == 2.0
    assert agg["tokens_per_s"] == pytest.approx(10 / 4)
    assert agg["energy_j"] is None and agg["energy_null_reason"] == "no counter"
    assert agg["mean_exit_layer"] == pytest.approx((1 + 3 + 1 + 2 * 5) / 8)  # first token of each excluded
    assert agg["layers_skipped_share"] == pytest.approx(1 - 23 / 32)
    assert agg["compute_ratio"] == pytest.approx(80 / 160)
    assert agg["controller_overhead_share"] == pytest.approx(0.3 / 2.0)
    records[1]["energy_j"] = 4.0
    assert aggregate_efficiency(records)["energy_j"] == 3.0
    with pytest.raises(ValueError, match="no records"):
        aggregate_efficiency([])


def test_overhead_ab_summary():
    ab = {"threshold": 0.9, "records": [
        {"index": 0, "decode_time_s_full": 1.0, "decode_time_s_policy": 1.1, "controller_time_s": 0.05},
        {"index": 1, "decode_time_s_full": 2.0, "decode_time_s_policy": 2.0, "controller_time_s": 0.05},
        {"index": 2, "decode_time_s_full": 1.0, "decode_time_s_policy": 1.3, "controller_time_s": 0.05}]}
    s = overhead_ab_summary(ab)
    assert s["overhead_share"] == pytest.approx((4.4 - 4.0) / 4.0)
    assert s["overhead_share_median_paired"] == pytest.approx(0.1)
    assert s["controller_time_s"] == pytest.approx(0.15) and s["threshold"] == 0.9
    assert overhead_ab_summary(None) is None


def shard(methods, rank=0, world=1, ab=None):
    return {"format": SHARD_FORMAT, "rank": rank, "world_size": world,
            "meta": {"language": "python", "num_layers": 4, "num_samples": 2, "max_new_tokens": 4,
                     "energy_source": "time-only"},
            "methods": {m: {"spec": {"id": m, "family": m.split("@")[0], "description": m}, "records": r}
                        for m, r in methods.items()},
            "skipped": [{"id": "gc@0.9", "family": "gc", "reason": "no exit policy"}], "overhead_ab": ab}


def fake_metrics(preds, refs, language):
    score = sum(p == r for p, r in zip(preds, refs)) / len(preds)
    return {"codebleu": score, "rouge_l": score / 2, "bleu": 100 * score}


def fake_sample_metrics(pred, ref, language):
    return {"codebleu": float(pred == ref)}


def test_build_rows_deltas_against_full_and_fallback_to_full_hf():
    full = [rec(0, [1, 2, 3], [3, 3, 3], 2.0, done=8.0, full=8.0), rec(1, [1, 2, 3], [3, 3, 3], 2.0, done=8.0, full=8.0)]
    fixed = [rec(0, [1, 2, 3], [3, 1, 1], 1.0, done=4.0, full=8.0), rec(1, [1, 2, 4], [3, 1, 1], 1.0, done=4.0,
                                                                         full=8.0)]
    merged = merge_shards([shard({"full": full, "fixed@1": fixed})])
    rows = {r["id"]: r for r in build_rows(merged, fake_metrics, fake_sample_metrics)}
    f = rows["fixed@1"]
    assert f["reference_method"] == "full"
    assert f["codebleu"] == 0.5 and f["codebleu_delta_pct"] == pytest.approx(-50.0)
    assert f["latency_s_delta_pct"] == pytest.approx(-50.0) and f["tokens_per_s_delta_pct"] == pytest.approx(100.0)
    assert f["compute_ratio"] == 0.5 and f["compute_ratio_delta_pct"] == pytest.approx(-50.0)
    assert f["same_output_as_reference_share"] == 0.5 and rows["full"]["codebleu_delta_pct"] == 0.0
    assert merged["methods"]["fixed@1"]["records"][1]["metrics"] == {"codebleu": 0.0}
    merged = merge_shards([shard({"full_hf": full, "fixed@1": fixed})])
    rows = {r["id"]: r for r in build_rows(merged, fake_metrics, fake_sample_metrics)}
    assert rows["fixed@1"]["reference_method"] == "full_hf"
    assert rows["fixed@1"]["codebleu_delta_pct"] == pytest.approx(-50.0)


def test_merge_keeps_sample_order_and_refuses_inconsistent_shards():
    r0 = [rec(0, [1], [3], 1.0), rec(2, [1], [3], 1.0)]
    r1 = [rec(1, [1], [3], 1.0)]
    merged = merge_shards([shard({"full": r1}, rank=1, world=2), shard({"full": r0}, rank=0, world=2)])
    assert [r["index"] for r in merged["methods"]["full"]["records"]] == [0, 1, 2]
    assert len(merged["skipped"]) == 1 and merged["world_size"] == 2
    with pytest.raises(ValueError, match="different methods"):
        merge_shards([shard({"full": r1}, rank=1, world=2), shard({"fixed@1": r0}, rank=0, world=2)])
    with pytest.raises(ValueError, match="number of processes"):
        merge_shards([shard({"full": r1}, rank=1, world=2), shard({"full": r0}, rank=0, world=3)])
    with pytest.raises(ValueError, match="not an evaluation shard"):
        merge_shards([{"format": "other"}])


def test_a_method_no_shard_decoded_is_skipped_with_its_reason():
    """eval.timing_samples=0 leaves the timed-only HF methods without a sample: they are listed as
    skipped (with why and how to get them), not summarised over nothing."""
    r0 = [rec(0, [1], [3], 1.0)]
    merged = merge_shards([shard({"full": r0, "full_hf": []}, rank=0, world=2),
                           shard({"full": [rec(1, [1], [3], 1.0)], "full_hf": []}, rank=1, world=2)])
    assert list(merged["methods"]) == ["full"]
    gone = {s["id"]: s for s in merged["skipped"]}
    assert "timing_samples=0" in gone["full_hf"]["reason"] and "accuracy_only_hf" in gone["full_hf"]["reason"]


def test_write_results_is_atomic(tmp_path):
    out = tmp_path / "results" / "eval"
    merged = merge_shards([shard({"full": [rec(0, [1, 2], [3, 3], 1.0, done=1.0, full=1.0)]})])
    write_results(merged, out, {"seed": 1, "config_name": "t"}, metrics_fn=fake_metrics,
                  sample_metrics_fn=fake_sample_metrics)
    before = (out / "summary.json").read_text()
    assert summary_table(out)[0]["id"] == "full" and summary_table(out.parent)[0]["id"] == "full"
    assert "no exit policy" in (out / "summary.md").read_text()

    def broken(*a):
        raise RuntimeError("metric crashed")

    merged2 = merge_shards([shard({"fixed@1": [rec(0, [1, 2], [3, 1], 1.0)]})])
    with pytest.raises(RuntimeError, match="metric crashed"):
        write_results(merged2, out, {}, metrics_fn=broken, sample_metrics_fn=fake_sample_metrics)
    assert (out / "summary.json").read_text() == before  # the old results are untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval"]  # no temp folders left
    assert json.loads(before)["rows"][0]["energy_j"] is None


def test_summary_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/evaluate.py"):
        summary_table(tmp_path)
    (tmp_path / "summary.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="not an evaluation summary"):
        summary_table(tmp_path)


def test_method_names_and_expansion():
    assert parse_method_name("gc@0.9") == ("gc", 0.9)
    assert parse_method_name("fixed@3") == ("fixed", 3)
    assert parse_method_name("oracle") == ("oracle", None)
    for bad, msg in (("greedy", "unknown method"), ("full@1", "takes no parameter"), ("fixed@x", "integer"),
                     ("gc@1.5", r"\[0, 1\]"), ("entropy@-1", ">= 0"), ("fixed@-1", ">= 0")):
        with pytest.raises(ConfigError, match=msg):
            parse_method_name(bad)
    assert split_names("full, gc@0.9,fixed") == ["full", "gc@0.9", "fixed"]
    assert split_names(["full,oracle", "gc"]) == ["full", "oracle", "gc"]
    with pytest.raises(ConfigError, match="no method names"):
        split_names([" , "])
    ec = EvalConfig(gc_thresholds=[0.9, 0.6], confidence_thresholds=[0.5], entropy_thresholds=[1.0, 2.0])
    ids = [s.id for s in expand_methods(["gc", "full", "fixed", "gc@0.9", "base", "hf_early_exit", "entropy"],
                                        ec, [1, 2, 3, 5], 7)]
    assert ids == ["base", "full", "fixed@1", "fixed@2", "fixed@3", "fixed@5", "entropy@1.0", "entropy@2.0", "gc@0.6",
                   "gc@0.9", "hf_early_exit@1", "hf_early_exit@2", "hf_early_exit@3", "hf_early_exit@5"]
    ec.hf_early_exit_layers = [3]
    assert [s.id for s in expand_methods(["hf_early_exit"], ec, [1, 2], 7)] == ["hf_early_exit@3"]
    with pytest.raises(ConfigError, match="out of range"):
        expand_methods(["fixed@7"], ec, [1, 2], 7)


def test_goal_check():
    from greencode.eval.summary import goal_check

    def row(i, fam, cb, compute, cb_d, compute_d, lat_d):
        return {"id": i, "family": fam, "codebleu": cb, "compute_ratio": compute, "codebleu_delta_pct": cb_d,
                "compute_ratio_delta_pct": compute_d, "latency_s_delta_pct": lat_d}

    rows = [row("full", "full", 0.40, 1.0, 0.0, 0.0, 0.0),
            row("gc@0.9", "gc", 0.395, 0.55, -1.25, -45.0, -35.0),   # meets the goal
            row("gc@0.6", "gc", 0.30, 0.40, -25.0, -60.0, -50.0),    # saves a lot, loses too much accuracy
            row("confidence@0.5", "confidence", 0.31, 0.38, -22.5, -62.0, -40.0),  # beats gc@0.6
            row("entropy@1.0", "entropy", 0.39, 0.70, -2.5, -30.0, -20.0)]
    g = goal_check(rows)
    assert g["met_by"] == ["gc@0.9"]
    by_id = {x["id"]: x for x in g["rows"]}
    assert by_id["gc@0.9"]["dominated_by"] == [] and by_id["gc@0.6"]["dominated_by"] == ["confidence@0.5"]
    assert g["gc_ahead_of_confidence_entropy"] is False
    assert by_id["gc@0.9"]["compute_saving_pct"] == 45.0
    rows[2]["codebleu"] = 0.32
    assert goal_check(rows)["gc_ahead_of_confidence_entropy"] is True
    assert goal_check([rows[0]]) is None


def _em_metrics(pred, ref, language):
    return {"codebleu": float(pred == ref), "exact_match": float(pred.split() == ref.split())}


def test_exact_match_reported_with_its_boilerplate_separated(tmp_path):
    """The matches on licence-header references are counted apart; exact match without them has a CI."""
    header = "# Licensed under the Apache License, Version 2.0"

    def r(i, pred, ref):
        x = rec(i, [1], [3], 1.0, done=1.0, full=1.0)
        x.update(prediction=pred, reference=ref)
        return x

    full = [r(0, header, header), r(1, "a = 1", "a = 1"), r(2, "b", "c"), r(3, "", "  ")]
    fixed = [r(0, header, header), r(1, "a = 2", "a = 1"), r(2, "b", "c"), r(3, "x", "  ")]
    merged = merge_shards([shard({"full": full, "fixed@1": fixed})])
    merged["meta"]["bootstrap_resamples"] = 200
    rows = {x["id"]: x for x in build_rows(merged, fake_metrics, _em_metrics)}
    f, x = rows["full"], rows["fixed@1"]
    assert f["exact_match_boilerplate_share"] == pytest.approx(2 / 3)  # the header and the blank reference
    assert f["exact_match_no_boilerplate"] == pytest.approx(1 / 2) and f["num_samples_no_boilerplate"] == 2
    assert f["boilerplate_reference_share"] == pytest.approx(1 / 2)
    assert x["exact_match_boilerplate_share"] == 1.0 and x["exact_match_no_boilerplate"] == 0.0
    assert x["exact_match_no_boilerplate_diff"] == pytest.approx(-0.5)
    assert x["exact_match_no_boilerplate_ci"] is not None and x["exact_match_no_boilerplate_diff_ci"] is not None
    assert [rec_["boilerplate_reference"] for rec_ in merged["methods"]["full"]["records"]] == [True, False, False,
                                                                                               True]
    out = tmp_path / "eval"
    write_results(merge_shards([shard({"full": full, "fixed@1": fixed})]), out, {}, metrics_fn=fake_metrics,
                  sample_metrics_fn=_em_metrics)
    md = (out / "summary.md").read_text()
    assert "EM w/o boilerplate" in md and "Δ exact match w/o boilerplate" in md
    assert "exact_match_no_boilerplate" in (out / "summary.csv").read_text().splitlines()[0]


def test_every_row_is_scored_on_the_same_samples():
    """A method decoded on fewer samples (an HF row left to the timed samples) makes every row use the
    samples all methods have, with a note; the rows' sample sets are then equal."""
    full = [rec(i, [1, 2], [3, 3], 1.0 if i == 0 else None, done=1.0, full=1.0) for i in range(4)]
    hf = [rec(0, [1, 2], [3, 3], 1.0, done=1.0, full=1.0)]
    merged = merge_shards([shard({"full": full, "full_hf": hf})])
    rows = build_rows(merged, fake_metrics, fake_sample_metrics)
    assert [r["num_samples"] for r in rows] == [1, 1]
    assert rows[0]["sample_set"] == rows[1]["sample_set"]
    assert [x["index"] for x in merged["methods"]["full"]["records"]] == [0]
    assert any("scored on the 1 samples all methods decoded" in n for n in merged["meta"]["notes"])
    # all on the same samples: nothing left out, no note
    merged = merge_shards([shard({"full": full, "fixed@1": [dict(x) for x in full]})])
    rows = build_rows(merged, fake_metrics, fake_sample_metrics)
    assert [r["num_samples"] for r in rows] == [4, 4] and rows[0]["sample_set"] == rows[1]["sample_set"]
    assert not merged["meta"].get("notes")
