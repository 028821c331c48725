"""The benchmarks' one timing harness."""

from greencode.eval.timing import Noise, interleaved_rounds, paired_median, quartiles


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
