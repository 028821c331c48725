"""Trajectory bank: building on a tiny random model, storage, reuse and mismatch errors."""

import numpy as np
import pytest
import torch

from conftest import VOCAB, tiny_model
from greencode.config import config_from_dict
from greencode.decoding import NeverExit, generate, policy_observation
from greencode.rl import TrajectoryBank, build_bank, bytes_per_token, synthetic_bank
from greencode.rl.build import context_ids


class CharTokenizer:
    """A tiny stand-in tokenizer: one id per character, bos 1, no eos."""

    bos_token_id = 1
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}


def corpus(n=12):
    rng = np.random.default_rng(0)
    words = ["def", "f", "(", ")", ":", "return", "x", "+", "1", "<EOL>", "import", "os"]
    return [{"code": ["<s>"] + list(rng.choice(words, size=int(rng.integers(8, 20)))) + ["</s>"]} for _ in range(n)]


def tiny_cfg(tmp_path, **bank):
    return config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                             "rl": {"observation": bank.pop("observation", "normed"),
                                    "bank": {"num_sequences": 6, "tokens_per_sequence": 5, "heldout_fraction": 0.34,
                                             **bank}}})


def test_build_bank_records_hidden_states_and_predictions(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    cfg = tiny_cfg(tmp_path)
    path = build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus())
    bank = TrajectoryBank.load(path, model)
    assert bank.num_sequences == 6 and bank.num_tokens == 30
    assert bank.obs.dtype == np.float16 and bank.obs.shape == (30, 2, model.hidden_size)
    assert bank.preds.shape == (30, 3) and bank.heldout.sum() == 2
    m = bank.manifest
    assert m["exit_layers"] == [1, 2] and m["final_layer"] == 3 and m["observation"] == "normed"
    assert m["bytes_per_token"] == bytes_per_token(2, 64) and m["fingerprint"]["weights_sha256"]
    # what the decoding emitted is the behaviour's exit point's prediction; the label is the final layer's
    assert np.array_equal(bank.tokens, bank.preds[np.arange(30), bank.behaviour_exit])
    assert np.array_equal(bank.l_opt, [next((k for k in range(2) if row[k] == row[2]), 2) for row in bank.preds])
    # the same contexts as the evaluator builds them (the rows themselves: test_rl_on_distribution.py)
    rng = np.random.default_rng(cfg.seed)
    record = corpus()[int(rng.permutation(12)[0])]
    frac = rng.uniform(0.2, 0.6)
    assert m["context_fractions"][0] == pytest.approx(frac, abs=1e-4)
    words = record["code"][1:-1]
    ids = [1] + CharTokenizer()(" ".join(words[:int(len(words) * frac)]))["input_ids"]  # like the evaluator
    assert len(ids) == m["context_lengths"][0]


def test_bank_is_reused_only_when_everything_matches(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    cfg = tiny_cfg(tmp_path)
    path = build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus())
    stamp = (path / "obs.npy").stat().st_mtime_ns
    build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus())
    assert (path / "obs.npy").stat().st_mtime_ns == stamp  # reused
    raw = tiny_cfg(tmp_path, observation="raw")
    build_bank(raw, model=model, tokenizer=CharTokenizer(), dataset=corpus())
    assert TrajectoryBank.load(path).observation == "raw"  # rebuilt for the other preprocessing
    other = tiny_model("llama", num_layers=4, exit_layers=(0, 2))
    build_bank(raw, model=other, tokenizer=CharTokenizer(), dataset=corpus())
    assert TrajectoryBank.load(path).exit_layers == [0, 2]  # rebuilt for the other exits


def test_max_tokens_caps_the_bank(tmp_path):
    model = tiny_model("opt", num_layers=4, exit_layers=(1, 2))
    cfg = tiny_cfg(tmp_path, max_tokens=12, observation="raw")
    bank = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus()))
    assert bank.num_tokens == 12 and bank.num_sequences == 3


def test_loading_against_another_model_or_exits_fails_clearly(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    path = build_bank(tiny_cfg(tmp_path), model=model, tokenizer=CharTokenizer(), dataset=corpus(6))
    with pytest.raises(ValueError, match="exit points .*rebuild the bank"):
        TrajectoryBank.load(path, tiny_model("llama", num_layers=4, exit_layers=(0, 2)))
    with pytest.raises(ValueError, match="hidden_size 64, but this model has 32"):
        TrajectoryBank.load(path, tiny_model("llama", num_layers=4, exit_layers=(1, 2), hidden_size=32))
    with pytest.raises(ValueError, match="other model weights"):
        TrajectoryBank.load(path, tiny_model("llama", num_layers=4, exit_layers=(1, 2), seed=5))
    with pytest.raises(ValueError, match="'normed' observations but rl.observation='raw'"):
        TrajectoryBank.load(path, observation="raw")
    with pytest.raises(FileNotFoundError, match="build_bank.py"):
        TrajectoryBank.load(tmp_path / "nope")


def test_save_load_roundtrip_and_heldout_split(tmp_path):
    bank = synthetic_bank(num_sequences=10, tokens_per_sequence=4, n_exit_points=3, hidden_size=8,
                          heldout_fraction=0.3)
    bank.save(tmp_path / "b")
    back = TrajectoryBank.load(tmp_path / "b")
    for name in ("obs", "preds", "l_opt", "tokens", "offsets", "heldout"):
        assert np.array_equal(getattr(back, name), getattr(bank, name))
    train, held = back.sequences(heldout=False), back.sequences(heldout=True)
    assert (train.num_sequences, held.num_sequences) == (7, 3) and train.num_tokens + held.num_tokens == 40
    seq = int(np.flatnonzero(bank.heldout)[0])
    assert np.array_equal(held.obs[:4], bank.obs[bank.offsets[seq]:bank.offsets[seq + 1]])
    assert sum(back.l_opt_histogram()["count"]) == 40


def test_inconsistent_arrays_are_rejected():
    bank = synthetic_bank(num_sequences=3, tokens_per_sequence=2, n_exit_points=2, hidden_size=4)
    with pytest.raises(ValueError, match="l_opt does not equal"):
        TrajectoryBank(obs=bank.obs, preds=bank.preds, l_opt=(bank.l_opt + 1) % 3, tokens=bank.tokens,
                       offsets=bank.offsets, heldout=bank.heldout, manifest={})
    with pytest.raises(ValueError, match="offsets"):
        TrajectoryBank(obs=bank.obs, preds=bank.preds, l_opt=bank.l_opt, tokens=bank.tokens,
                       offsets=np.array([0, 2, 2, 6]), heldout=bank.heldout, manifest={})


def test_context_like_the_evaluator_with_left_truncation():
    rec = {"code": ["<s>", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "</s>"]}
    assert context_ids(CharTokenizer(), rec, 0.35, 100) == [1] + CharTokenizer()("a b c")["input_ids"]
    assert context_ids(CharTokenizer(), rec, 0.35, 3) == [1] + CharTokenizer()(" c")["input_ids"]  # bos kept
    assert context_ids(CharTokenizer(), {"code": ["<s>", "x", "</s>"]}, 0.5, 10) is None
