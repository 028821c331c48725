"""The decoding benchmark script on the smoke config (tiny sizes; timings are recorded, never asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from greencode.config import load_config
from greencode.bench.common import benchmark_path, middle_exit_layer, target_noise_lines
from greencode.bench.decoding import format_table, run_benchmark
from greencode.bench.throughput import run_throughput
from greencode.utils import read_json

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



def _met_follows_value(targets: dict) -> bool:
    """Each target's verdict is its value compared with its stated bound (not a constant)."""
    import operator

    ops = {"<=": operator.le, ">=": operator.ge, ">": operator.gt, "<": operator.lt}
    for t in targets.values():
        op, bound = t["target"].split()
        if t["met"] is not ops[op](t["value"], float(bound)):
            return False
    return bool(targets)

def test_benchmark_script_writes_result_for_every_method(tmp_path, monkeypatch, capsys):
    script = load_script("benchmark")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config", str(SMOKE), "--repeats", "1", "--prompts", "2",
                                      "--context-tokens", "12", "--new-tokens", "4", "--warmup", "0",
                                      f"run_dir={tmp_path}/runs/smoke", f"results_dir={tmp_path}/results/smoke"])
    assert script.main() == 0
    # no fine-tuned model in the run: a random one is timed, and its result never takes the run's own file
    path = tmp_path / "results" / "benchmark" / "smoke_random_init.json"
    assert path.is_file() and not (tmp_path / "results" / "benchmark" / "smoke.json").exists()
    res = read_json(path)
    assert set(res["methods"]) == {"hf_generate", "never", "fixed@1", "fixed@2", "confidence@0.5", "policy_check",
                                   "gc@0.5", "gc@0.9"}  # GC deciding at the smoke config's eval.gc_thresholds
    for name, row in res["methods"].items():
        assert row["num_runs"] == 2 and row["s_per_token_median"] > 0 and row["ratio_to_hf"] > 0
        assert row["s_per_token_q1"] <= row["s_per_token_median"] <= row["s_per_token_q3"]
    assert res["methods"]["hf_generate"]["ratio_to_hf_paired_median"] == 1.0
    assert res["methods"]["fixed@1"]["mean_exit_layer"] == 1.0
    # the policy row never exits (decision ignored) but pays for its checks
    assert res["methods"]["policy_check"]["mean_exit_layer"] == 3.0
    assert res["methods"]["policy_check"]["s_per_check_median"] > 0
    assert 1.0 <= res["methods"]["gc@0.5"]["mean_exit_layer"] <= res["methods"]["gc@0.9"]["mean_exit_layer"] <= 3.0
    assert set(res["targets"]) == {"never_vs_hf", "fixed_middle_speedup", "policy_check_share"}
    assert _met_follows_value(res["targets"])
    assert res["targets"]["never_vs_hf"]["value"] == res["methods"]["never"]["ratio_to_hf_paired_median"]
    assert res["targets"]["fixed_middle_speedup"]["value"] == pytest.approx(
        1.0 / res["methods"]["fixed@1"]["ratio_to_hf_paired_median"])
    assert res["targets"]["fixed_middle_speedup"]["layer"] == 1
    meta = res["run_metadata"]
    assert meta["config"]["name"] == "smoke" and meta["git_commit"] is not None and "hardware" in meta
    assert "random" in res["setup"]["model"] and "random MLP" in res["setup"]["policy"]
    out = capsys.readouterr().out
    assert "policy_check" in out and "target fixed_middle_speedup" in out
    # the lossless methods, by wall clock, next to the full loop, HF generate and HF assistant_early_exit
    ll = res["lossless"]
    assert set(ll["methods"]) == {"never", "hf_generate", "gc_lossless@0.5", "gc_lossless@0.9", "layerskip@1:k2",
                                  "layerskip@1:k4", "layerskip@1:k6", "layerskip@1:k8", "hf_early_exit@1"}
    assert ll["best_static"].startswith("layerskip@1:k") and ll["best_gc_lossless"].startswith("gc_lossless@")
    for name, row in ll["methods"].items():
        assert row["num_runs"] == 2 and row["wall_s_median"] > 0 and row["speedup_vs_full"] > 0
        assert row["speedup_vs_hf"] > 0 and row["speedup_vs_best_static"] > 0
        if name.startswith(("gc_lossless", "layerskip")):
            assert 0 <= row["acceptance_rate"] <= 1 and row["mean_draft_length"] > 0
            assert row["decode_speedup_vs_full"] > 0
    assert ll["methods"]["never"]["speedup_vs_full"] == 1.0
    assert ll["methods"]["hf_early_exit@1"]["decode_speedup_vs_full"] is None  # no per-token clock in HF assisted
    assert set(ll["targets"]) == {"lossless_vs_full", "lossless_vs_best_static"}
    assert _met_follows_value(ll["targets"])
    best = ll["targets"]["lossless_vs_full"]["method"]
    assert ll["targets"]["lossless_vs_full"]["value"] == ll["methods"][best]["speedup_vs_full"]
    assert "Lossless (self-speculative)" in out and "target lossless_vs_best_static" in out


def test_benchmark_lossless_flags(tmp_path):
    cfg = load_config(SMOKE, [f"run_dir={tmp_path}/runs", f"results_dir={tmp_path}/results/smoke",
                              "eval.gc_thresholds=[0.7]", "eval.lossless_draft_threshold=0.5"])
    path = run_benchmark(cfg, context_tokens=10, new_tokens=3, num_prompts=1, repeats=1, warmup=0,
                         layerskip_layers="all", layerskip_k=[2], hf_early_exit=False)
    ll = read_json(path)["lossless"]
    assert set(ll["methods"]) == {"never", "hf_generate", "gc_lossless@0.7", "layerskip@1:k2", "layerskip@2:k2"}
    assert ll["draft_threshold"] == 0.5
    path = run_benchmark(cfg, context_tokens=10, new_tokens=3, num_prompts=1, repeats=1, warmup=0, lossless=False)
    assert read_json(path)["lossless"] is None
    with pytest.raises(ValueError, match="out of range"):
        run_benchmark(cfg, context_tokens=10, new_tokens=3, num_prompts=1, repeats=1, warmup=0, layerskip_layers=[3])


def test_throughput_script_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    script = load_script("benchmark")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config", str(SMOKE), "--throughput", "--batch-sizes", "1,2,8",
                                      "--throughput-prompts", "8", "--repeats", "1", "--context-tokens", "12",
                                      "--new-tokens", "3", "--warmup", "0",
                                      f"run_dir={tmp_path}/runs/smoke", f"results_dir={tmp_path}/results/smoke"])
    assert script.main() == 0
    path = tmp_path / "results" / "benchmark" / "throughput_smoke_random_init.json"
    res = read_json(path)
    assert res["format"] == "greencode-throughput/1" and res["setup"]["batch_sizes"] == [1, 2, 8]
    assert len(res["setup"]["prompt_lengths"]) == 8 and all(9 <= n <= 12 for n in res["setup"]["prompt_lengths"])
    assert set(res["methods"]) == {"full", "gc@0.9", "fixed@1", "hf_generate"}  # fixed: the middle exit point
    for method, by_size in res["methods"].items():
        assert set(by_size) == {"1", "2", "8"}
        for b, row in by_size.items():
            assert row["tokens_per_s_median"] > 0 and row["num_runs"] == 1
            assert row["ratio_to_hf"] > 0 and row["ratio_to_full"] > 0 and row["ratio_to_batch_1"] > 0
            assert 0 <= row["rows_equal_to_batch_1"] <= 1
        assert by_size["1"]["ratio_to_batch_1"] == 1.0
        for row in by_size.values():  # decode-phase tokens/s: our loop only, faster than the whole workload's
            if method == "hf_generate":
                assert row["decode_tokens_per_s_median"] is None and row["decode_ratio_to_full"] is None
            else:
                assert row["decode_tokens_per_s_median"] > row["tokens_per_s_median"]
                assert row["decode_ratio_to_full"] > 0
    # layers per token: the full model runs every layer; a fixed exit at layer 1 runs two, every row, every step;
    # a batch runs to its deepest row, never below the rows' mean
    for b in ("1", "2", "8"):
        full, fixed, gc = (res["methods"][m][b] for m in ("full", "fixed@1", "gc@0.9"))
        assert full["layers_per_token_row"] == full["layers_per_step_batch"] == res["setup"]["num_layers"] == 4
        assert fixed["layers_per_token_row"] == fixed["layers_per_step_batch"] == 2
        assert gc["layers_per_token_row"] <= gc["layers_per_step_batch"] <= full["layers_per_step_batch"]
        assert res["methods"]["hf_generate"][b]["layers_per_token_row"] is None
    assert res["methods"]["gc@0.9"]["1"]["layers_per_token_row"] == res["methods"]["gc@0.9"]["1"]["layers_per_step_batch"]
    assert res["targets"]["fixed_vs_full_batch8"]["target"] == ">= 1.3"
    assert res["targets"]["gc_vs_full_batch8"]["target"] == ">= 1.15"
    assert res["targets"]["gc_vs_full_batch8"]["decode_value"] == res["methods"]["gc@0.9"]["8"]["decode_ratio_to_full"]
    # a left-padded ragged batch gives each prompt's batch-1 tokens (greedy), for every method of our loop
    for method in ("full", "gc@0.9", "fixed@1"):
        assert all(res["methods"][method][b]["rows_equal_to_batch_1"] == 1.0 for b in ("2", "8")), method
    assert set(res["targets"]) == {"batch8_vs_batch1", "gc_vs_full_batch8", "fixed_vs_full_batch8"}
    assert _met_follows_value(res["targets"])
    assert res["targets"]["batch8_vs_batch1"]["value"] == res["methods"]["full"]["8"]["ratio_to_batch_1"]
    meta = res["run_metadata"]
    assert meta["config"]["name"] == "smoke" and meta["git_commit"] is not None and "hardware" in meta
    assert meta["seed"] == 1234 and "versions" in meta
    md = (tmp_path / "results" / "benchmark" / "throughput_smoke_random_init.md").read_text()
    assert "| full | 8 |" in md and "| hf_generate | 1 |" in md and "target batch8_vs_batch1" in md
    assert "| gc@0.9 | 2 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="batch sizes"):
        run_throughput(load_config(SMOKE, [f"run_dir={tmp_path}/runs", f"results_dir={tmp_path}/results/smoke"]),
                       batch_sizes="0,2")


def test_compiled_benchmark_smoke(tmp_path, monkeypatch, capsys):
    """scripts/benchmark.py --compiled on the smoke config: eager and compiled rows for every
    method and batch size, the compiled tokens identical to the eager ones, a markdown table."""
    script = load_script("benchmark")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config", str(SMOKE), "--compiled", "--batch-sizes", "1,2",
                                      "--prompts", "2", "--repeats", "1", "--context-tokens", "12", "--new-tokens", "4",
                                      f"run_dir={tmp_path}/runs/smoke", f"results_dir={tmp_path}/results/smoke"])
    assert script.main() == 0
    res = read_json(tmp_path / "results" / "benchmark" / "compiled_smoke_random_init.json")
    assert res["setup"]["mode"] == "default" and res["setup"]["compile"]["active"] is True
    assert res["setup"]["compile"]["fallback"] is None and res["setup"]["compile"]["compiled_calls"] > 0
    assert set(res["methods"]) == {"full", "fixed@1", "gc@0.9"}
    for name, by_size in res["methods"].items():
        assert set(by_size) == {"1", "2"}
        for b, row in by_size.items():
            assert row["eager_s_per_step"]["median"] > 0 and row["compiled_s_per_step"]["median"] > 0
            assert row["speedup"] > 0 and row["compared_chunks"] > 0
            assert row["identical_chunks"] == row["compared_chunks"], (name, b)
        assert by_size["1"]["compiled_vs_hf"] > 0 and "compiled_vs_hf" not in by_size["2"]
    assert res["all_identical"] is True and res["hf_generate_batch1"]["s_per_token"]["median"] > 0
    assert res["run_metadata"]["git_commit"] is not None
    md = (tmp_path / "results" / "benchmark" / "compiled_smoke_random_init.md").read_text()
    assert "| full | 1 |" in md and "| gc@0.9 | 2 |" in md and "equal the eager run's: True" in md
    assert "| fixed@1 | 2 |" in capsys.readouterr().out


def test_benchmark_rejects_bad_sizes(tmp_path):
    cfg = load_config(SMOKE, [f"run_dir={tmp_path}/runs", f"results_dir={tmp_path}/results/smoke"])
    assert benchmark_path(cfg) == tmp_path / "results" / "benchmark" / "smoke.json"
    with pytest.raises(ValueError, match="new_tokens=1 must be an integer >= 2"):
        run_benchmark(cfg, new_tokens=1)
    with pytest.raises(ValueError, match="exceed the model's 512 positions"):
        run_benchmark(cfg, context_tokens=600, new_tokens=8)
    assert not list((tmp_path / "results").rglob("*.json"))


def test_middle_exit_layer():
    assert middle_exit_layer([1, 2, 3, 5], 8) == 3
    assert middle_exit_layer([3, 5, 7, 9, 11, 13, 15, 19, 23, 27], 32) == 15
    assert middle_exit_layer([1, 2], 4) == 1


def test_format_table_mentions_unmet_targets():
    res = {"config_name": "x", "setup": {"family": "llama", "num_layers": 4, "exit_layers": [1], "hidden_size": 8,
                                         "device": "cpu", "dtype": "float32", "torch_threads": 1, "num_prompts": 1,
                                         "repeats": 1, "context_tokens": 4, "new_tokens": 3, "model": "m"},
           "methods": {"hf_generate": {"s_per_token_median": 0.002, "s_per_token_iqr": 0.0,
                                       "ratio_to_hf_paired_median": 1.0, "mean_exit_layer": 3.0,
                                       "controller_time_share": None}},
           "targets": {"never_vs_hf": {"value": 1.2, "target": "<= 1.0", "met": False}},
           "noise": {"load_average_before": None, "load_average_after": None, "max_relative_iqr": 0.1, "wall_s": 1}}
    text = format_table(res)
    assert "never_vs_hf: 1.200 <= 1.0 -> NOT met" in text and "2.000" in text


def test_target_lines_name_each_variant_and_the_noise():
    """The shared verdict lines: a decode-only value and a timer share are named where a target has them."""
    res = {"targets": {"a": {"value": 1.31, "target": ">= 1.3", "met": True, "decode_value": 1.4},
                       "b": {"value": 0.3, "target": "<= 0.05", "met": False, "timer_share": 0.25},
                       "c": {"value": 0.9, "target": ">= 1.15", "met": False}},
           "noise": {"load_average_before": 0.5, "load_average_after": 0.7, "max_relative_iqr": 0.04, "wall_s": 12.25}}
    assert target_noise_lines(res, "- ") == [
        "- target a: 1.310 >= 1.3 -> met (decode only: 1.400)",
        "- target b: 0.300 <= 0.05 -> NOT met (timers: 25.0%)",
        "- target c: 0.900 >= 1.15 -> NOT met",
        "- noise: load average 0.5 -> 0.7, max relative IQR 0.04, wall 12.2 s"]


def test_profile_script_splits_a_batch_by_part(tmp_path, monkeypatch, capsys):
    script = load_script("benchmark")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config", str(SMOKE), "--profile", "--batch-sizes", "2",
                                      "--context-tokens", "12", "--new-tokens", "4",
                                      f"run_dir={tmp_path}/runs/smoke", f"results_dir={tmp_path}/results/smoke"])
    assert script.main() == 0
    res = read_json(tmp_path / "results" / "benchmark" / "profile_batch_smoke_random_init.json")
    assert res["batch"] == 2 and set(res["methods"]) == {"full", "fixed@1", "gc@0.9"}
    full, fixed = res["methods"]["full"], res["methods"]["fixed@1"]
    # 4 new tokens: one from the prefill, then 3 steps; every part inside the decode's time
    assert full["parts"]["step"]["calls"] == 3 and full["parts"]["add"]["calls"] == 1
    for row in res["methods"].values():
        assert all(p["cumulative_s"] <= row["total_s"] + 1e-9 for p in row["parts"].values())
        assert row["top_own"] and row["top_own"][0]["own_s"] >= row["top_own"][-1]["own_s"]
    # the full model never propagates K/V; a fixed exit below the top propagates on every step, exiting at layer 1
    assert "_propagate_rest" not in full["parts"] and fixed["parts"]["_propagate_rest"]["calls"] == 3
    assert full["mean_exit_layer"] == 3 and fixed["mean_exit_layer"] == 1
    assert res["run_metadata"]["seed"] == 1234 and res["weights"] is None  # a random smoke model: no weights named
    assert "| `_propagate_rest` |" in (tmp_path / "results" / "benchmark" / "profile_batch_smoke_random_init.md").read_text()
