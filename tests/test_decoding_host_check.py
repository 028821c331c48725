"""One row's exit check on the host (signals.HostCheck, PolicyExit's NumPy path): the same features as the
tensor path (signal_step) up to float rounding, for both candidate sources that run online, with and without
saturation, on Llama (RMSNorm) and OPT (LayerNorm with a bias, folded into an offset); a row's state moves
between the host and the batched path; and decoding with the host path gives the tensors path's tokens and
exits. The host path must be the one taken on a CPU float32 model (else these tests would compare the tensor
path with itself), and not on a bf16 one."""

import numpy as np
import pytest
import torch

from conftest import VOCAB, tiny_model
from greencode.decoding import CheapConfidenceExit, PolicyExit, generate, policy_observation
from greencode.decoding.controllers import CANDIDATE_FEATURES, feature_size
from greencode.decoding.signals import CheapSignals, HostCheck, SignalState
from greencode.rl import ExitPolicy

SOURCES = ["first_full", "low_rank:8:16"]


def _states(model, n=6, seed=0):
    """Raw states [n, H] at every exit point, from a real forward pass (not random vectors)."""
    ids = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    every = type(model)(model.hf, sorted(set(model.exit_layers) | {model.exit_layers[0] - 1}))  # and the one below
    with torch.no_grad():
        hs = every.exit_hidden_states(ids)
    return {layer: h[0] for layer, h in zip(every.exit_points, hs)}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("saturation", [False, True])
def test_host_features_equal_the_tensor_path_row_by_row(family, source, saturation):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    states = _states(model)
    host = CheapSignals(model, k=4, source=source, saturation=saturation)
    tensor = CheapSignals(model, k=4, source=source, saturation=saturation, host=False)
    assert host.host is not None and tensor.host is None, "a CPU float32 model must take the host path"
    n = states[1].shape[0]
    prev_exit = torch.tensor([2])
    for row in range(n):  # each row a token, checked at every exit point in turn
        for sig in (host, tensor):
            sig.start(torch.zeros(1, dtype=torch.long), prev_exit)
            if saturation:
                sig.below(states[0][row:row + 1])
        for j, layer in enumerate(model.exit_layers):
            x = states[layer][row:row + 1]
            full = model.decode(x) if j == 0 and source == "first_full" else None
            with torch.no_grad():
                got, want = host.check(j, x, full), tensor.check(j, x, full)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert isinstance(host.state.candidates, np.ndarray)  # held on the host ...
            assert np.asarray(host.state.candidates).tolist() == tensor.state.candidates.tolist()  # ... the same set


def test_a_host_checked_row_joins_the_batched_path(family):
    """Two rows checked on the host at the first exit point, then together (check_rows stacks their NumPy
    states): the same features as two rows checked together throughout."""
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    states = _states(model, n=2, seed=3)
    rows = [CheapSignals(model, k=4, source="low_rank:8:16", saturation=True) for _ in range(2)]
    both = CheapSignals(model, k=4, source="low_rank:8:16", saturation=True, host=False)
    for s in rows:
        s.start(torch.zeros(1, dtype=torch.long), torch.tensor([3]))
    both.start(torch.zeros(2, dtype=torch.long), torch.tensor([3, 3]))
    with torch.no_grad():
        first = torch.cat([s.check(0, states[1][r:r + 1]) for r, s in enumerate(rows)])
        torch.testing.assert_close(first, both.check(0, states[1]), rtol=1e-5, atol=1e-5)
        second = rows[0].check_rows(1, rows, states[2])
        torch.testing.assert_close(second, both.check(1, states[2]), rtol=1e-5, atol=1e-5)
    assert isinstance(rows[1].state.candidates, torch.Tensor)  # advanced by the batched path


def test_no_host_path_for_a_bf16_head():
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2)).to(torch.bfloat16)
    assert HostCheck.of(model, model.adapter.lm_head.weight, None, None, 4, 2, False) is None
    assert CheapSignals(model, k=4, source="first_full").host is None


def _policy(model, feats, seed=1, source="low_rank:8:16"):
    torch.manual_seed(seed)
    policy = ExitPolicy(model.hidden_size + feature_size(feats, len(model.exit_layers)), [16],
                        metadata={"observation": "normed", "exit_layers": list(model.exit_layers), "features": feats,
                                  "candidates": {"source": source, "k": 4}, "fingerprint": model.fingerprint()})
    with torch.no_grad():
        policy.action_net.weight.mul_(30.0)  # sharp decisions, so the exits vary with the state
    return policy


FEATURE_SETS = [["exit_index", *CANDIDATE_FEATURES],
                ["exit_index", "cosine_prev", "prev_exit", *CANDIDATE_FEATURES],
                ["exit_index", "prev_exit"]]


@pytest.mark.parametrize("feats", FEATURE_SETS, ids=["default", "all", "no_candidates"])
@pytest.mark.parametrize("source", SOURCES)
def test_policy_decodes_alike_on_the_host_and_the_tensor_path(family, feats, source):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    # seed 2: a policy whose exits vary with the threshold for every feature set here (found by trying 1-5)
    policy = _policy(model, feats, seed=2, source=source)
    prompt = [5, 9, 11, 7, 30, 41, 12, 3]
    varied = 0
    for thr in (0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99):
        host = PolicyExit.of(policy, thr)
        tensor = PolicyExit.of(policy, thr)
        tensor.host_path = False
        a = generate(model, prompt, host, max_new_tokens=12)
        assert host._host is not None, "a CPU float32 model must take the host path"
        b = generate(model, prompt, tensor, max_new_tokens=12)
        assert tensor._host is None
        assert a.tokens == b.tokens and a.exit_layers == b.exit_layers, f"threshold {thr}"
        varied += len(set(a.exit_layers[1:])) > 1
    assert varied, "no threshold gave varied exits: the comparison would be vacuous"


def test_policy_host_probability_equals_the_policy_module(family):
    """The host MLP's P(exit) against the policy module itself on the same observation (the norm folded)."""
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    policy = _policy(model, FEATURE_SETS[1])
    with torch.no_grad():
        policy.action_net.weight.div_(30.0)  # probabilities away from 0 and 1, where the comparison means something
    ctrl = PolicyExit.of(policy, 0.5)
    ctrl.check_layers(model)
    states = _states(model, n=5)
    probs = []
    for row in range(5):
        x = states[1][row]
        feats = np.random.default_rng(row).normal(size=feature_size(FEATURE_SETS[1], 3)).astype(np.float32)
        got = ctrl._host_probability(x.numpy(), feats)
        obs = torch.cat([policy_observation(model, x, "normed"), torch.from_numpy(feats)])
        with torch.no_grad():
            want = float(ctrl.exit_probability(obs[None])[0])
        assert abs(got - want) < 1e-5, (row, got, want)
        probs.append(got)
    assert max(probs) - min(probs) > 1e-3  # different states, different probabilities


def test_cheap_confidence_decodes_alike_on_the_host_and_the_tensor_path(family):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    prompt = [5, 9, 11, 7, 30, 41, 12, 3]
    for thr in (0.3, 0.6):
        host = CheapConfidenceExit(thr, source="low_rank:8:16")
        a = generate(model, prompt, host, max_new_tokens=12)
        assert host._signals.host is not None
        tensor = CheapConfidenceExit(thr, source="low_rank:8:16")
        tensor.host_path = False
        b = generate(model, prompt, tensor, max_new_tokens=12)
        assert tensor._signals.host is None
        assert a.tokens == b.tokens and a.exit_layers == b.exit_layers


def test_signal_state_stack_takes_host_and_tensor_rows():
    a = SignalState(candidates=np.array([[1, 2]]), prev_exit=torch.tensor([1]), prev_top1=np.array([1]))
    b = SignalState(candidates=torch.tensor([[3, 4]]), prev_exit=torch.tensor([2]), prev_top1=torch.tensor([3]))
    s = SignalState.stack([a, b])
    assert s.candidates.tolist() == [[1, 2], [3, 4]] and s.prev_top1.tolist() == [1, 3]
    assert s.prev_normed is None


def test_host_arrays_are_built_once_per_head_and_rebuilt_when_it_changes():
    model = tiny_model("opt", num_layers=4, exit_layers=(1, 2))
    a, b = CheapSignals(model, k=4, source="low_rank:8:16"), CheapSignals(model, k=4, source="low_rank:8:16")
    assert a.host.weight is b.host.weight  # shared: one copy of the scaled head per model
    states = _states(model, n=1)
    x = states[1][0:1]
    a.start(torch.zeros(1, dtype=torch.long), torch.tensor([2]))
    before = a.check(0, x)
    with torch.no_grad():
        model.adapter.lm_head.weight.mul_(2.0)  # edited in place: the cached arrays must not be reused
    c = CheapSignals(model, k=4, source="low_rank:8:16")
    assert c.host.weight is not a.host.weight
    tensor = CheapSignals(model, k=4, source="low_rank:8:16", host=False)
    for sig in (c, tensor):
        sig.start(torch.zeros(1, dtype=torch.long), torch.tensor([2]))
    with torch.no_grad():
        got, want = c.check(0, x), tensor.check(0, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before)  # the logits doubled: the features moved
