"""Pretraining + LITE fine-tuning end to end on configs/smoke.yaml (tiny, CPU), the
per-exit report, reuse, resume after a kill, 2-process DDP, and bad input."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from greencode.config import ConfigError, load_config
from greencode.models import EXITS_FILE, EarlyExitModel, lite_weights
from greencode.training import exit_report, finetune, lite_loss, pretrain
from greencode.training import common
from greencode.training.data import pack_split
from greencode.utils import REPO_ROOT, read_json

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")
PY = sys.executable


def smoke_cfg(root: Path, *overrides: str):
    return load_config(SMOKE, [f"run_dir={root / 'run'}", f"results_dir={root / 'results'}", *overrides])


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One smoke run: data -> pretrain -> LITE finetune -> exit report."""
    from greencode.data import prepare_data

    root = tmp_path_factory.mktemp("train_smoke")
    cfg = smoke_cfg(root)
    prepare_data(cfg)
    base = pretrain(cfg)
    ft = finetune(cfg)
    report = exit_report(cfg)
    return {"root": root, "cfg": cfg, "base": base, "ft": ft, "report": report}


def _linked_run(root: Path, src_run: Path, with_base: bool = True) -> None:
    """A fresh run dir sharing the corpus, tokenizer (and base model) of another run."""
    run = root / "run"
    run.mkdir(parents=True)
    for name in ("corpus", "tokenizer") + (("base_model",) if with_base else ()):
        (run / name).symlink_to(src_run / name, target_is_directory=True)


# ----------------------------------------------------------------------------- pretrain
def test_pretrain_writes_a_normal_hf_model_dir(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, cfg = trained["base"], trained["cfg"]
    assert not (base / EXITS_FILE).exists()  # a plain base model; exits come from the config
    hf = AutoModelForCausalLM.from_pretrained(base)
    assert hf.config.num_hidden_layers == cfg.model.num_layers and hf.config.hidden_size == cfg.model.hidden_size
    tok = AutoTokenizer.from_pretrained(base)
    assert len(tok) == hf.config.vocab_size
    for name in ("config.yaml", "run_info.json", "command.txt", common.STAGE_FILE):
        assert (base / name).is_file(), name
    s = read_json(trained["root"] / "results" / "pretrain" / "summary.json")
    assert s["steps"] == cfg.pretrain.max_steps and s["meta"]["seed"] == cfg.seed
    rows = _csv(trained["root"] / "results" / "pretrain" / "train_log.csv")
    train = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert train[-1] < train[0]
    assert any(r["split"] == "eval" for r in rows)
    assert list((base / "trainer" / "tensorboard").rglob("events.out.tfevents*"))


# ----------------------------------------------------------------------------- finetune
def _heldout_lite_loss(cfg, model_dir, weights, exit_layers):
    from greencode.data import load_corpus, load_tokenizer

    m = EarlyExitModel.from_pretrained(model_dir, exit_layers=exit_layers)
    chunks = pack_split(load_corpus(cfg)["validation"], load_tokenizer(cfg), cfg.finetune.seq_len,
                        max_tokens=cfg.finetune.eval_max_tokens, seed=cfg.seed)
    with torch.no_grad():
        total, per_exit = lite_loss(m, chunks[:16]["input_ids"], weights=weights)
    return total.item(), [x.item() for x in per_exit]


def test_finetune_lowers_the_heldout_lite_loss(trained):
    cfg = trained["cfg"]
    w = lite_weights([1, 2], 4)
    before, before_exits = _heldout_lite_loss(cfg, trained["base"], w, [1, 2])
    after, after_exits = _heldout_lite_loss(cfg, trained["ft"], w, [1, 2])
    assert after < before - 0.05, (before, after)
    assert after_exits[0] < before_exits[0]  # the earliest exit learned the most


def test_loss_uses_the_configured_weights(trained):
    cfg, ft = trained["cfg"], trained["ft"]
    want = lite_weights([1, 2], 4, cfg.finetune.weights, cfg.finetune.budgets, cfg.finetune.ratio)
    assert want == pytest.approx([0.7, 0.2, 0.1])  # geometric: first half, second half, final
    s = read_json(trained["root"] / "results" / "finetune" / "summary.json")
    assert s["lite_weights"] == pytest.approx(want)
    # the logged total is the weighted mean of the logged per-exit losses, on every row
    rows = _csv(trained["root"] / "results" / "finetune" / "train_log.csv")
    assert len(rows) >= 4
    for r in rows:
        exits = [float(r[f"loss_exit_{e}"]) for e in (1, 2, 3)]
        assert float(r["loss"]) == pytest.approx(sum(w * x for w, x in zip(want, exits)), abs=2e-4), r
        # and not the uniform mean (the exits' losses differ enough to tell)
    spread = max(abs(float(r["loss_exit_1"]) - float(r["loss_exit_3"])) for r in rows)
    assert spread > 1e-3


def test_finetuned_dir_loads_back_with_its_exits(trained):
    cfg, ft = trained["cfg"], trained["ft"]
    m = EarlyExitModel.from_pretrained(ft)
    assert m.exit_layers == [1, 2] and m.exit_points == [1, 2, 3]
    m2 = EarlyExitModel.from_run_config(cfg, ft)
    assert m2.exit_points == m.exit_points
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(ft)) == m.vocab_size
    rec = common.read_stage(ft)
    assert rec["complete"] and rec["summary"]["steps"] == cfg.finetune.max_steps
    ckpts = sorted(p.name for p in (ft / "trainer").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-12", "checkpoint-6"]
    rows = _csv(ft / "trainer" / "train_log.csv")
    assert {"loss_exit_1", "loss_exit_2", "loss_exit_3"} <= set(rows[0])
    assert any(r["split"] == "eval" and r["loss_exit_1"] for r in rows)


def test_finished_stages_are_reused_and_keys_track_inputs(trained, caplog):
    cfg, ft = trained["cfg"], trained["ft"]
    mtime = (ft / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        assert finetune(cfg) == ft
        assert pretrain(cfg) == trained["base"]
    assert (ft / "model.safetensors").stat().st_mtime_ns == mtime
    assert "reusing" in caplog.text
    from greencode.training.finetuning import base_source, finetune_key
    from greencode.training.pretraining import pretrain_key

    key = finetune_key(cfg, base_source(cfg))[0]
    assert common.is_complete(ft, key)
    changed = smoke_cfg(trained["root"], "finetune.learning_rate=0.0005")
    assert not common.is_complete(ft, finetune_key(changed, base_source(changed))[0])
    # exits do not change the base model; its shape does
    assert pretrain_key(smoke_cfg(trained["root"], "model.exit_layers=[2]"))[0] == pretrain_key(cfg)[0]
    assert pretrain_key(smoke_cfg(trained["root"], "model.hidden_size=32"))[0] != pretrain_key(cfg)[0]


def test_exit_report(trained):
    rep = trained["report"]
    res = trained["root"] / "results" / "finetune"
    assert read_json(res / "exit_report.json")["exit_points"] == [1, 2, 3]
    assert rep["tokens"] > 1000
    for name in ("base", "finetuned"):
        q = rep["models"][name]
        assert [r["layer"] for r in q["per_layer"]] == [0, 1, 2, 3]
        assert [r["layer"] for r in q["per_exit"]] == [1, 2, 3]
        assert q["per_exit"][-1]["agreement_with_final"] == 1.0
        assert q["per_exit"][-1]["accuracy_share_of_final"] == 1.0
        for r in q["per_layer"]:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["ce_loss"] > 0
    # LITE makes the earliest exit agree with the final layer more than before
    assert rep["models"]["finetuned"]["per_exit"][0]["ce_loss"] < rep["models"]["base"]["per_exit"][0]["ce_loss"]
    rows = _csv(res / "exit_report.csv")
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "finetuned"}
    assert "meta" in rep and rep["meta"]["seed"] == trained["cfg"].seed


# ----------------------------------------------------------------------------- bad input
def test_missing_base_model_dir_is_a_clear_error(tmp_path):
    cfg = smoke_cfg(tmp_path, f"model.base={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune(cfg)
    cfg = smoke_cfg(tmp_path)  # embedded default, not pretrained yet
    with pytest.raises(FileNotFoundError, match="pretrain"):
        finetune(cfg)
    with pytest.raises(ConfigError, match="model.base"):
        pretrain(smoke_cfg(tmp_path, "model.base=some/model"))


def test_exit_points_beyond_the_model_depth(trained, tmp_path):
    _linked_run(tmp_path, trained["root"] / "run", with_base=False)
    cfg = smoke_cfg(tmp_path, f"model.base={trained['base']}", "model.exit_layers=[1,5]")
    with pytest.raises(ConfigError, match=r"\[5\].*4-layer"):
        finetune(cfg)
    assert not (tmp_path / "run" / "finetuned").exists()


def test_weights_that_do_not_match_the_exit_points(trained, tmp_path):
    _linked_run(tmp_path, trained["root"] / "run")
    cfg = smoke_cfg(tmp_path, "finetune.weights=[0.5,0.5]")
    with pytest.raises(ConfigError, match="2 values .* exit layers \\[1, 2\\] plus the final layer = 3"):
        finetune(cfg)
    assert not (tmp_path / "run" / "finetuned").exists()


def test_a_rebuilt_tokenizer_is_caught(trained, tmp_path, monkeypatch):
    """A base model trained with another tokenizer than the run's current one (the corpus
    was rebuilt in between) must not be fine-tuned or reported on silently."""
    _linked_run(tmp_path, trained["root"] / "run")
    real = common.data_fingerprint
    monkeypatch.setattr(common, "data_fingerprint", lambda cfg: {**real(cfg), "tokenizer": "f" * 64})
    with pytest.raises(ConfigError, match="scripts/pretrain.py"):
        finetune(smoke_cfg(tmp_path))
    with pytest.raises(ConfigError, match="scripts/finetune.py"):
        exit_report(smoke_cfg(trained["root"]))


# ----------------------------------------------------------------------------- resume
KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from greencode.config import load_config
    from greencode.utils import setup_logging
    from greencode.training import finetuning

    KILL_AT = int(sys.argv[1])

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)

    _init = finetuning.LiteTrainer.__init__
    def init(self, *a, **k):
        _init(self, *a, **k)
        self.add_callback(KillAfterSave())
    finetuning.LiteTrainer.__init__ = init
    setup_logging()
    finetuning.finetune(load_config(sys.argv[2], sys.argv[3:]))
""")


def test_resume_after_kill_continues_from_the_checkpoint(trained, tmp_path):
    _linked_run(tmp_path, trained["root"] / "run")
    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    overrides = [f"run_dir={tmp_path / 'run'}", f"results_dir={tmp_path / 'results'}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([PY, str(driver), "6", SMOKE, *overrides], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed, not finished
    ft = tmp_path / "run" / "finetuned"
    assert (ft / "trainer" / "checkpoint-6").is_dir()
    assert not (ft / "model.safetensors").exists() and common.read_stage(ft) is None

    cfg = smoke_cfg(tmp_path)
    out = finetune(cfg, resume=True)
    state = read_json(out / "trainer" / "checkpoint-12" / "trainer_state.json")
    assert state["global_step"] == 12
    s = common.read_stage(out)["summary"]
    assert s["resumed_from"].endswith("checkpoint-6") and s["steps"] == 12
    rows = [r for r in _csv(out / "trainer" / "train_log.csv") if r["split"] == "train"]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 12
    # the resumed run ends where the uninterrupted one (same config and data) ended
    ref = {int(r["step"]): float(r["loss"]) for r in _csv(trained["ft"] / "trainer" / "train_log.csv")
           if r["split"] == "train"}
    assert float(rows[-1]["loss"]) == pytest.approx(ref[12], rel=1e-3)
    ref_w = EarlyExitModel.from_pretrained(trained["ft"]).hf.state_dict()
    got_w = EarlyExitModel.from_pretrained(out).hf.state_dict()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- 2 processes
DDP_DRIVER = textwrap.dedent("""
    import hashlib, os, sys
    from greencode.config import load_config
    from greencode.utils import setup_logging
    from greencode.training import finetuning

    _train = finetuning.LiteTrainer.train
    def train(self, *a, **k):
        out = _train(self, *a, **k)
        h = hashlib.sha256()
        for name, p in sorted(self.ee.hf.state_dict().items()):
            h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
        with open(os.path.join(sys.argv[1], f"rank{self.args.process_index}.sha"), "w") as f:
            f.write(h.hexdigest())
        return out
    finetuning.LiteTrainer.train = train
    setup_logging()
    finetuning.finetune(load_config(sys.argv[2], sys.argv[3:]))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_model(trained, tmp_path):
    _linked_run(tmp_path, trained["root"] / "run")
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    overrides = [f"run_dir={tmp_path / 'run'}", f"results_dir={tmp_path / 'results'}", "finetune.max_steps=4",
                 "finetune.save_steps=4", "finetune.eval_steps=4", "finetune.logging_steps=2"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(tmp_path), SMOKE, *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # both ranks computed and logged LITE losses
    for rank in (0, 1):
        assert f"rank {rank}/2 train step" in log, log[-4000:]
    # both ranks ended with identical weights (gradients were synchronised)
    shas = [(tmp_path / f"rank{r}.sha").read_text() for r in (0, 1)]
    assert shas[0] == shas[1]
    ft = tmp_path / "run" / "finetuned"
    assert sorted(p.name for p in (ft / "trainer").glob("checkpoint-*")) == ["checkpoint-4"]
    assert len(list(ft.glob("*.safetensors"))) == 1
    s = common.read_stage(ft)["summary"]
    assert s["world_size"] == 2 and s["steps"] == 4
    assert s["tokens_per_step"] == 2 * 4 * 64  # ranks x batch x seq_len
    # the written model is the trained one, not the base model
    import hashlib

    m = EarlyExitModel.from_pretrained(ft)
    h = hashlib.sha256()
    for name, p in sorted(m.hf.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    assert h.hexdigest() == shas[0]


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert c.num_machines == 1 and c.mixed_precision == "bf16"
    kind = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert str(c.distributed_type).endswith(kind)
    if name == "fsdp":
        assert c.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        classes = c.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert set(classes) == {"LlamaDecoderLayer", "OPTDecoderLayer"}
        from transformers.models.llama import modeling_llama
        from transformers.models.opt import modeling_opt

        assert modeling_llama.LlamaDecoderLayer and modeling_opt.OPTDecoderLayer  # the names exist
    if name == "deepspeed_zero3":
        assert c.deepspeed_config["zero_stage"] == 3 and c.deepspeed_config["zero3_save_16bit_model"]
        # batch size / accumulation are left to the Trainer (taken from the run config)
        assert "gradient_accumulation_steps" not in c.deepspeed_config


# ----------------------------------------------------------------------------- scripts
def test_scripts_end_to_end_and_tensorboard(trained, tmp_path):
    _linked_run(tmp_path, trained["root"] / "run", with_base=False)
    overrides = [f"run_dir={tmp_path / 'run'}", f"results_dir={tmp_path / 'results'}", "pretrain.max_steps=4",
                 "pretrain.eval_steps=4", "pretrain.save_steps=4", "pretrain.logging_steps=2", "finetune.max_steps=4",
                 "finetune.eval_steps=2", "finetune.save_steps=4", "finetune.logging_steps=2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for script in ("pretrain.py", "finetune.py"):
        proc = subprocess.run([PY, f"scripts/{script}", "--config", SMOKE, *overrides], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("base model: llama 4 layers" if script == "pretrain.py" else "LITE fine-tuned: exit points [1, 2, 3]") \
            in proc.stdout
    assert "earliest exit" in proc.stderr and "exit layer" in proc.stdout  # the per-exit report table
    res = tmp_path / "results"
    for f in ("pretrain/summary.json", "pretrain/train_log.csv", "finetune/summary.json", "finetune/train_log.csv",
              "finetune/exit_report.json", "finetune/exit_report.csv"):
        assert (res / f).is_file(), f
    # TensorBoard holds the total loss and each exit's loss, for training and evaluation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(next((tmp_path / "run" / "finetuned" / "trainer" / "tensorboard").rglob("events*")).parent))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"train/loss", "train/loss_exit_1", "train/loss_exit_3", "eval/loss", "eval/loss_exit_2"} <= tags, tags
    # a clear one-line error, no traceback, for a missing base model directory
    proc = subprocess.run([PY, "scripts/finetune.py", "--config", SMOKE, *overrides, f"model.base={tmp_path / 'nope'}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- LITE recipe tuning
def test_tune_lite_compares_variants_on_validation(trained):
    root = trained["root"]
    proc = subprocess.run([PY, str(REPO_ROOT / "scripts" / "tune_lite.py"), "--config", SMOKE,
                           f"run_dir={root / 'run'}", f"results_dir={root / 'results'}",
                           "--variant", "finetune.learning_rate=1e-3 finetune.max_steps=4",
                           "--variant", "finetune.learning_rate=1e-5 finetune.max_steps=4 finetune.budgets=[0.4,0.2,0.4]"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = read_json(root / "results" / "tune" / "lite.json")
    assert out["split"] == "validation" and len(out["rows"]) == 2
    fast, slow = out["rows"]
    assert fast["finetune"]["learning_rate"] == 1e-3 and slow["finetune"]["budgets"] == [0.4, 0.2, 0.4]
    # both start from the same base, measured on the same held-out tokens
    assert fast["base_final_accuracy"] == slow["base_final_accuracy"] and fast["tokens"] == slow["tokens"]
    for r in out["rows"]:
        assert r["final_change_points"] == pytest.approx(100 * (r["lite_final_accuracy"] - r["base_final_accuracy"]))
        assert r["keeps_full_model"] == (r["lite_final_accuracy"] >= r["base_final_accuracy"] - 0.01)
    # lr 1e-5 for 4 steps barely moves the model; lr 1e-3 moves its first exit more
    assert abs(slow["first_exit_gain_points"]) < abs(fast["first_exit_gain_points"])
    assert (root / "results" / "tune" / "lite.md").read_text().count("| `finetune.") == 2


def test_source_mode_packing_keeps_the_files_as_written(tmp_path):
    """Train and validation chunks (and the per-exit report's held-out tokens) are the files'
    own text in data.literal_mode=source: no separator is inserted between pieces."""
    from greencode.data import load_corpus, load_tokenizer, prepare_data
    from greencode.data.lexers import universal_newlines
    from greencode.training.data import build_datasets

    cfg = smoke_cfg(tmp_path, "data.literal_mode=source")
    prepare_data(cfg)
    tok = load_tokenizer(cfg)
    train, val = build_datasets(cfg, cfg.finetune, tok)
    dsd = load_corpus(cfg)
    for chunks, split in ((train, "train"), (val, "validation")):
        files = "\n\x00".join("".join(r["code"][1:-1]) for r in dsd[split])
        text = tok.decode(chunks[0]["input_ids"][4:-4].tolist(), skip_special_tokens=True)
        assert universal_newlines(text) in files, split


def test_early_exit_pretraining_and_the_base_ablation(trained, tmp_path):
    """The early-exit recipe trains through the Trainer (per-exit losses logged, layer dropout on),
    and scripts/ablate_base.py puts it beside the plain base on the same held-out tokens."""
    root = tmp_path / "ee"
    _linked_run(root, trained["root"] / "run", with_base=False)
    cfg = smoke_cfg(root, "pretrain.early_exit.enabled=true", "pretrain.early_exit.curriculum=rotational",
                    "pretrain.early_exit.distill=0.5", "pretrain.early_exit.token_fraction=0.5",
                    "pretrain.early_exit.layer_dropout=0.2")
    out = pretrain(cfg)
    summary = common.read_stage(out)["summary"]
    assert summary["recipe"] == "early_exit" and set(summary["eval_loss_per_layer"]) >= {"1", "2"}
    assert summary["eval_loss"] == summary["eval_loss_per_layer"][str(cfg.model.num_layers - 1)]
    rows = _csv(out / "trainer" / "train_log.csv")
    assert any(r.get("loss_exit_1") for r in rows if r["split"] == "train")
    assert common.read_stage(trained["base"])["summary"]["recipe"] == "plain"
    proc = subprocess.run([PY, str(REPO_ROOT / "scripts" / "ablate_base.py"), "--config", SMOKE,
                           f"run_dir={root / 'run'}", f"results_dir={root / 'results'}",
                           "--base", f"plain={trained['base']}", "--base", f"early_exit={out}", "--resamples", "50"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = read_json(root / "results" / "ablations" / "base_recipes.json")
    assert set(rep["models"]) == {"plain", "early_exit"}
    for m in rep["models"].values():
        assert len(m["per_layer"]) == cfg.model.num_layers and m["tokens"] > 0
        lo, hi = m["final_accuracy_ci"]
        assert lo <= m["final_accuracy"] <= hi
        assert m["per_layer"][-1]["agreement_with_final"] == 1.0
    assert rep["models"]["early_exit"]["training_cost"]["recipe"] == "early_exit"
    assert rep["models"]["plain"]["training_cost"]["tokens"] > 0
    (key, d), = rep["final_accuracy_differences"].items()
    assert key == "early_exit - plain" and len(d["per_layer"]) == cfg.model.num_layers
    a, b = rep["models"]["early_exit"]["per_layer"], rep["models"]["plain"]["per_layer"]
    for r in d["per_layer"]:  # each layer's paired difference, with a CI
        assert r["accuracy_diff"] == pytest.approx(a[r["layer"]]["accuracy"] - b[r["layer"]]["accuracy"], abs=1e-5)
        assert r["ci"][0] <= r["ci"][1]
    assert d["per_layer"][-1]["accuracy_diff"] == pytest.approx(d["final_accuracy_diff"], abs=1e-5)
    bad = subprocess.run([PY, str(REPO_ROOT / "scripts" / "ablate_base.py"), "--config", SMOKE,
                          f"run_dir={root / 'run'}", f"results_dir={root / 'results'}", "--base", "x=/nonexistent"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "config.json missing" in bad.stderr and "Traceback" not in bad.stderr


def test_context_ablation_pairs_the_same_targets(trained, tmp_path):
    """scripts/ablate_context.py: the final layer's long- and short-context accuracies equal an independent
    computation from HF's own logits on the same files; a bad window is refused with a clear message."""
    from greencode.data import load_tokenizer
    from greencode.training.context import long_files

    out = tmp_path / "ctx"
    args = ["--window", "48", "--short", "24", "--target-from", "32", "--min-file-tokens", "48", "--max-files", "6",
            "--resamples", "50"]
    proc = subprocess.run([PY, str(REPO_ROOT / "scripts" / "ablate_context.py"), "--config", SMOKE,
                           f"run_dir={trained['root'] / 'run'}", "--model", f"base={trained['base']}",
                           "--out-dir", str(out), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = read_json(out / "context.json")
    cfg = smoke_cfg(trained["root"])
    files = long_files(cfg, load_tokenizer(cfg), min_file_tokens=48, max_files=6)
    assert rep["files"] == len(files) >= 2
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(trained["base"]).eval()
    ids = torch.tensor([f[:48] for f in files])
    with torch.no_grad():
        long_pred = hf(input_ids=ids).logits[:, 31:47].argmax(-1)
        short_pred = hf(input_ids=ids[:, 24:]).logits[:, 7:23].argmax(-1)
    want_long = float((long_pred == ids[:, 32:48]).float().mean())
    want_short = float((short_pred == ids[:, 32:48]).float().mean())
    final = rep["models"]["base"]["final"]
    assert final["accuracy_long"] == pytest.approx(want_long, abs=1e-6)
    assert final["accuracy_short"] == pytest.approx(want_short, abs=1e-6)
    lo, hi = final["difference_ci"]
    assert lo <= final["difference"] <= hi
    assert len(rep["models"]["base"]["per_layer"]) == cfg.model.num_layers
    bad = subprocess.run([PY, str(REPO_ROOT / "scripts" / "ablate_context.py"), "--config", SMOKE,
                          f"run_dir={trained['root'] / 'run'}", "--model", f"base={trained['base']}",
                          "--out-dir", str(out), "--window", "48", "--short", "8", "--target-from", "32",
                          "--min-file-tokens", "48"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "short read" in bad.stderr and "Traceback" not in bad.stderr


def test_exit_loss_means_per_layer_counts_splits_and_processes():
    """The per-exit log means of both trainers: a step may report only some layers (the curriculum's),
    each layer is averaged over the sequences of the steps that reported it, train and eval are kept
    apart, a log record takes the means and starts afresh, and over processes the sums are reduced."""
    from types import SimpleNamespace

    m = common.ExitLossMeans([1, 3, 5], dtype=torch.float64)
    t = torch.tensor
    m.add("train", {1: t(2.0), 5: t(4.0)}, 2.0)
    m.add("train", {3: t(1.0), 5: t(1.0)}, 6.0)  # 5: (4*2 + 1*6) / 8 = 1.75
    m.add("eval", {1: t(9.0), 3: t(8.0), 5: t(7.0)}, 1.0)
    one = SimpleNamespace(args=SimpleNamespace(device="cpu", world_size=1))
    logs = {"loss": 1.0}
    m.pop_into(logs, one)
    assert logs == {"loss": 1.0, "loss_exit_1": 2.0, "loss_exit_3": 1.0, "loss_exit_5": 1.75}
    other = {"learning_rate": 1e-4}
    m.pop_into(other, one)
    assert other == {"learning_rate": 1e-4}  # not a loss record: untouched
    ev = {"eval_loss": 3.0}
    m.pop_into(ev, one)
    assert ev == {"eval_loss": 3.0, "eval_loss_exit_1": 9.0, "eval_loss_exit_3": 8.0, "eval_loss_exit_5": 7.0}
    again = {"loss": 1.0}
    m.pop_into(again, one)
    assert again == {"loss": 1.0}  # nothing since the last log

    # two processes: this one saw layer 1 at 2.0 over 2 sequences, the other at 5.0 over 1 (a fake sum-reduce)
    seen = []

    def reduce(x, reduction):
        seen.append(reduction)
        return x + torch.tensor([[5.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=x.dtype)

    two = SimpleNamespace(args=SimpleNamespace(device="cpu", world_size=2), accelerator=SimpleNamespace(reduce=reduce))
    m.add("train", {1: t(2.0)}, 2.0)
    logs = {"loss": 1.0}
    m.pop_into(logs, two)
    assert seen == ["sum"] and logs == {"loss": 1.0, "loss_exit_1": 3.0}
    idle = {"loss": 1.0}
    m.pop_into(idle, two)  # a rank with nothing to add still joins the collective (no hang)
    assert seen == ["sum", "sum"] and idle == {"loss": 1.0, "loss_exit_1": 5.0}
