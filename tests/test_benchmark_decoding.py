"""The decoding benchmark script on the smoke config (tiny sizes; timings are recorded, never asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from greencode.config import load_config
from greencode.eval.benchmark import benchmark_path, format_table, middle_exit_layer, run_benchmark
from greencode.utils import read_json

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_script_writes_result_for_every_method(tmp_path, monkeypatch, capsys):
    script = load_script("benchmark")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config", str(SMOKE), "--repeats", "1", "--prompts", "2",
                                      "--context-tokens", "12", "--new-tokens", "4", "--warmup", "0",
                                      f"run_dir={tmp_path}/runs/smoke", f"results_dir={tmp_path}/results/smoke"])
    assert script.main() == 0
    path = tmp_path / "results" / "benchmark" / "smoke.json"
    assert path.is_file()
    res = read_json(path)
    assert set(res["methods"]) == {"hf_generate", "never", "fixed@1", "fixed@2", "confidence@0.5", "policy_check"}
    for name, row in res["methods"].items():
        assert row["num_runs"] == 2 and row["s_per_token_median"] > 0 and row["ratio_to_hf"] > 0
        assert row["s_per_token_q1"] <= row["s_per_token_median"] <= row["s_per_token_q3"]
    assert res["methods"]["hf_generate"]["ratio_to_hf_paired_median"] == 1.0
    assert res["methods"]["fixed@1"]["mean_exit_layer"] == 1.0
    # the policy row never exits (decision ignored) but pays for its checks
    assert res["methods"]["policy_check"]["mean_exit_layer"] == 3.0
    assert res["methods"]["policy_check"]["s_per_check_median"] > 0
    assert set(res["targets"]) == {"never_vs_hf", "fixed_middle_speedup", "policy_check_share"}
    assert all(isinstance(t["met"], bool) for t in res["targets"].values())
    assert res["targets"]["fixed_middle_speedup"]["layer"] == 1
    meta = res["run_metadata"]
    assert meta["config"]["name"] == "smoke" and meta["git_commit"] is not None and "hardware" in meta
    assert "random" in res["setup"]["model"] and "random MLP" in res["setup"]["policy"]
    out = capsys.readouterr().out
    assert "policy_check" in out and "target fixed_middle_speedup" in out


def test_benchmark_rejects_bad_sizes(tmp_path):
    cfg = load_config(SMOKE, [f"run_dir={tmp_path}/runs", f"results_dir={tmp_path}/results/smoke"])
    assert benchmark_path(cfg) == tmp_path / "results" / "benchmark" / "smoke.json"
    with pytest.raises(ValueError, match="new_tokens=1 must be an integer >= 2"):
        run_benchmark(cfg, new_tokens=1)
    with pytest.raises(ValueError, match="exceed the model's 512 positions"):
        run_benchmark(cfg, context_tokens=600, new_tokens=8)
    assert not (tmp_path / "results" / "benchmark" / "smoke.json").exists()


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
