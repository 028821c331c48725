"""One bank, several agents: the observation-feature view and the training subset of a trajectory bank
(greencode.rl.bank.TrajectoryBank.with_features / training_subset)."""

import numpy as np
import pytest

from greencode.rl.bank import TrajectoryBank, synthetic_bank

E, H = 3, 5
STORED = ["exit_index", "prev_exit", "cand_max_prob", "cand_margin"]
CAND = {"source": "first_full", "k": 4}


def _bank_with_features() -> TrajectoryBank:
    """A bank whose observation is [state H | exit_index E | prev_exit 1 | cand_max_prob 1 | cand_margin 1], each
    column filled with a value that names it, so a view's columns can be read back."""
    base = synthetic_bank(num_sequences=10, tokens_per_sequence=4, n_exit_points=E, hidden_size=H, seed=0)
    n = base.num_tokens
    cols = [np.full((n, E, H), 1.0)]
    cols.append(np.broadcast_to(np.eye(E)[None], (n, E, E)) * 10.0 + 2.0)  # exit_index: 2 off, 12 on
    cols += [np.full((n, E, 1), 3.0), np.full((n, E, 1), 4.0), np.full((n, E, 1), 5.0)]
    obs = np.concatenate(cols, axis=-1)
    manifest = dict(base.manifest, observation_features=STORED, candidates=CAND)
    return TrajectoryBank.from_arrays(obs, base.preds, base.offsets, tokens=base.tokens, heldout=base.heldout,
                                      manifest=manifest)


def test_a_view_keeps_the_state_and_the_asked_features_in_the_asked_order():
    bank = _bank_with_features()
    v = bank.with_features(["cand_margin", "exit_index"], CAND)
    assert v.hidden_size == H + 1 + E and v.state_size == H
    row = v.obs[0, 1].astype(float)
    assert list(row[:H]) == [1.0] * H and row[H] == 5.0 and list(row[H + 1:]) == [2.0, 12.0, 2.0]
    assert v.manifest["observation_features"] == ["cand_margin", "exit_index"]
    assert v.manifest["recorded_features"] == STORED
    hidden_only = bank.with_features([], None)
    assert hidden_only.hidden_size == H and hidden_only.manifest["candidates"] is None
    assert np.array_equal(hidden_only.preds, bank.preds) and bank.with_features(STORED, CAND) is bank


def test_a_view_refuses_what_was_not_recorded():
    bank = _bank_with_features()
    with pytest.raises(ValueError, match="cosine_prev"):
        bank.with_features(["cosine_prev"], None)
    with pytest.raises(ValueError, match="candidate"):
        bank.with_features(["cand_margin"], {"source": "first_full", "k": 8})


def test_training_subset_caps_training_tokens_and_keeps_every_heldout_sequence():
    bank = synthetic_bank(num_sequences=40, tokens_per_sequence=5, n_exit_points=E, hidden_size=H,
                          heldout_fraction=0.25, seed=1)
    sub = bank.training_subset(42, seed=0)
    train_tokens = int(np.diff(sub.offsets)[~sub.heldout].sum())
    assert train_tokens <= 42 and train_tokens == 40  # whole sequences of 5 tokens
    assert sub.heldout.sum() == bank.heldout.sum() == 10
    held = bank.sequences(heldout=True)
    assert np.array_equal(sub.sequences(heldout=True).obs, held.obs)
    assert np.array_equal(sub.sequences(heldout=True).preds, held.preds)
    assert sub.manifest["training_subset"] == {"max_tokens": 42, "seed": 0, "of_tokens": 200}
    # deterministic in the seed, and another seed draws other sequences
    assert np.array_equal(bank.training_subset(42, seed=0).tokens, sub.tokens)
    assert not np.array_equal(bank.training_subset(42, seed=1).obs, sub.obs)
    assert bank.training_subset(None) is bank and bank.training_subset(10_000) is bank


def test_an_agent_trains_on_a_view_of_a_richer_bank_and_records_what_it_saw(tmp_path):
    import dataclasses

    from greencode.paths import RunPaths
    from greencode.rl import load_policy, train_agent
    from greencode.utils import read_json
    from test_rl_e2e import e2e_cfg

    bank = _bank_with_features()
    bank.manifest.update(exit_layers=[1, 2, 3], final_layer=4, observation="normed")
    cfg = e2e_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, observation_features=["exit_index"],
                                                          train_tokens=20))
    path = train_agent(cfg, bank=bank, progress_bar=False, tensorboard=False)
    policy = load_policy(path)
    assert policy.features == ["exit_index"] and policy.hidden_size == H + E and policy.state_size == H
    analysis = read_json(RunPaths.from_config(cfg).results_rl / "analysis.json")
    assert analysis["bank"]["recorded_features"] == STORED
    assert analysis["bank"]["observation_features"] == ["exit_index"]
    assert analysis["bank"]["training_subset"]["max_tokens"] == 20
    assert analysis["bank"]["num_tokens"] == 20 + 4 * int(bank.heldout.sum())


def test_a_bank_records_more_features_than_its_agent_observes(tmp_path):
    import dataclasses

    from conftest import tiny_model
    from greencode.config import ConfigError, config_from_dict
    from greencode.rl import build_bank, train_agent
    from greencode.rl.policy import load_policy
    from test_rl_bank import CharTokenizer, corpus

    raw = {"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
           "hardware": {"device": "cpu"},
           "rl": {"observation_features": ["exit_index"],
                  "bank": {"source": "simulate", "decision_tokens": 60, "min_context_tokens": 4,
                           "max_context_tokens": 32, "heldout_fraction": 0.25,
                           "record_features": ["exit_index", "prev_exit"]},
                  "ppo": {"total_timesteps": 128, "net_arch": [8], "n_steps": 32, "batch_size": 16, "n_epochs": 1,
                          "n_envs": 2, "checkpoint_freq": 64}},
           "eval": {"gc_thresholds": [0.9]}}
    cfg = config_from_dict(raw)
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    path = build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus())
    stored = TrajectoryBank.load(path, model)
    assert stored.manifest["observation_features"] == ["exit_index", "prev_exit"]
    assert stored.hidden_size == model.hidden_size + 2 + 1
    policy = load_policy(train_agent(cfg, bank=path, progress_bar=False, tensorboard=False))
    assert policy.features == ["exit_index"] and policy.hidden_size == model.hidden_size + 2
    # the recorded features must include the agent's
    bad = dict(raw, rl=dict(raw["rl"], bank=dict(raw["rl"]["bank"], record_features=["prev_exit"])))
    with pytest.raises(ConfigError, match="lacks"):
        config_from_dict(bad)
    assert dataclasses.replace(cfg.rl, bank=dataclasses.replace(cfg.rl.bank, record_features=None)).recording() \
        .observation_features == ["exit_index"]
