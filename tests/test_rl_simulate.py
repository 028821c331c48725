"""The simulated trajectory bank (greencode.rl.simulate): a teacher-forced pass with the behaviour's
exits simulated layer by layer equals the decoding loop token by token with the same exits and the
same fed tokens; no exits equals HF's forward; the builder writes a loadable bank of the size asked."""

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model
from test_rl_bank import CharTokenizer, tiny_cfg

from greencode.config import ConfigError, config_from_dict
from greencode.decoding import ExitController, FixedExit, generate
from greencode.rl import TrajectoryBank, build_bank
from greencode.rl.simulate import pattern_decider, simulate_exits


class ScriptedExit(ExitController):
    """Exits each decided token at a layer given in advance (None: no exit)."""

    name = "scripted"
    per_row_state = True

    def __init__(self, layers):
        self.layers = list(layers)
        self.reset()

    def reset(self):
        self._t, self._last = -1, float("inf")

    def should_exit(self, layer, hidden, normed, logits):
        if layer <= self._last:  # a new token's first check
            self._t += 1
        self._last = layer
        return self.layers[self._t] == layer


def _ids(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_simulated_states_equal_the_decoding_loop_with_the_same_exits(family):
    model = tiny_model(family, num_layers=6, exit_layers=(1, 2, 4))
    e = len(model.exit_layers)
    lengths, m = [22, 17], [6, 9]
    ids = torch.zeros((2, max(lengths)), dtype=torch.long)
    patterns = torch.full((2, max(lengths)), e, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    for r, n in enumerate(lengths):
        ids[r, :n] = _ids(10 + r, n)
        # every exit point and no exit, at random, on the decided positions
        patterns[r, m[r]:n] = torch.randint(0, e + 1, (n - m[r],), generator=g)
    sim = simulate_exits(model, ids, pattern_decider(patterns), torch.tensor(m), lengths=lengths)
    assert torch.equal(sim.exit_point, torch.where(sim.decided, patterns, torch.full_like(patterns, e)))
    for r, n in enumerate(lengths):
        exits = [model.exit_layers[k] if k < e else None for k in patterns[r, m[r]:n - 1].tolist()]
        # the loop: prompt = the first m ids (prefilled by the full model), then the window's ids fed
        res = generate(model, ids[r, :m[r]][None], ScriptedExit(exits), n - m[r], forced_tokens=[ids[r, m[r]:n].tolist()],
                       observe=True)
        assert res.tokens == ids[r, m[r]:n].tolist()
        want_layers = [model.exit_points[k] for k in patterns[r, m[r]:n - 1].tolist()]
        assert res.exit_layers[1:] == want_layers
        loop_states = torch.stack(res.exit_states)  # [n - m - 1, E, H]: positions m .. n-2
        sim_states = sim.states[r, m[r]:n - 1]
        torch.testing.assert_close(sim_states[:, :e].float(), loop_states, rtol=1e-4, atol=1e-4)
        # every exit point's prediction on those states (the label: the final layer's, past the exit)
        with torch.inference_mode():
            assert torch.equal(model.decode(sim_states).argmax(-1), torch.stack(res.exit_preds))
    # the exits really changed the states (else the comparison proves little)
    plain = simulate_exits(model, ids, None, torch.tensor(m), lengths=lengths)
    assert not torch.allclose(plain.states[:, :, -1], sim.states[:, :, -1], atol=1e-3)


def test_a_controllers_exits_simulated_equal_the_loops():
    """A stateless controller deciding on the states (confidence) takes the same exits in the simulation
    as in the loop fed the same tokens, and the states agree."""
    from greencode.decoding import ConfidenceExit
    from greencode.rl.simulate import controller_decider

    model = tiny_model("llama", num_layers=6, exit_layers=(1, 2, 4))
    ids = _ids(7, 24)[None]
    m = 5
    with torch.inference_mode():
        plain = simulate_exits(model, ids, None, m)
        conf = torch.softmax(model.decode(plain.states[0, m:, :3]).float(), -1).amax(-1)
    # about half the positions exit at the first exit point; the threshold halfway between two confidences,
    # so float rounding (one position vs all at once) cannot flip a decision
    first = conf[:, 0].sort().values
    mid = len(first) // 2
    threshold = float(first[mid - 1] + first[mid]) / 2
    ctrl = ConfidenceExit(threshold)
    sim = simulate_exits(model, ids, controller_decider(model, [ctrl]), m)
    res = generate(model, ids[:, :m], ConfidenceExit(threshold), 24 - m, forced_tokens=[ids[0, m:].tolist()],
                   observe=True)
    assert res.exit_layers[1:] == [model.exit_points[k] for k in sim.exit_point[0, m:23].tolist()]
    assert len(set(res.exit_layers[1:])) > 1
    torch.testing.assert_close(sim.states[0, m:23, :3], torch.stack(res.exit_states), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_no_exits_equals_hf_forward(family):
    model = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    ids = torch.stack([_ids(1, 20), _ids(2, 20)])
    sim = simulate_exits(model, ids, None, 0)
    assert bool((sim.exit_point == len(model.exit_layers)).all())
    with torch.no_grad():
        hs = model.hf.model(input_ids=ids, output_hidden_states=True).hidden_states
    for k, layer in enumerate(model.exit_points[:-1]):
        torch.testing.assert_close(sim.states[:, :, k], hs[layer + 1], rtol=1e-5, atol=1e-5)
    # the last entry of hidden_states is after the final norm; the final state decodes to HF's logits
    with torch.inference_mode():
        logits = model.hf(input_ids=ids).logits
        torch.testing.assert_close(model.decode(sim.states[:, :, -1]), logits, rtol=1e-4, atol=1e-4)
    # a controller that exits everywhere at layer 2: the positions before min_context never exit
    from greencode.rl.simulate import controller_decider

    fixed = simulate_exits(model, ids, controller_decider(model, [FixedExit(2)] * 2), 5)
    assert bool((fixed.exit_point[:, :5] == 2).all()) and bool((fixed.exit_point[:, 5:] == 1).all())


def test_eager_attention_simulates_like_sdpa():
    sdpa = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    eager = tiny_model("llama", num_layers=4, exit_layers=(1, 2), attn_implementation="eager")
    ids = torch.stack([_ids(4, 16)])
    pattern = torch.randint(0, 3, (1, 16), generator=torch.Generator().manual_seed(0))
    a = simulate_exits(sdpa, ids, pattern_decider(pattern), 4)
    b = simulate_exits(eager, ids, pattern_decider(pattern), 4)
    torch.testing.assert_close(a.states, b.states, rtol=1e-4, atol=1e-4)


def _corpus(n=20):
    rng = np.random.default_rng(0)
    words = ["def", "f", "(", ")", ":", "return", "x", "+", "1", "<EOL>", "import", "os"]
    return [{"code": ["<s>"] + list(rng.choice(words, size=int(rng.integers(10, 40)))) + ["</s>"]} for _ in range(n)]


def test_builder_writes_a_loadable_bank_of_the_size_asked(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    cfg = tiny_cfg(tmp_path, source="simulate", decision_tokens=500, min_context_tokens=8, max_context_tokens=64,
                   exit_rate=[0.2, 0.5], batch_size=3)
    path = build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=_corpus())
    bank = TrajectoryBank.load(path, model, observation="normed", mmap=True)
    assert bank.num_tokens == 500 and bank.obs.shape == (500, 2, model.hidden_size)
    assert bank.obs.dtype == np.float16 and bank.behaviour_exit is not None
    m = bank.manifest
    assert m["source"] == "simulate" and m["teacher_forced"] and m["num_tokens"] == 500
    assert m["fingerprint"]["weights_sha256"] == model.fingerprint()["weights_sha256"]
    assert len(m["sequences"]) == bank.num_sequences and bank.heldout.any() and not bank.heldout.all()
    assert {s["behaviour"]["controller"] for s in m["sequences"]} == {"random"}
    assert 0.2 < m["behaviour_early_exit_share"] < 0.9
    # the label is the final layer's prediction; l_opt the first exit point agreeing with it
    assert np.array_equal(bank.l_opt, [next((k for k in range(2) if r[k] == r[2]), 2) for r in bank.preds])
    # reused when nothing changed; a decode bank is rebuilt over it
    assert build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=_corpus()) == path
    # the recorded rows are the simulation's: rebuild the first window and compare
    seq = m["sequences"][0]
    words = _corpus()[seq["record"]]["code"][1:-1]
    text = CharTokenizer()(" ".join(words))["input_ids"]
    ids = torch.tensor([[1] + text[seq["start"]:seq["start"] + 63]])
    first = bank.offsets[1]
    pattern = torch.full(ids.shape, 2)
    pattern[0, 8:8 + first] = torch.from_numpy(bank.behaviour_exit[:first].astype(np.int64))
    sim = simulate_exits(model, ids, pattern_decider(pattern), 8)
    from greencode.decoding import policy_observation

    with torch.inference_mode():
        want = policy_observation(model, sim.states[0, 8:8 + first, :2], "normed")
    torch.testing.assert_close(torch.from_numpy(np.asarray(bank.obs[:first], dtype=np.float32)), want, rtol=2e-3,
                               atol=2e-3)
    assert np.array_equal(bank.tokens[:first], ids[0, 9:9 + first].numpy())
    # a window's exits and states do not depend on the windows batched with it
    one = TrajectoryBank.load(build_bank(tiny_cfg(tmp_path, source="simulate", decision_tokens=500, min_context_tokens=8,
                                                  max_context_tokens=64, exit_rate=[0.2, 0.5], batch_size=1),
                                         model=model, tokenizer=CharTokenizer(), dataset=_corpus(),
                                         path=tmp_path / "one"), model)
    assert np.array_equal(one.behaviour_exit, bank.behaviour_exit) and np.array_equal(one.preds, bank.preds)
    np.testing.assert_allclose(one.obs.astype(np.float32), bank.obs.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_a_split_short_of_the_tokens_asked_gives_the_smaller_bank(tmp_path, caplog):
    """The corpus decides fewer tokens than rl.bank.decision_tokens: the bank holds what it gave (obs.npy shrunk to
    those rows, equal to the same windows' rows of a bank asked for exactly that many), with a warning."""
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    short = tiny_cfg(tmp_path, source="simulate", decision_tokens=5000, min_context_tokens=8, max_context_tokens=64,
                     exit_rate=[0.2, 0.5], batch_size=2)
    with caplog.at_level("WARNING", logger="greencode.rl.simulate"):
        bank = TrajectoryBank.load(build_bank(short, model=model, tokenizer=CharTokenizer(), dataset=_corpus(),
                                              path=tmp_path / "short"), model, mmap=True)
    n = bank.num_tokens
    assert 0 < n < 5000 and bank.obs.shape[0] == n == bank.manifest["num_tokens"] == bank.offsets[-1]
    assert f"gave only {n} of the 5000" in caplog.text
    exact = tiny_cfg(tmp_path, source="simulate", decision_tokens=n, min_context_tokens=8, max_context_tokens=64,
                     exit_rate=[0.2, 0.5], batch_size=2)
    same = TrajectoryBank.load(build_bank(exact, model=model, tokenizer=CharTokenizer(), dataset=_corpus(),
                                          path=tmp_path / "exact"), model, mmap=True)
    assert np.array_equal(np.asarray(bank.obs), np.asarray(same.obs))
    assert np.array_equal(bank.preds, same.preds) and np.array_equal(bank.behaviour_exit, same.behaviour_exit)


def test_a_cut_off_build_resumes_to_the_same_bank(tmp_path, monkeypatch):
    import greencode.rl.simulate as simulate

    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    cfg = tiny_cfg(tmp_path, source="simulate", decision_tokens=300, min_context_tokens=8, max_context_tokens=64,
                   exit_rate=[0.2, 0.5], batch_size=2)
    whole = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=_corpus(),
                                           path=tmp_path / "whole"), model)
    monkeypatch.setattr(simulate, "CHECKPOINT_S", -1.0)  # a checkpoint before every batch
    real, calls = simulate.simulate_exits, []

    def cut_off(*a, **k):  # the third batch never finishes: the build dies as a session's end kills it
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(simulate, "simulate_exits", cut_off)
    path = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=_corpus(), path=path)
    partial = tmp_path / ".resumed.partial"
    assert not path.exists() and (partial / "progress.npz").is_file()
    calls.clear()
    monkeypatch.setattr(simulate, "simulate_exits", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    bank = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=_corpus(), path=path),
                               model)
    assert not partial.exists()
    # the two batches done before the cut are not run again, and the bank is the uninterrupted one
    assert len(calls) == len(whole.manifest["sequences"]) // 2 + len(whole.manifest["sequences"]) % 2 - 2
    for name in ("preds", "tokens", "offsets", "heldout", "behaviour_exit", "l_opt"):
        assert np.array_equal(getattr(bank, name), getattr(whole, name)), name
    assert np.array_equal(bank.obs, whole.obs)
    assert bank.manifest["sequences"] == whole.manifest["sequences"]


def test_a_bank_built_on_two_processes_is_the_one_process_bank(tmp_path, caplog):
    """rl.bank.workers = 2: the batches dealt out to two one-thread processes, assembled in batch order, give
    the one-process bank bit for bit (observations with the low_rank candidate features included), and the
    batch files are gone afterwards."""
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    feats = ["exit_index", "prev_exit", "cand_max_prob", "cand_margin"]

    def cfg(workers):
        return config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                                 "rl": {"observation": "normed", "observation_features": feats,
                                        "candidate_source": "low_rank:4:8",
                                        "bank": {"source": "simulate", "decision_tokens": 400, "min_context_tokens": 8,
                                                 "max_context_tokens": 64, "exit_rate": [0.2, 0.5], "batch_size": 2,
                                                 "heldout_fraction": 0.3, "workers": workers}}})

    one = TrajectoryBank.load(build_bank(cfg(1), model=model, tokenizer=CharTokenizer(), dataset=_corpus(),
                                         path=tmp_path / "one"), model)
    assert one.num_tokens == 400 and len(one.manifest["sequences"]) >= 4
    assert one.manifest["candidates"] == {"source": "low_rank:4:8", "k": 4}

    # two processes, cut off after they finished but before the assembly checkpointed: their batches stay on
    # disk (with the build's key), and the rerun assembles them without running a batch again
    import logging

    import greencode.rl.simulate as simulate

    real = simulate._load_batch

    def cut(*a, **k):
        raise KeyboardInterrupt

    simulate._load_batch = cut
    try:
        with caplog.at_level(logging.INFO, logger="greencode.rl.simulate"), pytest.raises(KeyboardInterrupt):
            build_bank(cfg(2), model=model, tokenizer=CharTokenizer(), dataset=_corpus(), path=tmp_path / "two")
    finally:
        simulate._load_batch = real
    assert any("on 2 processes" in r.getMessage() for r in caplog.records)
    shards = tmp_path / ".two.partial" / "batches"
    n = len(list(shards.glob("*.npz")))
    assert n >= 2 and (shards / "key.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="greencode.rl.simulate"):
        two = TrajectoryBank.load(build_bank(cfg(2), model=model, tokenizer=CharTokenizer(), dataset=_corpus(),
                                             path=tmp_path / "two"), model)
    assert any(f"({n} on disk already)" in r.getMessage() for r in caplog.records)
    assert two.num_tokens == 400
    for name in ("preds", "tokens", "offsets", "heldout", "behaviour_exit", "l_opt"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert np.array_equal(one.obs, two.obs) and one.manifest["sequences"] == two.manifest["sequences"]
    assert not (tmp_path / ".two.partial").exists()


def test_features_and_the_full_behaviour(tmp_path):
    model = tiny_model("opt", num_layers=4, exit_layers=(1, 2))
    cfg = config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                            "rl": {"observation": "normed", "observation_features": ["exit_index", "prev_exit"],
                                   "bank": {"source": "simulate", "behaviour": "full", "decision_tokens": 120,
                                            "min_context_tokens": 4, "max_context_tokens": 32}}})
    bank = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=_corpus()), model)
    assert bank.num_tokens == 120 and bank.obs.shape[2] == model.hidden_size + 3
    assert bool((bank.behaviour_exit == 2).all())
    # exit_index one-hot, then prev_exit / E = 1 (the full model never exits)
    assert np.array_equal(bank.obs[:, :, -3:-1], np.broadcast_to(np.eye(2, dtype=np.float16), (120, 2, 2)))
    assert bool((bank.obs[:, :, -1] == 1).all())


def test_a_wrong_source_errors_clearly():
    with pytest.raises(ConfigError, match=r"rl\.bank\.source='simulated'.*decode, simulate"):
        config_from_dict({"rl": {"bank": {"source": "simulated"}}})
    with pytest.raises(ConfigError, match="decision_tokens"):
        config_from_dict({"rl": {"bank": {"source": "simulate", "decision_tokens": 0}}})
