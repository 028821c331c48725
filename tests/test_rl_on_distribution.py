"""The trajectory bank holds the states early-exit decoding reaches, not a full-model pass.

* ``generate(observe=True)`` changes nothing about the decoding (tokens, exits, counters);
* the states it records past a row's exit (the shadow) are the ones a run that continued at
  that token would have seen;
* a bank built with the full model equals HF's own forward pass over the same tokens (an
  independent reference), token 0 left out;
* a bank built by decoding with a policy through the fused fast path holds, row for row, the
  observations that policy saw, with exits happening.
"""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from greencode.config import config_from_dict
from greencode.decoding import ExitController, FixedExit, NeverExit, PolicyExit, RandomExit, generate
from greencode.decoding import policy_observation
from greencode.rl import ExitPolicy, TrajectoryBank, build_bank
from greencode.rl.policy import save_policy
from test_rl_bank import CharTokenizer, corpus

PROMPT = [5, 9, 11, 7, 30, 41]


class ScriptedExit(ExitController):
    """Exits at a scripted layer per decode step (None = run to the top)."""

    name = "scripted"

    def __init__(self, plan):
        self.plan = list(plan)
        self.step = -1
        self.last_layer = None

    def reset(self):
        self.step, self.last_layer = -1, None

    def should_exit(self, layer, hidden, normed, logits):
        if self.last_layer is None or layer <= self.last_layer:  # the first check of a new token
            self.step += 1
        self.last_layer = layer
        return self.plan[self.step] == layer


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kv_strategy", ["propagate", "compute"])
def test_observing_changes_nothing(family, kv_strategy):
    model = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    for ctrl in (RandomExit(0.4, seed=3), FixedExit(1), NeverExit(), [RandomExit(0.3, seed=1), FixedExit(2)]):
        a = generate(model, PROMPT, ctrl, max_new_tokens=8, kv_strategy=kv_strategy)
        b = generate(model, PROMPT, ctrl, max_new_tokens=8, kv_strategy=kv_strategy, observe=True)
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert (x.tokens, x.exit_layers) == (y.tokens, y.exit_layers)
            assert {k: v for k, v in x.counters.items() if "time" not in k} == \
                   {k: v for k, v in y.counters.items() if "time" not in k}
            assert len(y.exit_states) == len(y.tokens) - 1 and y.exit_states[0].shape == (2, model.hidden_size)
            assert len(y.exit_preds) == len(y.tokens) - 1 and y.exit_preds[0].shape == (3,)
    assert any(layer < 3 for layer in a[0].exit_layers[1:])  # exits happened


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shadow_states_are_those_of_a_run_that_continued(family):
    """Step 3 exits at layer 1 in run A; run B is A but continues at step 3. B's controller sees
    layers 2 and 3 at step 3, and A's recorded shadow states there must equal them."""
    model = tiny_model(family, num_layers=6, exit_layers=(1, 2, 3))
    plan_a = [1, 2, 3, 1, 2, None, 1]
    plan_b = [1, 2, 3, None, 2, None, 1]
    a = generate(model, PROMPT, ScriptedExit(plan_a), max_new_tokens=8, observe=True)
    b = generate(model, PROMPT, ScriptedExit(plan_b), max_new_tokens=8, observe=True)
    assert a.exit_layers[1:] == [1, 2, 3, 1, 2, 5, 1] and b.exit_layers[4] == 5
    assert a.tokens[:4] == b.tokens[:4]  # same history up to step 3
    for k in range(4):  # steps 0..3 (tokens 1..4): identical states, including step 3's shadow
        torch.testing.assert_close(a.exit_states[k], b.exit_states[k])
        assert torch.equal(a.exit_preds[k], b.exit_preds[k])
    # afterwards layer 3 attends to step 3's K/V, propagated from layer 1 in A and computed in B:
    # the states differ (so the equality above is not vacuous), when the same token was emitted
    if a.tokens[4] == b.tokens[4]:
        torch.testing.assert_close(a.exit_states[4][:2], b.exit_states[4][:2])  # layers 1, 2: same K/V
        assert not torch.allclose(a.exit_states[4][2], b.exit_states[4][2], atol=1e-5)


def _cfg(tmp_path, **bank):
    return config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                             "rl": {"observation": bank.pop("observation", "normed"),
                                    "bank": {"num_sequences": 6, "tokens_per_sequence": 5, "heldout_fraction": 0.34,
                                             **bank}}})


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_full_behaviour_bank_equals_hf_forward(tmp_path, family):
    """behaviour=full: rows equal HF's own forward pass (output_hidden_states) over prompt +
    generated tokens; token 0 (from the prefill) is left out."""
    model = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    cfg = _cfg(tmp_path, behaviour="full", batch_size=4)
    bank = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus()), model)
    assert bank.num_tokens == 30 and (bank.behaviour_exit == 2).all()  # 2 = the final layer's exit point
    assert bank.manifest["first_token_left_out"] and bank.manifest["behaviour_early_exit_share"] == 0.0
    rng = np.random.default_rng(cfg.seed)
    record = corpus()[int(rng.permutation(12)[0])]
    frac = rng.uniform(0.2, 0.6)
    words = record["code"][1:-1]
    ids = [1] + CharTokenizer()(" ".join(words[:int(len(words) * frac)]))["input_ids"]
    res = generate(model, ids, NeverExit(), max_new_tokens=6)
    assert bank.tokens[:5].tolist() == res.tokens[1:]
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([ids + res.tokens[:-1]]), output_hidden_states=True)
    pos = slice(len(ids), len(ids) + 5)  # the positions that chose tokens 1..5
    for k, layer in enumerate([1, 2]):
        with torch.no_grad():  # HF's own final norm module, not the code under test
            ref = model.final_norm(out.hidden_states[layer + 1][0, pos])
        np.testing.assert_allclose(bank.obs[:5, k].astype(np.float32), ref.numpy(), rtol=1e-2, atol=1e-2)
    assert bank.preds[:5, -1].tolist() == out.logits[0, pos].argmax(-1).tolist() == res.tokens[1:]


def _policy_file(tmp_path, model) -> tuple:
    """A random policy with a sharp P(exit) (large action weights), so states decide."""
    torch.manual_seed(0)
    policy = ExitPolicy(model.hidden_size, [16], metadata={"observation": "normed", "exit_layers": [1, 2],
                                                           "fingerprint": model.fingerprint()})
    with torch.no_grad():
        policy.action_net.weight.mul_(30.0)
    path = tmp_path / "policy.pt"
    save_policy(policy, path)
    return policy, path


def test_random_behaviour_bank_exits_and_records_propagated_states(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    bank = TrajectoryBank.load(build_bank(_cfg(tmp_path, behaviour="random", exit_rate=[0.3, 0.9]), model=model,
                                          tokenizer=CharTokenizer(), dataset=corpus()), model)
    assert 0.2 < bank.manifest["behaviour_early_exit_share"] < 1.0
    assert [b["controller"] for b in bank.manifest["behaviour"]] == ["random"] * 6
    # the emitted token is the behaviour's exit point's prediction
    assert np.array_equal(bank.tokens, bank.preds[np.arange(bank.num_tokens), bank.behaviour_exit])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_policy_bank_rows_equal_what_the_fast_path_saw(tmp_path, batch_size):
    """Decode with an exported policy through PolicyExit's fused fast path (exits happening) and
    record the hidden states it was given; the bank built with behaviour=policy holds the same
    observations, tokens and exits for the same sequences."""
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    policy, path = _policy_file(tmp_path, model)
    # a threshold at the median P(exit) at the first exit point, so that the policy exits and continues
    cfg = _cfg(tmp_path, behaviour="policy", policy_path=str(path), policy_thresholds=[0.5], batch_size=batch_size,
               num_sequences=4)
    probe = TrajectoryBank.load(build_bank(_cfg(tmp_path, behaviour="full", num_sequences=4), model=model,
                                           tokenizer=CharTokenizer(), dataset=corpus(), path=tmp_path / "probe"))
    with torch.no_grad():
        p = policy.exit_probability(torch.from_numpy(probe.obs[:, 0].astype(np.float32)))
    threshold = float(p.median())
    cfg.rl.bank.policy_thresholds = [threshold]
    bank = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus()), model)
    early = bank.behaviour_exit < 2
    assert early.any() and (~early).any(), bank.behaviour_exit  # exits happen, and not always

    seen = []
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(12)
    for s in range(bank.num_sequences):
        frac = rng.uniform(0.2, 0.6)
        words = corpus()[int(order[s])]["code"][1:-1]
        ids = [1] + CharTokenizer()(" ".join(words[:int(len(words) * frac)]))["input_ids"]
        ctrl = PolicyExit(policy, threshold)
        calls = []
        ctrl.check_layers(model)  # fuses; the fast path is what decides
        assert ctrl._fast is not None
        fast, host = ctrl._fast_probability, ctrl._host_probability
        assert ctrl._host is not None  # one row on a CPU: the host path decides

        def spy(hidden, feats=None, _fast=fast, _calls=calls):
            _calls.append(hidden[0, -1].clone())
            return _fast(hidden, feats)

        def host_spy(x, feats, _host=host, _calls=calls):
            _calls.append(torch.from_numpy(x.copy()))
            return _host(x, feats)

        ctrl._fast_probability, ctrl._host_probability = spy, host_spy
        out = generate(model, ids, ctrl, max_new_tokens=6)
        rows = slice(int(bank.offsets[s]), int(bank.offsets[s + 1]))
        assert bank.tokens[rows].tolist() == out.tokens[1:]
        exits = [{1: 0, 2: 1, 3: 2}[layer] for layer in out.exit_layers[1:]]
        assert bank.behaviour_exit[rows].tolist() == exits
        k = 0
        for t, e in enumerate(exits):  # the checks of token t: exit points 0 .. min(e, 1)
            for j in range(min(e, 1) + 1):
                obs = model.final_norm(calls[k]).detach().numpy()  # HF's own norm on what the fast path saw
                np.testing.assert_allclose(bank.obs[rows][t, j].astype(np.float32), obs, rtol=2e-3, atol=2e-3)
                seen.append((s, t, j))
                k += 1
        assert k == len(calls)
    assert len(seen) > bank.num_tokens  # several checks per token on average: continues were seen too


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_observation_features_in_the_bank_equal_what_the_controller_computes(tmp_path, family):
    """rl.observation_features: the bank's extra columns (exit one-hot, cosine to the previous
    exit point, the previous token's exit) equal what PolicyExit computes while decoding, and
    its fused fast path decides like the policy module on the full observation."""
    from greencode.decoding.controllers import feature_size

    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    feats = ["exit_index", "cosine_prev", "prev_exit"]
    n_in = model.hidden_size + feature_size(feats, 3)
    assert n_in == model.hidden_size + 5
    torch.manual_seed(1)
    policy = ExitPolicy(n_in, [16], metadata={"observation": "normed", "exit_layers": [1, 2, 3], "features": feats,
                                              "fingerprint": model.fingerprint()})
    with torch.no_grad():
        policy.action_net.weight.mul_(30.0)
    assert policy.state_size == model.hidden_size
    path = tmp_path / "policy.pt"
    save_policy(policy, path)
    cfg = config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                            "rl": {"observation_features": feats,
                                   "bank": {"num_sequences": 4, "tokens_per_sequence": 6, "heldout_fraction": 0.25,
                                            "behaviour": "random", "exit_rate": [0.3, 0.6], "batch_size": 1}}})
    bank = TrajectoryBank.load(build_bank(cfg, model=model, tokenizer=CharTokenizer(), dataset=corpus()), model)
    assert bank.hidden_size == n_in and bank.state_size == model.hidden_size
    extra = bank.obs[:, :, model.hidden_size:].astype(np.float32)
    assert np.array_equal(extra[:, :, :3], np.broadcast_to(np.eye(3), (bank.num_tokens, 3, 3)))  # one-hot
    assert (extra[:, 0, 3] == 0).all() and (np.abs(extra[:, 1:, 3]) <= 1.001).all()  # cosine: none at the first
    for s in range(bank.num_sequences):  # prev_exit: the prefill's token is the final layer, then the behaviour's
        rows = slice(int(bank.offsets[s]), int(bank.offsets[s + 1]))
        prev = np.concatenate([[3], bank.behaviour_exit[rows][:-1]]) / 3
        np.testing.assert_allclose(extra[rows, 0, 4], prev, atol=1e-3)

    # the controller computes the same features while decoding (general path vs fused fast path)
    with torch.no_grad():
        p = policy.exit_probability(torch.from_numpy(bank.obs[:, :2].astype(np.float32))).flatten()
    for q in (0.5, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9, 0.05, 0.95):  # a threshold at which this prompt's exits vary
        thr = float(torch.quantile(p, q))
        if len(set(generate(model, PROMPT, PolicyExit(policy, thr), max_new_tokens=10).exit_layers[1:])) > 1:
            break
    fast = PolicyExit(policy, thr)
    slow = PolicyExit(policy, thr)
    fast.check_layers(model)
    slow.check_layers(model)
    assert fast._fast is not None
    slow._fast = None  # the general path: the policy module on the concatenated observation
    a = generate(model, PROMPT, fast, max_new_tokens=10)
    b = generate(model, PROMPT, slow, max_new_tokens=10)
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers
    assert len(set(a.exit_layers[1:])) > 1  # several exit points were used, so prev_exit varied
    # and recording that decoding gives the features the controller saw: replay with a spy
    seen = []
    spy = PolicyExit(policy, thr)
    spy.check_layers(model)
    def recorder(real):
        def record(layer, x, *rest):
            f = real(layer, x, *rest)
            seen.append((layer, torch.as_tensor(f).clone()))
            return f
        return record

    # the tensor path and the host path (one row on a CPU, the one taken here)
    spy._features, spy._host_features = recorder(spy._features), recorder(spy._host_features)
    out = generate(model, PROMPT, spy, max_new_tokens=10, observe=True)
    assert out.exit_layers == a.exit_layers
    k = 0
    for t, layer_out in enumerate(out.exit_layers[1:]):
        states = out.exit_states[t]
        prev = 3 if t == 0 else {1: 0, 2: 1, 3: 2, 4: 3}[out.exit_layers[t]]
        for j, layer in enumerate((1, 2, 3)):
            if layer > layer_out:
                break
            cos = 0.0 if j == 0 else float(torch.nn.functional.cosine_similarity(states[j], states[j - 1], dim=-1))
            expected = torch.tensor([*(np.eye(3)[j]), cos, prev / 3], dtype=torch.float32)
            assert seen[k][0] == layer
            torch.testing.assert_close(seen[k][1], expected, atol=1e-5, rtol=1e-4)
            k += 1
    assert k == len(seen)


def _bank_arrays(path):
    b = TrajectoryBank.load(path)
    return b, {k: getattr(b, k) for k in ("obs", "preds", "tokens", "offsets", "heldout", "behaviour_exit")}


def test_bank_on_two_local_processes_equals_one(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    one, a = _bank_arrays(build_bank(_cfg(tmp_path / "a", batch_size=1), model=model, tokenizer=CharTokenizer(),
                                     dataset=corpus()))
    two, b = _bank_arrays(build_bank(_cfg(tmp_path / "b", batch_size=1, workers=2), model=model,
                                     tokenizer=CharTokenizer(), dataset=corpus()))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert one.manifest["behaviour"] == two.manifest["behaviour"]


def test_bank_sharded_by_torchrun_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes: each records half the sequences, rank 0 merges and saves."""
    import subprocess
    import sys
    from pathlib import Path

    entry = tmp_path / "entry.py"
    entry.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import tiny_model
from test_rl_bank import CharTokenizer, corpus
from test_rl_on_distribution import _cfg
from greencode.rl import build_bank
from pathlib import Path
build_bank(_cfg(Path(sys.argv[1]), batch_size=2), model=tiny_model("llama", num_layers=4, exit_layers=(1, 2)),
           tokenizer=CharTokenizer(), dataset=corpus())
""")
    torchrun = Path(sys.executable).parent / "torchrun"
    for name, cmd in (("sharded", [str(torchrun), "--nproc_per_node", "2"]), ("single", [sys.executable])):
        proc = subprocess.run([*cmd, str(entry), str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    _, a = _bank_arrays(tmp_path / "single" / "run" / "bank")
    _, b = _bank_arrays(tmp_path / "sharded" / "run" / "bank")
    assert not (tmp_path / "sharded" / "run" / ".bank-shards").exists()
    for k in a:
        if k == "obs":  # rows batched with other partners: equal up to float rounding
            np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=2e-2)
        else:
            assert np.array_equal(a[k], b[k]), k
