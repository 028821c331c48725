"""End to end on a tiny random Llama: bank -> PPO -> export -> PolicyExit in the decoding loop,
and the scripts/train_agent.py entry point on a prepared run directory."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_model
from greencode.config import config_from_dict, dump_config
from greencode.decoding import NeverExit, generate, policy_observation
from greencode.paths import RunPaths
from greencode.decoding import PolicyExit
from greencode.rl import ExitPolicy, TrajectoryBank, build_bank, load_policy, policy_controller, train_agent
from greencode.utils import REPO_ROOT, read_json
from test_rl_bank import CharTokenizer, corpus


def e2e_cfg(tmp_path):
    return config_from_dict({
        "name": "rl_e2e", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "results" / "rl_e2e"),
        "hardware": {"device": "cpu"},
        "model": {"family": "llama", "hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128, "max_position_embeddings": 256, "exit_layers": [1, 2]},
        "rl": {"bank": {"num_sequences": 8, "tokens_per_sequence": 6, "heldout_fraction": 0.25},
               "ppo": {"total_timesteps": 512, "net_arch": [16, 16], "n_steps": 64, "batch_size": 32,
                       "n_epochs": 2, "learning_rate": 1e-3, "n_envs": 2, "checkpoint_freq": 128}},
        "eval": {"gc_thresholds": [0.9]},
    })


def test_bank_ppo_export_and_decoding(tmp_path):
    cfg = e2e_cfg(tmp_path)
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    bank_path = build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus())
    policy_path = train_agent(cfg, bank=bank_path, progress_bar=False, tensorboard=False)

    paths = RunPaths.from_config(cfg)
    assert policy_path == paths.policy and policy_path.is_file()
    agent = paths.agent
    for f in ("config.yaml", "command.txt", "run_info.json", "ppo_final.zip", "logs/progress.csv"):
        assert (agent / f).is_file(), f
    assert sorted(p.name for p in (agent / "monitor").iterdir()) == ["0.monitor.csv", "1.monitor.csv"]
    assert any((agent / "checkpoints").glob("ppo_*_steps.zip"))
    analysis = read_json(paths.results_rl / "analysis.json")
    hist = analysis["optimal_exit_histogram"]
    assert hist["train"]["layer"] == [1, 2, 3]
    assert sum(hist["train"]["count"]) + sum(hist["heldout"]["count"]) == 48
    acc = analysis["exit_accuracy"]
    assert acc["bank"] == "heldout" and [r["threshold"] for r in acc["thresholds"]] == [0.5, 0.9]
    for r in acc["thresholds"]:
        assert r["share_at_l_opt"] + r["share_early"] + r["share_late"] == pytest.approx(1.0)
    assert acc["oracle"]["share_at_l_opt"] == 1.0
    # issue 30: each learned decision's AUC against the oracle label on the held-out bank, recomputed here from
    # the bank and the saved policy with sklearn (not the code under test)
    from sklearn.metrics import roc_auc_score

    held = TrajectoryBank.load(bank_path).sequences(heldout=True)
    da = analysis["decision_auc"]
    assert da["bank"] == "heldout" and da["target_mean_auc"] == 0.85 and set(da) >= {"gc", "classifier"}
    with torch.no_grad():
        p_exit = torch.softmax(load_policy(policy_path)(torch.from_numpy(held.obs.astype(np.float32))), -1)[..., 1]
    for k in range(held.n_exit_points):
        label = held.preds[:, k] == held.preds[:, -1]
        got = da["gc"]["auc_per_exit"][k]
        if 0 < label.mean() < 1:
            assert got == pytest.approx(roc_auc_score(label, p_exit[:, k].numpy()), abs=1e-6)
            lo, hi = da["gc"]["auc_per_exit_ci"][k]
            assert lo <= got <= hi
        else:
            assert got is None
    assert da["gc"]["auc_mean_minus_classifier"] is None or "ci" in da["gc"]["auc_mean_minus_classifier"]
    with open(agent / "logs" / "progress.csv") as f:  # linear learning-rate decay
        lrs = [float(r["train/learning_rate"]) for r in csv.DictReader(f) if r.get("train/learning_rate")]
    assert len(lrs) >= 2 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[0] <= 1e-3
    with open(paths.results_rl / "episode_rewards.csv") as f:
        rows = list(csv.DictReader(f))
    episodes = []  # SB3's own Monitor files, read here without the code under test
    for mf in sorted((agent / "monitor").iterdir()):
        with open(mf) as f:
            next(f)  # the JSON header line
            episodes += [(float(r["t"]), float(r["r"]), int(r["l"])) for r in csv.DictReader(f)]
    assert len(rows) == len(episodes) > 0  # fewer than 1000 episodes: one row each
    # (episodes of the two envs can end at the same logged time, so compare as multisets)
    got = sorted((round(float(r["mean_step_reward"]), 5), int(float(r["episode_length"]))) for r in rows)
    assert got == sorted((round(ret / length, 5), length) for _, ret, length in episodes)
    assert [float(r["timesteps"]) for r in rows] == sorted(float(r["timesteps"]) for r in rows)
    bench = read_json(tmp_path / "results" / "benchmark" / "rl_env_rl_e2e.json")
    assert bench["env_steps_per_s"] > 0 and bench["ppo_total_timesteps"] >= 512 and bench["meta"]["seed"] == cfg.seed

    # the exported policy loads against the model and plugs into the decoding loop
    policy = load_policy(policy_path, model)
    assert policy.exit_layers == [1, 2] and policy.observation == "normed"
    prompt = [5, 9, 11, 7, 30]
    full = generate(model, prompt, NeverExit(), max_new_tokens=8)
    assert full.exit_layers == [3] * 8
    eager = generate(model, prompt, policy_controller(policy_path, model, threshold=0.0), max_new_tokens=8)
    assert eager.exit_layers == [3] + [1] * 7  # first token from the prefill, then the first exit point
    # at a threshold, each token exits at the first exit point where the policy module itself (not
    # the fused fast path that decoding uses) gives P(exit) >= threshold on the state decoding reached
    for threshold in (0.3, 0.5, 0.7):
        trained = generate(model, prompt, policy_controller(policy_path, model, threshold=threshold),
                           max_new_tokens=8, observe=True)
        expected = []
        with torch.no_grad():
            for states in trained.exit_states:
                p = policy.exit_probability(policy_observation(model, states, "normed"))
                expected.append(next((layer for layer, q in zip([1, 2], p.tolist()) if q >= threshold), 3))
        assert trained.exit_layers[1:] == expected

    # a policy for another model is refused by the controller
    with pytest.raises(ValueError, match="hidden size"):
        policy_controller(policy_path, tiny_model("llama", num_layers=4, exit_layers=(1, 2), hidden_size=32), 0.5)


def test_train_agent_script_on_prepared_run(tmp_path):
    """The script end to end: the fine-tuned model dir and the bank exist; the script reuses
    the bank, trains, exports and prints the summary."""
    cfg = e2e_cfg(tmp_path)
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    paths = RunPaths.from_config(cfg)
    model.save_pretrained(paths.finetuned)
    loaded = __import__("greencode.models", fromlist=["EarlyExitModel"]).EarlyExitModel.from_run_config(
        cfg, paths.finetuned)
    build_bank(cfg, model=loaded, tokenizer=CharTokenizer(), dataset=corpus())
    stamp = (paths.bank / "obs.npy").stat().st_mtime_ns
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train_agent.py"), "--config", str(cfg_file),
                          "--no-progress", "rl.ppo.total_timesteps=256", "rl.ppo.init_policy=classifier"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "starts from the exit classifier" in out.stderr + out.stdout
    assert load_policy(paths.policy).metadata["init_policy"] == "classifier" and paths.classifier.is_file()
    assert "exit accuracy on the heldout bank" in out.stdout and "threshold 0.50" in out.stdout
    assert (paths.bank / "obs.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert paths.policy.is_file()
    assert yaml.safe_load((paths.agent / "config.yaml").read_text())["rl"]["ppo"]["total_timesteps"] == 256
    # bad input (a batch larger than one rollout): one clear line, exit code 2, nothing trained
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train_agent.py"), "--config", str(cfg_file),
                          "--no-progress", "rl.ppo.batch_size=100000"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "rl.ppo.batch_size" in bad.stderr and "Traceback" not in bad.stderr


def test_the_agent_does_not_depend_on_the_thread_count(tmp_path):
    """The same bank and seed give the same agent whether the process runs torch on one thread or two (a
    fresh clone on a 2-core machine against results trained pinned to one core): SB3's orthogonal init
    is a QR decomposition whose last bits depend on the thread count, and PPO amplifies them."""
    import dataclasses

    import torch

    from greencode.rl import load_policy
    from greencode.rl.bank import synthetic_bank

    bank = synthetic_bank(num_sequences=16, tokens_per_sequence=6, n_exit_points=2, hidden_size=96,
                          heldout_fraction=0.25, seed=3)
    bank.manifest.update(exit_layers=[1, 2], final_layer=3, observation="normed")
    weights = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            cfg = e2e_cfg(tmp_path / f"t{threads}")
            cfg = dataclasses.replace(cfg, rl=dataclasses.replace(
                cfg.rl, ppo=dataclasses.replace(cfg.rl.ppo, net_arch=[64, 64], init_policy="random")))
            policy = load_policy(train_agent(cfg, bank=bank, progress_bar=False, tensorboard=False))
            weights.append({k: v.clone() for k, v in policy.state_dict().items()})
    finally:
        torch.set_num_threads(before)
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
