"""The whole pipeline end to end on configs/smoke.yaml, then a rerun that skips every stage."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from greencode.eval.grids import PROB_DENSE

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "pretrain", "finetune", "report", "bank", "agent", "calibrate", "evaluate", "figures"]


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
    # what the first run wrote, kept aside: other tests rerun stages with other settings (any order)
    for d in ("results", "figures"):
        shutil.copytree(tmp / d, tmp / "first" / d)
    return tmp, first


def test_every_stage_writes_its_outputs(smoke_run):
    tmp, first = smoke_run
    run, results, figures = tmp / "run", tmp / "first" / "results", tmp / "first" / "figures"
    manifest = json.loads((run / "corpus" / "manifest.json").read_text())
    assert manifest["language"] == "python"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    for d in ("base_model", "finetuned"):
        assert (run / d / "config.json").is_file()
    assert json.loads((run / "finetuned" / "greencode_exits.json").read_text())["exit_layers"] == [1, 2]
    assert (results / "finetune" / "exit_report.json").is_file()
    assert (run / "bank" / "manifest.json").is_file()
    assert (run / "agent" / "policy.pt").is_file() and (run / "agent" / "classifier.pt").is_file()
    bank = json.loads((run / "bank" / "manifest.json").read_text())
    assert bank["bank_config"]["behaviour"] == "random" and bank["first_token_left_out"]
    cal = json.loads((results / "calibration" / "calibration.json").read_text())
    assert cal["split"] == "validation" and set(cal["families"]) == {"fixed", "confidence", "entropy", "saturation",
                                                                     "classifier", "gc"}
    # three fidelity criteria, each calibrated on its own; the samples used are listed
    assert set(cal["criteria"]) == {"sequence", "token", "quality"}
    assert all(set(c["families"]) == set(cal["families"]) for c in cal["criteria"].values())
    assert cal["samples"]["count"] == len(cal["samples"]["ids"]) > 0 and cal["samples"]["offset"] == 0
    forced = json.loads((results / "calibration" / "eval" / "teacher_forced.json").read_text())["methods"]
    assert "gc@0.9" in forced and all(0.0 <= v <= 1.0 for v in forced["gc@0.9"].values())
    # the token criterion on its own, larger slice (calibration.token_num_samples), from one simulated
    # teacher-forced pass per sample; each criterion states the smallest risk it could certify at its n
    tf = json.loads((results / "calibration" / "eval" / "teacher_forced.json").read_text())
    assert cal["token_num_samples"] == 6 and len(forced["fixed@1"]) >= cal["samples"]["count"]
    assert "fixed@1" in tf["simulated"] and tf["oracle_layers_skipped"]
    tok = cal["criteria"]["token"]
    assert tok["samples"] == len(forced["fixed@1"])
    assert tok["certifiable"]["smallest_certifiable_risk"] == pytest.approx(1 - 0.1 ** (1 / tok["samples"]))
    cal_md = (results / "calibration" / "calibration.md").read_text()
    assert "smallest risk Hoeffding-Bentkus can certify" in cal_md
    # one table per criterion, each with one header row
    assert cal_md.count("| controller | ≤ ") == len(cal["criteria"]) and "|---|---|" in cal_md
    ev = results / "eval"
    targets = json.loads((ev / "calibrated.json").read_text())
    assert targets["split"] == "test" and {r["family"] for r in targets["rows"]} == set(cal["families"])
    assert {r["criterion"] for r in targets["rows"]} == {"sequence", "token", "quality"}
    assert (ev / "teacher_forced.json").is_file()
    chosen = [r["method"] for r in targets["rows"] if r["method"]]
    assert chosen and all((ev / "methods" / f"{m}.json").is_file() for m in chosen)
    for f in ("summary.csv", "summary.md", "summary.json"):
        assert (ev / f).is_file(), f
    methods = {p.stem for p in (ev / "methods").glob("*.json")}
    for m in ("base", "full_hf", "full", "fixed@1", "fixed@2", "oracle", "gc@0.5", "gc@0.9", "confidence@0.5",
              "entropy@1.0", "saturation@0.9", "classifier@0.5"):
        assert m in methods, (m, sorted(methods))
    summary = (ev / "summary.json").read_text()
    for field in ("git_commit", "versions", "hardware", "seed"):
        assert f'"{field}"' in summary, field
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert len(pngs) >= 8 and not list(figures.glob("*.pdf")), pngs  # configs/smoke.yaml: figures.formats [png]
    assert all((figures / p).stat().st_size > 5000 for p in pngs)
    timing = json.loads((results / "pipeline_timing.json").read_text())
    assert [s for s in STAGES if timing["stages"][s]["status"] == "ran"] == STAGES


def test_rerun_skips_finished_stages(smoke_run):
    tmp, _ = smoke_run
    second = _run(tmp)
    last = json.loads((tmp / "run" / "pipeline" / "last_run.json").read_text())
    # infill is off in the smoke config (its model reads CodeXGLUE text: tests/test_fim.py runs it)
    assert {s: v["status"] for s, v in last["stages"].items()} == {**{s: "skipped" for s in STAGES},
                                                                    "infill": "disabled"}
    assert "up to date, skipped" in second.stdout
    # a changed eval section reruns evaluate and what depends on it, and nothing upstream (on a copy of the
    # finished run, which the other tests read as the config made it)
    copy = tmp / "changed"
    for d in ("run", "results", "figures"):
        shutil.copytree(tmp / d, copy / d, symlinks=True)
    third = _run(copy, "eval.gc_thresholds=[0.7]", "eval.methods=[full,gc]")
    last = json.loads((copy / "run" / "pipeline" / "last_run.json").read_text())
    ran = [s for s, v in last["stages"].items() if v["status"] == "ran"]
    assert ran == ["evaluate", "figures"], third.stdout


def _script(tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / name), "--config", str(ROOT / "configs" / "smoke.yaml"),
           f"run_dir={tmp / 'run'}", f"results_dir={tmp / 'results'}", f"figures_dir={tmp / 'figures'}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_calibrate_and_ablate_scripts_on_the_finished_run(smoke_run):
    tmp, _ = smoke_run
    cal = _script(tmp, "calibrate.py")
    assert cal.returncode == 0, cal.stderr[-3000:]
    assert "Calibrated thresholds (validation split" in cal.stdout
    refused = _script(tmp, "calibrate.py", "eval.split=test")
    assert refused.returncode == 2 and "validation split only" in refused.stderr and "Traceback" not in refused.stderr
    # a tuning slice of 2 validation samples for the tuning-token table (calibration then starts after them)
    abl = _script(tmp, "ablate_agent.py", "calibration.sample_offset=2", "--tuning-tokens", "40",
                  "--variant", "rl.bank.behaviour=full", "--variant", "rl.train_tokens=12")
    assert abl.returncode == 0, abl.stderr[-3000:]
    table = json.loads((tmp / "results" / "ablations" / "agent.json").read_text())
    assert table["variants"][0]["variant"] == "rl.bank.behaviour=full"
    assert table["variants"][0]["bank_behaviour"] == "full" and table["variants"][0]["bank_early_exit_share"] == 0.0
    # a change of the bank builds its own; a change of what is learnt from it shares the main run's (fewer tokens)
    assert [v["shared_bank"] for v in table["variants"]] == [False, True]
    assert table["variants"][1]["bank_tokens"] < table["main"]["bank_tokens"]
    agents = table["tuning_decision_auc"]["agents"]
    assert set(agents) == {"(main run)", "rl.bank.behaviour=full", "rl.train_tokens=12"}
    assert set(agents["(main run)"]) == {"gc", "classifier"}
    assert agents["(main run)"]["gc"]["auc_mean_minus_main"] is None
    assert "mean_draws" not in agents["rl.train_tokens=12"]["gc"]
    # the tuning bank holds only the tuning slice's files: none of them is a calibration sample's file
    assert table["tuning_decision_auc"]["bank"]["key"]["corpus"]["split"] == "tuning"
    from greencode.config import load_config
    from greencode.data import load_corpus, load_tokenizer, samples_for_config
    from greencode.rl.sources import tuning_records

    over = [f"run_dir={tmp / 'run'}", "calibration.sample_offset=2"]
    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), over)
    tok = load_tokenizer(cfg)
    tuning_paths = {r["path"] for r in tuning_records(cfg, tok, load_corpus(cfg))}
    import dataclasses

    cal = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, split="validation", sample_offset=2,
                                                              num_samples=cfg.calibration.token_num_samples))
    cal_paths = {smp.path for smp in samples_for_config(cal, tok)}
    assert tuning_paths and cal_paths and not tuning_paths & cal_paths
    assert {r["target"] for r in table["main"]["rows"]} == {0.2, 0.5}
    assert not (tmp / "results" / "ablations" / "0" / "eval" / "methods").exists()  # per-sample files pruned
    assert (tmp / "run-ablate" / "0" / "finetuned").is_symlink()


def test_grids_are_chosen_on_the_tuning_slice(smoke_run):
    tmp, _ = smoke_run
    res = _script(tmp, "tune_knobs.py", "calibration.sample_offset=3", "calibration.families=[fixed,confidence,gc]",
                  "--grids")
    assert res.returncode == 0, res.stderr[-3000:]
    g = json.loads((tmp / "results" / "tune" / "grids.json").read_text())
    assert g["samples"] == 3 and g["families"] == ["fixed", "confidence", "gc"]
    conf = g["rows"]["confidence"]
    assert len(conf) == len(PROB_DENSE) == 29 and all(0.0 <= r["token_risk"] <= 1.0 and r["compute"] > 0 for r in conf)
    # a deeper fixed exit costs more, and the deepest is still cheaper than the full model
    fixed = [r["compute"] for r in sorted(g["rows"]["fixed"], key=lambda r: int(r["id"].split("@")[1]))]
    assert all(b > a for a, b in zip(fixed, fixed[1:])) and fixed[-1] < 1.0
    assert g["rows"]["fixed"][0]["risk_minus_fixed_hull"] is not None
    assert set(g["chosen"]) == {"confidence", "gc"}
    # one line per chosen family: its grid, or a comment when no candidate reaches any level
    for fam in ("confidence", "gc"):
        mine = [ln for ln in g["yaml"] if ln.startswith((f"  {fam}_thresholds: [", f"  # {fam}: no candidate"))]
        assert len(mine) == 1, g["yaml"]
    refused = _script(tmp, "tune_knobs.py", "eval.split=test", "--grids")
    assert refused.returncode == 2 and "validation split only" in refused.stderr


def test_the_teacher_forced_pass_on_two_processes_equals_one(smoke_run, tmp_path):
    """The token criterion's pass dealt out to 2 one-thread processes: the same per-sample risks, compute and
    layers skipped, in the same order, as in one process."""
    from greencode.config import load_config
    from greencode.eval.forced import teacher_forced
    from greencode.utils import read_json

    tmp, _ = smoke_run
    out = {}
    for workers in (1, 2):
        cfg = load_config(ROOT / "configs" / "smoke.yaml",
                          [f"run_dir={tmp / 'run'}", f"results_dir={tmp_path / str(workers)}", "eval.split=validation",
                           "eval.num_samples=4", f"eval.workers={workers}", "hardware.num_threads=1"])
        teacher_forced(cfg, tmp_path / str(workers), ["fixed@1", "confidence@0.5", "gc@0.5", "saturation@0.9"],
                       full_tokens={}, oracle=True)
        out[workers] = read_json(tmp_path / str(workers) / "teacher_forced.json")
    one, two = out[1], out[2]
    assert one["num_samples"] == two["num_samples"] == 4 and (one["processes"], two["processes"]) == (1, 2)
    for key in ("methods", "compute", "layers_skipped", "oracle_layers_skipped", "simulated", "loop"):
        assert json.dumps(one[key]) == json.dumps(two[key]), key  # values and order
    assert set(one["methods"]) == {"fixed@1", "confidence@0.5", "gc@0.5", "saturation@0.9"}
    assert list(one["methods"]["fixed@1"]) == [str(i) for i in range(4)]


PLACEHOLDERS = ("<STR_LIT", "<NUM_LIT", "<CHAR_LIT", "<EOL>")


def test_source_mode_pipeline_serves_code_an_editor_can_insert(tmp_path):
    """The default's data mode (literal_mode=source) end to end on the smoke shape: records are
    the files as written, the tokenizer has no CodeXGLUE markers, evaluation samples are real
    text, and the endpoint's engine answers raw code with no placeholder."""
    _run(tmp_path, "data.literal_mode=source", "eval.methods=[full,fixed,gc]", "eval.timing_samples=1", "eval.workers=2",
         "--only", "data", "pretrain", "finetune", "bank", "agent", "evaluate")
    run = tmp_path / "run"
    import datasets

    from greencode.config import load_config
    from greencode.data.lexers import universal_newlines
    from greencode.serve import load_run
    from greencode.serve.engine import Engine

    dsd = datasets.load_from_disk(str(run / "corpus"))
    manifest = json.loads((run / "corpus" / "manifest.json").read_text())
    rec = dsd["train"][0]
    src = Path(manifest["source_path"]) / rec["path"]
    assert "".join(rec["code"][1:-1]) == universal_newlines(src.read_text(encoding="utf-8"))
    vocab = json.loads((run / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any(p in tok for tok in vocab for p in PLACEHOLDERS)
    methods = tmp_path / "results" / "eval" / "methods"
    full = json.loads((methods / "full.json").read_text())["records"]
    assert full and not any(p in r["prediction"] + r["reference"] for r in full for p in PLACEHOLDERS)
    # sample 0 timed here, the rest decoded by 2 accuracy worker processes: every sample once, in order
    summary = json.loads((tmp_path / "results" / "eval" / "summary.json").read_text())
    n = summary["num_samples"]
    assert n >= 3 and summary["run_metadata"]["accuracy_workers"] == 2
    for p in methods.glob("*.json"):
        recs = json.loads(p.read_text())["records"]
        assert [r["index"] for r in recs] == list(range(n)) and [r["timed"] for r in recs] == [True] + [False] * (n - 1)

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={run}", "data.literal_mode=source"])
    loaded = load_run(cfg, run)
    eng = Engine(loaded.model, loaded.tokenizer, loaded.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding,
                 literal_mode="source")
    prompt = "def area(radius):\n    return 3.14 * radius"
    assert eng.prompt_format == "raw" and eng.to_model_text(prompt) == (prompt, None)
    from greencode.decoding import NeverExit, generate

    ids, _ = eng.encode(prompt, max_new_tokens=24)
    out = generate(loaded.model, ids, NeverExit(), 24, tokenizer=loaded.tokenizer)
    assert out.text and not any(p in out.text for p in PLACEHOLDERS)


def test_benchmarks_of_a_trained_run_take_its_own_file(smoke_run, tmp_path):
    from greencode.bench.common import benchmark_path, setup
    from greencode.config import load_config

    tmp, _ = smoke_run
    trained = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={tmp / 'run'}", f"results_dir={tmp_path / 'a'}"])
    out, _, _, note, _, _ = setup(trained, None, benchmark_path(trained), 12, 4, [])
    assert out == tmp_path / "benchmark" / "smoke.json" and note.startswith("fine-tuned model")
    untrained = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={tmp_path / 'none'}",
                                                             f"results_dir={tmp_path / 'a'}"])
    out, _, _, note, _, _ = setup(untrained, None, benchmark_path(untrained), 12, 4, [])
    assert out == tmp_path / "benchmark" / "smoke_random_init.json" and note.startswith("randomly initialised")
    assert setup(untrained, tmp_path / "x.json", benchmark_path(untrained), 12, 4, [])[0] == tmp_path / "x.json"


def test_benchmark_prompts_are_code_once_a_model_is_trained(smoke_run):
    import torch

    from greencode.config import load_config
    from greencode.bench.common import bench_prompts

    tmp, _ = smoke_run
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"run_dir={tmp / 'run'}", f"results_dir={tmp / 'results'}"])
    from greencode.models import EarlyExitModel

    model = EarlyExitModel.from_run_config(cfg, tmp / "run" / "finetuned")
    prompts, note = bench_prompts(cfg, model, 2, 8, torch.Generator().manual_seed(0), lengths=[8, 6])
    assert note.startswith("code") and [len(p) for p in prompts] == [8, 6]
    from greencode.data import load_tokenizer

    text = load_tokenizer(cfg).decode(prompts[0])
    assert text.strip() and all(0 <= t < model.vocab_size for t in prompts[0])
