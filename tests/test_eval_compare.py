"""Two evaluations of a method compared by sample id (greencode.eval.compare), on hand-made records."""

import json
import subprocess
import sys

import numpy as np
import pytest

from greencode.eval.compare import compare_evaluations
from greencode.utils import REPO_ROOT


def _eval_dir(path, values: dict, method="full"):
    (path / "methods").mkdir(parents=True)
    recs = [{"id": i, "index": k, "metrics": {"edit_similarity": v}} for k, (i, v) in enumerate(values.items())]
    (path / "methods" / f"{method}.json").write_text(json.dumps({"records": recs}))
    return path


def test_paired_by_id_over_common_samples(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(200)]
    base = {i: float(rng.uniform(20, 60)) for i in ids}
    old = _eval_dir(tmp_path / "old", {**base, "only_old": 1.0})
    # the new run: every common sample exactly 3 points better, listed in another order, one sample of its own
    new_vals = {i: base[i] + 3.0 for i in reversed(ids)}
    new = _eval_dir(tmp_path / "new", {**new_vals, "only_new": 99.0})
    r = compare_evaluations(old, new, resamples=200)
    assert r["samples"] == 200 and r["only_old"] == 1 and r["only_new"] == 1
    d = r["difference"]
    assert d["mean"] == pytest.approx(3.0) and d["ci"] == [pytest.approx(3.0), pytest.approx(3.0)]
    assert d["excludes_zero"]
    assert r["old"]["mean"] == pytest.approx(np.mean(list(base.values())))
    assert r["weights"] is None  # neither folder names its weights


def test_the_comparison_names_the_new_runs_weights_and_the_old_base_as_compared(tmp_path):
    old = _eval_dir(tmp_path / "old", {"a": 1.0, "b": 2.0})
    new = _eval_dir(tmp_path / "new", {"a": 2.0, "b": 4.0})
    for d, base, ft in ((old, "shipped:old", "stage:o"), (new, "shipped:new", "stage:n")):
        (d / "summary.json").write_text(json.dumps({"meta": {"weights": {"base": base, "finetuned": ft}}}))
    r = compare_evaluations(old, new, resamples=50)
    assert (r["weights"]["base"], r["weights"]["finetuned"]) == ("shipped:new", "stage:n")
    assert r["weights"]["compared"] == {"old": "shipped:old"}
    from greencode.provenance import find_weights

    assert [w["base"] for w in find_weights(r)] == ["shipped:new"]  # one record: the check sees the new run only


def test_noise_alone_does_not_exclude_zero_and_no_common_sample_is_an_error(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(300)]
    old = _eval_dir(tmp_path / "a", {i: float(rng.normal(40, 10)) for i in ids})
    new = _eval_dir(tmp_path / "b", {i: float(rng.normal(40, 10)) for i in ids})
    r = compare_evaluations(old, new, resamples=500, seed=3)
    assert r["difference"]["ci"][0] < 0 < r["difference"]["ci"][1] and not r["difference"]["excludes_zero"]
    other = _eval_dir(tmp_path / "c", {"x": 1.0})
    with pytest.raises(ValueError, match="share no sample id"):
        compare_evaluations(old, other)


def test_script_writes_both_files(tmp_path):
    old = _eval_dir(tmp_path / "old", {"a": 10.0, "b": 20.0, "c": 30.0})
    new = _eval_dir(tmp_path / "new", {"a": 12.0, "b": 22.0, "c": 32.0})
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "compare_runs.py"), str(old), str(new),
                           "--resamples", "50", "--out", str(tmp_path / "cmp")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cmp.json").read_text())["difference"]["mean"] == pytest.approx(2.0)
    assert "| new − old | **+2.000** |" in (tmp_path / "cmp.md").read_text()
