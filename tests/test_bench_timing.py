"""The benchmarks' one timing harness."""

import json
import os
import subprocess
import sys

import pytest

from greencode.bench.timing import (Deadline, Noise, Stopwatch, best_of, interleaved_rounds, merge_result,
                                    paired_median, percentile, percentiles, quartiles, steady_window, timed,
                                    write_result)


def test_interleaved_rounds_rotate_every_group_and_drop_warmup():
    calls = []
    out = interleaved_rounds([["a", "b", "c"], ["x", "y"]], rounds=2, warmup=1, run=lambda c: calls.append(c) or c)
    # warm-up: every cell once (dropped); round 0: group 0 from offset 0, group 1 from offset 1; round 1: 2 and 3
    assert calls == ["a", "b", "c", "x", "y",  "a", "b", "c", "y", "x",  "c", "a", "b", "y", "x"]
    assert out == {"a": ["a", "a"], "b": ["b", "b"], "c": ["c", "c"], "x": ["x", "x"], "y": ["y", "y"]}
    calls.clear()
    interleaved_rounds([["a"], ["b"]], rounds=0, warmup=3, run=calls.append, warmup_one_group=True)
    assert calls == ["a", "b", "a"]  # a warm-up round runs one group, the next the next


def test_quartiles_paired_median_and_noise():
    assert quartiles([4.0]) == {"median": 4.0, "q1": 4.0, "q3": 4.0, "iqr": 0.0}
    q = quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (q["median"], q["q1"], q["q3"], q["iqr"]) == (3.0, 2.0, 4.0, 2.0)
    assert paired_median([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0  # ratios 2, 3, 1
    assert paired_median([None, 1.0], [1.0, 0.0]) is None  # no usable pair
    with Noise() as n:
        pass
    rec = n.record(extra=1)
    assert rec["wall_s"] >= 0 and rec["extra"] == 1 and "load_average_before" in rec


def test_percentiles_follow_one_quantile_rule():
    import statistics

    xs = [0.3, 1.7, 2.2, 9.1, 4.4, 5.0]
    q = quartiles(xs)
    assert [q["q1"], q["median"], q["q3"]] == pytest.approx(statistics.quantiles(xs, n=4, method="inclusive"))
    p = percentiles([1.0, 2.0, 3.0], scale=1e3)
    assert p == pytest.approx({"p50": 2000.0, "p90": 2800.0, "p99": 2980.0, "mean": 2000.0})
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    assert percentile([], 95) is None and percentile([5.0, 1.0], 50) == 3.0


def test_clocks_stamp_budget_and_repeat():
    watch = Stopwatch()
    a, b = watch.stamp(), watch.stamp()
    assert 0 <= a <= b <= watch.elapsed and watch.stamps == [a, b] and watch.gaps() == [b - a]
    out, seconds = timed("cpu", lambda: 7)
    assert out == 7 and seconds >= 0
    calls = []
    assert best_of("cpu", lambda: calls.append(1), tries=3) >= 0 and len(calls) == 3
    total, seconds = steady_window("cpu", lambda: 2.0, 0.01)
    assert total >= 2.0 and total % 2 == 0 and seconds >= 0.01
    assert not Deadline(60).passed and Deadline(-1).passed and Deadline(60).left <= 60


def test_write_result_records_the_run_and_its_weights(tmp_path):
    from greencode.config import load_config
    from greencode.utils import REPO_ROOT, read_json

    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", [f"run_dir={tmp_path}/runs"])
    weights = {"base": "shipped:abc", "finetuned": None}
    path = write_result(tmp_path / "r.json", {"x": 1}, lambda r: f"x = {r['x']}", cfg=cfg, stage="unit",
                        weights=weights)
    res = read_json(path)
    assert res["x"] == 1 and res["run_metadata"]["stage"] == "unit" and res["run_metadata"]["seed"] == cfg.seed
    assert res["run_metadata"]["weights"] == weights and res["run_metadata"]["config_name"] == "smoke"
    assert (tmp_path / "r.md").read_text() == "x = 1\n"
    # a file several runs fill: one part at a time, the others kept, each part with its own run record
    merged = merge_result(tmp_path / "r.json", cfg=cfg, stage="part", weights=weights, part={"y": 2})
    assert merged["x"] == 1 and merged["part"]["y"] == 2 and merged["part"]["run"]["stage"] == "part"
    assert read_json(path) == merged
    assert write_result(tmp_path / "plain.json", {"z": 3}) and "run_metadata" not in read_json(tmp_path / "plain.json")


def test_benchmarks_read_the_clock_only_through_the_harness():
    """No benchmark times by hand: perf_counter / monotonic / time.time only in bench/timing.py."""
    import re

    from greencode.utils import REPO_ROOT

    files = sorted((REPO_ROOT / "src" / "greencode" / "bench").glob("*.py")) + [
        REPO_ROOT / "scripts" / f"{n}.py" for n in ("benchmark", "bench_serve", "gpu_check", "profile_pretrain_step")]
    clock = re.compile(r"perf_counter|monotonic|time\.time\(|process_time")
    offenders = [f"{f.name}:{i}" for f in files if f.name != "timing.py"
                 for i, line in enumerate(f.read_text().splitlines(), 1) if clock.search(line)]
    assert offenders == []


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_hardware_record_counts_the_cores_the_process_may_use():
    """A job pinned to one core (a sandbox, a scheduler) runs torch on one thread: the record must say so,
    not the machine's core count."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import json; from greencode.utils import hardware_info; print(json.dumps(hardware_info()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    hw = json.loads(out.stdout.strip().splitlines()[-1])
    assert hw["usable_cpus"] == 1 and hw["torch_threads"] == 1
    assert hw["cpu_count"] == os.cpu_count()
