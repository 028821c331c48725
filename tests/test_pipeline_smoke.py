"""The whole pipeline end to end on configs/smoke.yaml, then a rerun that skips every stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "pretrain", "finetune", "report", "bank", "agent", "evaluate", "figures"]


def _run(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
           f"run_dir={tmp / 'run'}", f"results_dir={tmp / 'results'}", f"figures_dir={tmp / 'figures'}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    first = _run(tmp)
    return tmp, first


def test_every_stage_writes_its_outputs(smoke_run):
    tmp, first = smoke_run
    run, results, figures = tmp / "run", tmp / "results", tmp / "figures"
    manifest = json.loads((run / "corpus" / "manifest.json").read_text())
    assert manifest["language"] == "python"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    for d in ("base_model", "finetuned"):
        assert (run / d / "config.json").is_file()
    assert json.loads((run / "finetuned" / "greencode_exits.json").read_text())["exit_layers"] == [1, 2]
    assert (results / "finetune" / "exit_report.json").is_file()
    assert (run / "bank" / "manifest.json").is_file()
    assert (run / "agent" / "policy.pt").is_file()
    ev = results / "eval"
    for f in ("summary.csv", "summary.md", "summary.json"):
        assert (ev / f).is_file(), f
    methods = {p.stem for p in (ev / "methods").glob("*.json")}
    for m in ("base", "full_hf", "full", "fixed@1", "fixed@2", "oracle", "gc@0.5", "gc@0.9", "confidence@0.5",
              "entropy@1.0"):
        assert m in methods, (m, sorted(methods))
    summary = (ev / "summary.json").read_text()
    for field in ("git_commit", "versions", "hardware", "seed"):
        assert f'"{field}"' in summary, field
    pngs = sorted(p.name for p in figures.glob("*.png"))
    pdfs = sorted(p.name for p in figures.glob("*.pdf"))
    assert len(pngs) >= 8 and len(pdfs) == len(pngs), pngs
    assert all((figures / p).stat().st_size > 5000 for p in pngs)
    timing = json.loads((results / "pipeline_timing.json").read_text())
    assert [s for s in STAGES if timing["stages"][s]["status"] == "ran"] == STAGES


def test_rerun_skips_finished_stages(smoke_run):
    tmp, _ = smoke_run
    second = _run(tmp)
    last = json.loads((tmp / "run" / "pipeline" / "last_run.json").read_text())
    assert {s: v["status"] for s, v in last["stages"].items()} == {s: "skipped" for s in STAGES}
    assert "up to date, skipped" in second.stdout
    # a changed eval section reruns evaluate and what depends on it, and nothing upstream
    third = _run(tmp, "eval.gc_thresholds=[0.7]", "eval.methods=[full,gc]")
    last = json.loads((tmp / "run" / "pipeline" / "last_run.json").read_text())
    ran = [s for s, v in last["stages"].items() if v["status"] == "ran"]
    assert ran == ["evaluate", "figures"], third.stdout
