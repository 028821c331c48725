"""One base behind every result (greencode.provenance): the weights record and the check over a
results tree, on small synthetic trees (the committed tree is checked by scripts/check_results.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from greencode.provenance import check_results, find_weights, model_identity, weights_of_file, weights_record
from greencode.utils import REPO_ROOT

BASE = "shipped:" + "a" * 64
FT = "stage:1111222233334444"
OTHER_BASE = "shipped:" + "b" * 64
OTHER_FT = "stage:9999888877776666"


def rec(base=BASE, ft=FT, **extra):
    return {"base": base, "finetuned": ft, "dirs": {"base": "assets/default-base", "finetuned": "runs/x/finetuned"},
            **extra}


def put(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def make_tree(root: Path, weights=None) -> Path:
    """results/default (several writers' shapes), a benchmark, figures with their index."""
    w = weights or rec()
    put(root / "results/default/eval/summary.json", {"rows": [], "run_metadata": {"seed": 0, "weights": w,
                                                                                   "config": {"x": 1}}})
    put(root / "results/default/eval/methods/full.json", {"records": [], "run_metadata": {"weights": w}})
    put(root / "results/default/eval/overhead_ab.json", {"records": [], "weights": w})
    put(root / "results/default/rl/analysis.json", {"meta": {"weights": w}})
    put(root / "results/default/finetune/summary.json", {"meta": {"weights": w}})
    (root / "results/default/finetune/train_log.csv").write_text("step,loss\n1,2.0\n")  # covered by its JSON
    put(root / "results/default/ablations/base_recipes.json",
        {"meta": {"weights": rec(ft=None, compared={"plain": OTHER_BASE, "early_exit": BASE})}})
    put(root / "results/benchmark/serve_default.json", {"run": {"weights": w}, "burst_run": {"weights": w}})
    put(root / "results/benchmark/throughput_other.json", {"run_metadata": {}})  # another run's: not covered
    figs = root / "figures/default"
    figs.mkdir(parents=True)
    for name in ("fig1.png", "fig1.pdf", "pareto.png", "pareto.pdf"):
        (figs / name).write_bytes(b"x")
    put(figs / "index.json", {"figures": {"fixed_exits": ["fig1.png", "fig1.pdf"],
                                          "pareto": ["pareto.png", "pareto.pdf"]},
                              "provenance": {"fixed_exits": {"inputs": ["results/default/eval/summary.json"],
                                                             "weights": w},
                                             "pareto": {"inputs": ["results/default/eval/summary.json"],
                                                        "weights": w}}})
    return root


def problems(report) -> dict[str, str]:
    return {f.path: f.problem for f in report.problems}


def test_all_files_naming_the_same_weights_pass(tmp_path):
    report = check_results(make_tree(tmp_path))
    assert report.ok, report.format()
    assert report.reference == (BASE, FT)
    covered = {f.path for f in report.files}
    assert "results/default/eval/summary.json" in covered and "figures/default/pareto.pdf" in covered
    assert "results/benchmark/serve_default.json" in covered
    assert "results/benchmark/throughput_other.json" not in covered
    assert "figures/default/index.json" not in covered  # the figures' record, checked through the images
    assert "OK: all" in report.format()
    # the shipped base given as the expected one: same verdict
    assert check_results(tmp_path, expected_base=BASE).ok


def test_a_file_with_other_weights_fails_and_is_named(tmp_path):
    make_tree(tmp_path)
    put(tmp_path / "results/default/rl/analysis.json", {"meta": {"weights": rec(ft=OTHER_FT)}})
    put(tmp_path / "results/benchmark/compiled_default.json", {"run_metadata": {"weights": rec(base=OTHER_BASE)}})
    report = check_results(tmp_path)
    assert not report.ok
    got = problems(report)
    assert set(got) == {"results/default/rl/analysis.json", "results/benchmark/compiled_default.json"}
    assert OTHER_FT in got["results/default/rl/analysis.json"]
    assert OTHER_BASE in got["results/benchmark/compiled_default.json"]
    text = report.format()
    assert "FAIL: 2 of" in text and "results/default/rl/analysis.json" in text


def test_a_file_without_a_record_fails_and_is_named(tmp_path):
    make_tree(tmp_path)
    put(tmp_path / "results/default/eval/teacher_forced.json", {"methods": {}})
    (tmp_path / "figures/default/stale.png").write_bytes(b"x")  # an image index.json does not list
    report = check_results(tmp_path)
    got = problems(report)
    assert got["results/default/eval/teacher_forced.json"] == "no weights record"
    assert "not listed" in got["figures/default/stale.png"]
    assert len(got) == 2


def test_a_file_naming_several_weights_fails(tmp_path):
    make_tree(tmp_path)
    put(tmp_path / "results/benchmark/serve_load_default.json",
        {"run": {"weights": rec()}, "burst_run": {"weights": rec(base=OTHER_BASE, ft=OTHER_FT)}})
    index = json.loads((tmp_path / "figures/default/index.json").read_text())
    index["provenance"]["pareto"]["weights"] = [rec(), rec(ft=OTHER_FT)]  # drawn from results of two runs
    put(tmp_path / "figures/default/index.json", index)
    got = problems(check_results(tmp_path))
    assert set(got) == {"results/benchmark/serve_load_default.json", "figures/default/pareto.png",
                        "figures/default/pareto.pdf"}
    assert all("several" in p for p in got.values())


def test_archive_is_exempt(tmp_path):
    make_tree(tmp_path)
    put(tmp_path / "results/archive/plain-base/eval/summary.json", {"run_metadata": {"weights": rec(OTHER_BASE)}})
    put(tmp_path / "results/archive/old.json", {"nothing": True})
    put(tmp_path / "results/default/archive/old/summary.json", {"nothing": True})
    report = check_results(tmp_path)
    assert report.ok, report.format()
    assert not any("archive" in f.path for f in report.files)


def test_the_majority_or_the_expected_base_is_the_reference(tmp_path):
    make_tree(tmp_path)
    # the shipped base is another one: every file names the wrong base
    report = check_results(tmp_path, expected_base=OTHER_BASE)
    assert not report.ok and len(report.problems) == len(report.files)
    assert report.reference_from == "expected base"
    # a result of the base alone passes on the reference base; a LITE model trained from another base does not
    put(tmp_path / "results/default/infill/infill.json", {"run": {"weights": rec(ft=None)}})
    put(tmp_path / "results/default/eval/calibrated.json", {"weights": rec(finetuned_from=OTHER_BASE)})
    got = problems(check_results(tmp_path))
    assert list(got) == ["results/default/eval/calibrated.json"] and "trained from base" in got[
        "results/default/eval/calibrated.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not check_results(empty).ok and "no result files" in check_results(empty).format()


def test_find_weights_skips_the_config_and_non_records():
    obj = {"config": {"finetune": {"weights": {"base": "x", "finetuned": None}}},  # a config section, not a record
           "lite": {"weights": [0.1, 0.9]},
           "runs": [{"weights": rec()}, {"weights": rec()}]}
    assert find_weights(obj) == [rec(), rec()]


def test_non_json_results_take_the_record_beside_them(tmp_path):
    d = tmp_path / "eval"
    put(d / "summary.json", {"run_metadata": {"weights": rec()}})
    (d / "summary.md").write_text("# table")
    (d / "other.csv").write_text("a\n1\n")
    assert weights_of_file(d / "summary.md") == [rec()] and weights_of_file(d / "other.csv") == [rec()]


def _finetuned_dir(path: Path, base_fp: str, key: str = "1111222233334444") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    put(path / "greencode_stage.json", {"stage": "finetune", "key": key, "complete": True,
                                        "payload": {"base_fingerprint": base_fp}})
    return path


def _shipped_dir(path: Path, sha: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    put(path / "base_manifest.json", {"weights_sha256": sha})
    return path


def test_weights_record_from_the_directories_loaded(tmp_path):
    base = _shipped_dir(tmp_path / "base", "a" * 64)
    ft = _finetuned_dir(tmp_path / "finetuned", BASE)
    ident = model_identity(ft)
    assert ident["fingerprint"] == FT and ident["trained_from"] == BASE
    # the fine-tuned model alone names the base it was trained from
    assert {k: v for k, v in weights_record(ft).items() if k != "dirs"} == {"base": BASE, "finetuned": FT}
    # with the base loaded beside it (the evaluator's base row)
    r = weights_record(ft, base)
    assert (r["base"], r["finetuned"]) == (BASE, FT) and "finetuned_from" not in r
    # a base that is not the one it was trained from is recorded as such
    other = _shipped_dir(tmp_path / "other", "b" * 64)
    assert weights_record(ft, other)["finetuned_from"] == BASE
    # the identity is taken when loaded: a model object carries it
    class Loaded:
        loaded_from = ident
    assert weights_record(Loaded())["finetuned"] == FT
    # a model built in memory has no directory to name
    class InMemory:
        loaded_from = None
    assert weights_record(InMemory()) is None and weights_record() is None
    # an ablation's other bases are listed, not counted as the result's weights
    r = weights_record(base=base, compared={"plain": other})
    assert r["finetuned"] is None and r["compared"] == {"plain": OTHER_BASE}


def test_from_pretrained_records_the_loaded_directory(tmp_path):
    from conftest import tiny_model

    from greencode.models import EarlyExitModel

    model = tiny_model("llama")
    assert model.loaded_from is None
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.loaded_from["fingerprint"].startswith("dir:") and loaded.loaded_from["trained_from"] is None
    assert weights_record(base=loaded)["base"] == loaded.loaded_from["fingerprint"]
    # a directory with no record of its base, used as the fine-tuned model, names no base (the check fails it)
    assert weights_record(loaded)["base"] is None


def test_check_results_script(tmp_path):
    make_tree(tmp_path)
    script = REPO_ROOT / "scripts" / "check_results.py"
    ok = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--no-expected-base"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: all" in ok.stdout
    put(tmp_path / "results/default/eval/teacher_forced.json", {"methods": {}})
    bad = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--no-expected-base"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "results/default/eval/teacher_forced.json: no weights record" in bad.stdout


def test_the_figure_writer_records_the_inputs_and_their_weights(tmp_path, monkeypatch):
    import greencode.plots as plots
    from greencode.plots import inputs as I

    results = tmp_path / "results" / "default"
    put(results / "eval" / "summary.json", {"format": "greencode-eval-summary/1", "rows": [{"id": "full"}],
                                            "run_metadata": {"weights": rec()}})
    put(results / "rl" / "analysis.json", {"meta": {"weights": rec(ft=OTHER_FT)}})
    (results / "rl" / "episode_rewards.csv").write_text("episode,mean_step_reward\n1,0.5\n")

    def from_summary(results_dir, figures_dir):
        I.load_summary(results_dir)
        out = Path(figures_dir) / "a.png"
        out.write_bytes(b"x")
        return [out]

    def from_rl(results_dir, figures_dir):
        I.load_episode_rewards(results_dir)  # a CSV: the record of the JSON beside it
        out = Path(figures_dir) / "b.png"
        out.write_bytes(b"x")
        return [out]

    monkeypatch.setattr(plots, "FIGURES", {"a": from_summary, "b": from_rl})
    figs = tmp_path / "figures" / "default"
    plots.plot_all(results, figs)
    index = json.loads((figs / "index.json").read_text())
    assert index["provenance"]["a"]["weights"] == rec() and index["provenance"]["b"]["weights"] == rec(ft=OTHER_FT)
    assert index["provenance"]["a"]["inputs"][0].endswith("eval/summary.json")
    assert index["weights"] is None  # the figures were drawn from results of two runs
    put(results / "eval" / "overhead_ab.json", {"weights": rec()})
    got = problems(check_results(tmp_path))
    assert sorted(got) == ["figures/default/b.png", "results/default/rl/analysis.json"]
    assert OTHER_FT in got["figures/default/b.png"]


def test_training_stage_results_name_the_fingerprint_their_model_will_have(tmp_path):
    """A stage's summary is written before its stage record: it names the ``stage:<key>`` fingerprint
    the output directory gets once the record is written, and LITE the base it was trained from."""
    from greencode.training.common import STAGE_FILE, model_dir_fingerprint, stage_weights

    out = tmp_path / "finetuned"
    out.mkdir()
    w = stage_weights("finetune", "abcd", {"base": str(tmp_path / "base"), "base_fingerprint": BASE}, out)
    put(out / STAGE_FILE, {"stage": "finetune", "key": "abcd", "payload": {"base_fingerprint": BASE}})
    assert (w["base"], w["finetuned"]) == (BASE, model_dir_fingerprint(str(out)))
    assert (w["base"], w["finetuned"]) == (weights_record(out)["base"], weights_record(out)["finetuned"])
    p = stage_weights("pretrain", "ef01", {}, tmp_path / "base_model")
    assert (p["base"], p["finetuned"]) == ("stage:ef01", None) and "base_bytes" not in p
    # with the weights saved (as the stages write their summaries), the bytes the loaded directory will name
    (out / "model.safetensors").write_bytes(b"lite weights")
    w = stage_weights("finetune", "abcd", {"base": str(tmp_path / "base"), "base_fingerprint": BASE}, out)
    assert w["finetuned_bytes"] == weights_record(out)["finetuned_bytes"]


def test_a_recorded_hash_is_used_only_while_the_files_are_the_ones_it_names(tmp_path):
    """The stage record's hash spares loading a second pass over the bytes; a rewritten file is hashed again."""
    import hashlib

    from greencode.provenance import weight_files_sha256, weights_bytes_record

    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"abc")
    want = hashlib.sha256(b"model.safetensors\0abc").hexdigest()  # names and bytes, in name order
    rec = weights_bytes_record(d)
    assert rec["sha256"] == want and rec["stamp"][0][:2] == ["model.safetensors", 3]
    assert weight_files_sha256(d, {"sha256": "recorded", "stamp": rec["stamp"]}) == "recorded"
    (d / "model.safetensors").write_bytes(b"abcd")
    assert weight_files_sha256(d, {"sha256": "recorded", "stamp": rec["stamp"]}) == hashlib.sha256(
        b"model.safetensors\0abcd").hexdigest()


def test_a_trained_model_records_its_bytes_and_the_check_compares_them(tmp_path):
    """Two machines training the same config share the stage key (the fingerprint) but not the bytes: results
    recording other bytes on the same fingerprint fail; results written before bytes were recorded pass."""
    ft = _finetuned_dir(tmp_path / "finetuned", BASE)
    assert "finetuned_bytes" not in weights_record(ft)  # no weight files: nothing to hash
    (ft / "model.safetensors").write_bytes(b"weights of machine A")
    a = weights_record(ft)["finetuned_bytes"]
    (ft / "model.safetensors").write_bytes(b"weights of machine B!")
    b = weights_record(ft)["finetuned_bytes"]
    assert a != b and len(a) == 64 and weights_record(ft)["finetuned"] == FT  # same fingerprint, other bytes
    root = make_tree(tmp_path / "tree", rec(finetuned_bytes=a))
    assert check_results(root, expected_base=BASE).ok
    put(root / "results/default/eval/methods/full.json", {"records": [], "run_metadata": {"weights": rec(finetuned_bytes=b)}})
    put(root / "results/default/rl/analysis.json", {"meta": {"weights": rec()}})  # an older file: no bytes recorded
    bad = problems(check_results(root, expected_base=BASE))
    assert list(bad) == ["results/default/eval/methods/full.json"]
    assert "other weight bytes" in bad["results/default/eval/methods/full.json"]
