"""Every row of the evaluation on the same samples, and the weights every result file names: the
evaluator end to end on the smoke config (tiny real models saved in tmp_path)."""

import json

from test_eval_evaluator import make_run, samples_patch  # noqa: F401 - the fixture is used by name

from greencode.eval import evaluate
from greencode.provenance import check_results
from greencode.training.common import model_dir_fingerprint

METHODS = ["base", "full_hf", "full", "fixed", "oracle", "gc", "hf_early_exit"]


def _rows_and_ids(out):
    summary = json.loads((out / "summary.json").read_text())
    ids = {}
    for r in summary["rows"]:
        recs = json.loads((out / "methods" / f"{r['id']}.json").read_text())["records"]
        ids[r["id"]] = [x["id"] for x in recs]
    return summary, ids


def test_every_method_row_reports_the_same_samples(tmp_path, samples_patch):
    # one timed sample: the HF rows used to be decoded on it alone, beside the other rows' three
    cfg, paths, tok = make_run(tmp_path, "eval.timing_samples=1", "eval.bootstrap_resamples=50")
    out = evaluate(cfg, METHODS)
    summary, ids = _rows_and_ids(out)
    rows = summary["rows"]
    assert {r["family"] for r in rows} >= {"base", "full_hf", "full", "fixed", "oracle", "gc", "hf_early_exit"}
    assert {r["num_samples"] for r in rows} == {3} and summary["num_samples"] == 3
    assert len({r["sample_set"] for r in rows}) == 1
    assert all(v == ids["full"] for v in ids.values()) and len(ids["full"]) == 3
    assert all(r["timed_samples"] == 1 for r in rows)  # latency on the same timed sample for every row
    md = (out / "summary.md").read_text()
    assert "EM w/o boilerplate" in md and "Every row is scored on the same 3 samples" in md

    # the weights every file names: the directories the evaluation loaded
    weights = summary["run_metadata"]["weights"]
    assert weights["finetuned"] == model_dir_fingerprint(str(paths.finetuned))
    assert weights["base"] == model_dir_fingerprint(str(paths.base_model))
    report = check_results(tmp_path, "smoke")
    assert report.ok, report.format()
    assert {f.path for f in report.files} >= {"results/smoke/eval/summary.json", "results/smoke/eval/overhead_ab.json",
                                              "results/smoke/eval/methods/full_hf.json"}

    # a config that leaves HF generate's rows to the timed samples: every row is scored on those
    cfg2, _, _ = make_run(tmp_path / "subset", "eval.timing_samples=1", "eval.bootstrap_resamples=0",
                          "eval.accuracy_only_hf=[base]")
    summary2, ids2 = _rows_and_ids(evaluate(cfg2, METHODS))
    assert {r["num_samples"] for r in summary2["rows"]} == {1} and summary2["num_samples_drawn"] == 3
    assert all(v == ids2["full"] for v in ids2.values())
    assert any("all methods decoded" in n for n in summary2["notes"])
