"""scripts/bench_serve.py's library function end to end on a tiny demo run (real server, real HTTP)."""

import json

from greencode.config import load_config
from greencode.bench.serving import bench_prompts, run_benchmark
from greencode.serve.demo import build_demo_run
from greencode.utils import REPO_ROOT


def test_bench_prompts_are_seeded_editor_prefixes():
    a, b = bench_prompts(5, seed=3), bench_prompts(5, seed=3)
    assert a == b and len(a) == 5 and all(p.strip() and len(p) <= 3000 for p in a)
    assert bench_prompts(5, seed=4) != a
    long = bench_prompts(5, seed=3, max_chars=16000)
    assert all(x.endswith(y) for x, y in zip(long, a)) and max(len(x) for x in long) > 3000


def test_run_benchmark_writes_percentiles_and_overhead(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["hardware.num_threads=1"])
    run = build_demo_run(cfg, tmp_path / "run", p_exit=0.7)
    out = tmp_path / "serve_smoke.json"
    res = run_benchmark(cfg, run, num_requests=2, thresholds=[0.5], max_new_tokens=3, warmup=1, out_path=out,
                        demo=True, prompt_chars=1200)
    saved = json.loads(out.read_text())
    assert saved["settings"].keys() == {"full_model", "threshold_0.5"} == res["settings"].keys()
    full, early = saved["settings"]["full_model"], saved["settings"]["threshold_0.5"]
    assert full["threshold"] == 1.0 and full["requests"] == 2 and full["mean_exit_layer"] == 3.0
    assert early["mean_exit_layer"] == 1.0 and early["layers_skipped_share"] == 0.5  # demo policy: P(exit)=0.7
    for s in (full, early):
        rt = s["round_trip_ms"]
        assert 0 < rt["p50"] <= rt["p90"] <= rt["p99"] and s["generation_ms"]["p50"] > 0
        # round trip minus generation: positive work outside the model, and less than the whole round trip
        assert 0 < s["overhead_ms"]["p50"] < rt["p50"] + 1e-9
    assert saved["demo_run"] is True and saved["run"]["config_name"] == "smoke"
    assert saved["overhead_target_ms"] == 5.0 and saved["http_floor_ms"]["p50"] > 0
    assert saved["prompt_chars"]["max"] == 1200 and 0 < saved["prompt_chars"]["median"] <= 1200


def test_burst_against_deadline_admission(tmp_path):
    """The burst of run_streaming_load on a tiny demo run (real server): every answer JSON, served
    ones complete and within the deadline, refusals 503 with Retry-After; written beside the
    previous burst of the same file."""
    from greencode.bench.serving import run_streaming_load

    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["hardware.num_threads=1", "serve.request_timeout_s=3"])
    run = build_demo_run(cfg, tmp_path / "run", p_exit=0.7)
    out = tmp_path / "serve_load_smoke.json"
    out.write_text(json.dumps({"burst": {"served": 16}, "settings": {"kept": 1}}))
    res = run_streaming_load(cfg, run, burst=30, burst_tokens=8, burst_batch_size=4, burst_only=True,
                             out_path=out, demo=True)
    saved = json.loads(out.read_text())
    b = saved["burst"]
    assert saved["burst_previous"] == {"served": 16} and saved["settings"] == {"kept": 1} and res["burst"] == b
    assert b["requests"] == 30 and b["served"] + b["refused"] == 30 and b["served"] >= 4
    assert b["all_json"] and b["every_503_has_retry_after"] and b["every_served_within_deadline"]
    assert b["every_served_answer_complete"] and b["server_alive_after"] and b["metrics_answered_after"]


def test_memory_soak_records_rss_and_statuses(tmp_path):
    from greencode.bench.serving import run_memory_soak

    # a queue wider than the 4 clients: a client's next request can arrive before the server has let go of the
    # one it just answered (under a loaded machine, smoke's queue_size of 4 then answers 503); admission at the
    # queue's limit is the burst test's subject, not this one's
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["hardware.num_threads=1", "serve.queue_size=8"])
    run = build_demo_run(cfg, tmp_path / "run", p_exit=0.7)
    out = tmp_path / "serve_load_smoke.json"
    res = run_memory_soak(cfg, run, requests=16, concurrency=4, max_new_tokens=3, every=8, out_path=out)
    m = json.loads(out.read_text())["memory_soak"]
    assert m == json.loads(json.dumps(res["memory_soak"]))
    assert m["all_200"] and m["alive_after"], (m["status_counts"], m["alive_after"])
    assert [s["requests"] for s in m["samples"]] == [0, 8, 16] and all(s["rss_mb"] > 0 for s in m["samples"])


def test_lossless_mix_and_chunked_prefill_on_a_demo_run(tmp_path):
    """The two measurements end to end on a tiny demo run (real servers): every lossless answer
    checked against the full model's, the gap ratios recorded per setting."""
    from greencode.bench.serving import run_chunked_prefill, run_lossless_mix

    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["hardware.num_threads=1"])
    run = build_demo_run(cfg, tmp_path / "run", p_exit=0.7)
    mix = run_lossless_mix(cfg, run, lossless_requests=2, lossless_tokens=8, probe_tokens=6, batch=3, batch_tokens=6,
                           repeats=1, out_path=tmp_path / "mix.json", demo=True)
    assert json.loads((tmp_path / "mix.json").read_text())["targets"] == mix["targets"]
    assert mix["targets"]["every_lossless_answer_equals_full_model"] and mix["run_dir"] == "<outside>/run"
    assert len(mix["no_stall"]["tries"]["beside_lossless"]) == 1 and mix["lossless_batching"]["speedup"] > 0
    out = tmp_path / "load.json"
    out.write_text(json.dumps({"burst": {"served": 1}}))
    res = run_chunked_prefill(cfg, run, budgets=(8, 4096), probe_tokens=6, joiners=1, repeats=1, out_path=out)
    saved = json.loads(out.read_text())
    assert saved["burst"] == {"served": 1} and set(saved["chunked_prefill"]["settings"]) == {
        "max_prefill_tokens_8", "max_prefill_tokens_4096"} == set(res["chunked_prefill"]["settings"])
    assert all(s["ratio"] > 0 and s["prompts_joined"] >= 1 for s in saved["chunked_prefill"]["settings"].values())


def test_fim_benchmark_reports_exact_match_without_boilerplate():
    """The editors' FIM benchmark scores exact match with the licence-header lines apart too."""
    from greencode.bench.serving import _exact_match_without_boilerplate

    rows = [{"reference": "# Licensed under the Apache License, Version 2.0", "exact_match": 1.0},
            {"reference": "    return a + b", "exact_match": 1.0},
            {"reference": "x = compute(y)", "exact_match": 0.0}]
    got = _exact_match_without_boilerplate(rows, seed=0)
    assert got["exact_match_boilerplate_share"] == 0.5 and got["num_samples_no_boilerplate"] == 2
    assert got["exact_match_no_boilerplate"]["mean"] == 0.5
