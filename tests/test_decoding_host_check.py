"""One row's exit check on the host (signals.HostCheck, PolicyExit's NumPy path): the same features as the
tensor path (signal_step) up to float rounding, for both candidate sources that run online, with and without
saturation, on Llama (RMSNorm) and OPT (LayerNorm with a bias, folded into an offset); a row's state moves
between the host and the batched path; and decoding with the host path gives the tensors path's tokens and
exits. The host path must be the one taken on a CPU float32 model (else these tests would compare the tensor
path with itself), and not on a bf16 one."""

import numpy as np
import pytest
import torch

from conftest import VOCAB, sharp_exit_policy, tiny_model
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
    """Two rows checked on the host at the first exit point, then together on the tensor path (check_rows of a
    tensor instance stacks their NumPy states), then together on the host again (it takes their tensor
    states): the same features as two rows checked together throughout."""
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    states = _states(model, n=2, seed=3)
    rows = [CheapSignals(model, k=4, source="low_rank:8:16", saturation=True) for _ in range(2)]
    leader = CheapSignals(model, k=4, source="low_rank:8:16", saturation=True, host=False)
    both = CheapSignals(model, k=4, source="low_rank:8:16", saturation=True, host=False)
    for s in rows:
        s.start(torch.zeros(1, dtype=torch.long), torch.tensor([3]))
    both.start(torch.zeros(2, dtype=torch.long), torch.tensor([3, 3]))
    with torch.no_grad():
        first = torch.cat([s.check(0, states[1][r:r + 1]) for r, s in enumerate(rows)])
        torch.testing.assert_close(first, both.check(0, states[1]), rtol=1e-5, atol=1e-5)
        second = leader.check_rows(1, rows, states[2])
        torch.testing.assert_close(second, both.check(1, states[2]), rtol=1e-5, atol=1e-5)
        assert isinstance(rows[1].state.candidates, torch.Tensor)  # advanced by the tensor path
        third = rows[0].check_rows(2, rows, states[3])
        torch.testing.assert_close(third, both.check(2, states[3]), rtol=1e-5, atol=1e-5)
    assert isinstance(rows[1].state.candidates, np.ndarray)  # advanced on the host
    assert [np.asarray(s.state.candidates)[0].tolist() for s in rows] == both.state.candidates.tolist()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("saturation", [False, True])
def test_host_rows_equal_the_tensor_path(family, source, saturation):
    """Several rows checked together on the host (HostCheck.values_rows, the batched loop's case): the features
    and candidate sets of the tensor path over the same rows, at every exit point of a token."""
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    states = _states(model, n=5, seed=4)
    n = 5
    rows = [CheapSignals(model, k=4, source=source, saturation=saturation) for _ in range(n)]
    both = CheapSignals(model, k=4, source=source, saturation=saturation, host=False)
    prev_exit = torch.tensor([0, 1, 2, 3, 3])
    for r, s in enumerate(rows):
        s.start(torch.zeros(1, dtype=torch.long), prev_exit[r:r + 1])
        if saturation:
            s.below(states[0][r:r + 1])
    both.start(torch.zeros(n, dtype=torch.long), prev_exit)
    if saturation:
        both.below(states[0])
    for j, layer in enumerate(model.exit_layers):
        x = states[layer]
        full = model.decode(x) if j == 0 and source == "first_full" else None
        with torch.no_grad():
            got, want = rows[0].check_rows(j, rows, x, full), both.check(j, x, full)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert all(isinstance(s.state.candidates, np.ndarray) for s in rows)  # the host path ran
        assert [np.asarray(s.state.candidates)[0].tolist() for s in rows] == both.state.candidates.tolist()
    assert len({tuple(np.asarray(s.state.candidates)[0].tolist()) for s in rows}) > 1  # rows that differ


def test_host_rows_at_different_stages_are_left_to_the_caller():
    model = tiny_model("llama", num_layers=5, exit_layers=(1, 2, 3))
    states = _states(model, n=2, seed=5)
    rows = [CheapSignals(model, k=4, source="low_rank:8:16", saturation=False) for _ in range(2)]
    for s in rows:
        s.start(torch.zeros(1, dtype=torch.long), torch.tensor([3]))
    with torch.no_grad():
        rows[0].check(0, states[1][0:1])  # row 0 has its candidates, row 1 not yet
        before = [s.state for s in rows]
        assert rows[0].check_rows(1, rows, states[2]) is None
    assert [s.state for s in rows] == before  # nothing advanced


def test_no_host_path_for_a_bf16_head():
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2)).to(torch.bfloat16)
    assert HostCheck.of(model, model.adapter.lm_head.weight, None, None, 4, 2, False) is None
    assert CheapSignals(model, k=4, source="first_full").host is None


def _policy(model, feats, seed=1, source="low_rank:8:16"):
    return sharp_exit_policy(model, feats, source, seed)


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


@pytest.mark.parametrize("feats", FEATURE_SETS + [[]], ids=["default", "all", "no_candidates", "hidden_only"])
def test_policy_decodes_a_batch_alike_on_the_host_and_the_tensor_path(family, feats, monkeypatch):
    """Ragged prompts decoded as one batch: the rows' checks together on the host (decide_rows, or
    should_exit_rows for the hidden state alone) give the tensor path's tokens and exits for every row."""
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    policy = _policy(model, feats, seed=2)
    prompts = [[5, 9, 11, 7, 30, 41, 12, 3], [8, 2, 19], [40, 6, 6, 21, 9], [13, 14, 15, 16, 17, 18]]
    calls = {"host": 0}
    name = "_decide_rows_host" if feats else "_host_probability_rows"
    real = getattr(PolicyExit, name)

    def spy(self, *a, **k):
        calls["host"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(PolicyExit, name, spy)
    varied = 0
    for thr in (0.05, 0.3, 0.7, 0.95):
        host = PolicyExit.of(policy, thr)
        tensor = PolicyExit.of(policy, thr)
        tensor.host_path = False
        a = generate(model, prompts, host, max_new_tokens=10)
        b = generate(model, prompts, tensor, max_new_tokens=10)
        for ra, rb in zip(a, b):
            assert ra.tokens == rb.tokens and ra.exit_layers == rb.exit_layers, f"threshold {thr}"
        varied += len({e for r in a for e in r.exit_layers[1:]}) > 1
    assert calls["host"] > 0, "the batched host path was not taken: the comparison would be the tensor path's alone"
    assert varied, "no threshold gave varied exits: the comparison would be vacuous"


def test_policy_host_probability_rows_equal_one_row_at_a_time(family):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    policy = _policy(model, FEATURE_SETS[1])
    with torch.no_grad():
        policy.action_net.weight.div_(30.0)
    ctrl = PolicyExit.of(policy, 0.5)
    ctrl.check_layers(model)
    x = _states(model, n=5)[2].numpy()
    feats = np.random.default_rng(0).normal(size=(5, feature_size(FEATURE_SETS[1], 3))).astype(np.float32)
    got = ctrl._host_probability_rows(x, feats)
    want = [ctrl._host_probability(x[j], feats[j]) for j in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got.max() - got.min() > 1e-3


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


def test_cheap_confidence_decodes_alike_on_the_host_and_the_tensor_path(family, monkeypatch):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    calls = {"rows": 0}
    real = CheapSignals.check_values_rows

    def spy(self, *a, **k):
        calls["rows"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(CheapSignals, "check_values_rows", spy)
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
        prompts = [prompt, [8, 2, 19], [40, 6, 6, 21, 9]]  # and as rows of one batch (the rows' host check)
        rows_a = generate(model, prompts, CheapConfidenceExit(thr, source="low_rank:8:16"), max_new_tokens=12)
        rows_b = generate(model, prompts, tensor, max_new_tokens=12)
        assert [(r.tokens, r.exit_layers) for r in rows_a] == [(r.tokens, r.exit_layers) for r in rows_b]
    assert calls["rows"] > 0, "the rows' host check was not taken"


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


@pytest.fixture
def blas_at_two():
    """NumPy's own BLAS (threadpoolctl's controllers) set to 2 threads, so that one thread inside a block is seen;
    put back as it was afterwards."""
    from greencode.utils import _numpy_blas

    libs = _numpy_blas()
    if not libs:
        pytest.skip("threadpoolctl sees no BLAS bundled with NumPy here")
    before = [c.num_threads for c in libs]
    for c in libs:
        c.set_num_threads(2)
    yield libs
    for c, n in zip(libs, before):
        c.set_num_threads(n)


def test_numpy_blas_runs_on_one_thread_inside_a_decode_step(monkeypatch, blas_at_two):
    """The host checks' small NumPy products must not wake OpenBLAS threads beside torch's (at batch 8 that made
    a step ~4x slower, layers included): NumPy's BLAS is on one thread inside a step, restored after it."""
    libs = blas_at_two
    seen = []
    real = PolicyExit.should_exit_rows

    def spy(self, *a, **k):
        seen.append([c.num_threads for c in libs])
        return real(self, *a, **k)

    monkeypatch.setattr(PolicyExit, "should_exit_rows", spy)
    model = tiny_model("llama", num_layers=5, exit_layers=(1, 2, 3))
    generate(model, [[5, 9, 11], [8, 2, 19, 4]], PolicyExit.of(_policy(model, []), 0.5), max_new_tokens=4)
    assert seen and all(n == [1] * len(libs) for n in seen)
    assert [c.num_threads for c in libs] == [2] * len(libs)  # restored


def test_numpy_blas_blocks_nest_across_threads(blas_at_two):
    """Blocks that overlap across threads (the endpoint's model thread beside a decode in this one): this thread's
    block ends while the other's is open, and the other's decode must keep one BLAS thread; a later block on its
    own then restores what it found."""
    import threading

    from greencode.utils import numpy_blas_threads

    libs = blas_at_two
    inside, release = threading.Event(), threading.Event()
    seen = []

    def other():
        with numpy_blas_threads(1):
            inside.set()
            release.wait(10)
            seen.append([c.num_threads for c in libs])

    t = threading.Thread(target=other)
    try:
        with numpy_blas_threads(1):
            t.start()
            assert inside.wait(10)
        assert [c.num_threads for c in libs] == [1] * len(libs)  # the other block is still open
        release.set()
        t.join(10)
        assert seen == [[1] * len(libs)]
        for c in libs:  # OpenBLAS ignores a raise asked from another thread than the main one: set it here
            c.set_num_threads(2)
        with numpy_blas_threads(1):
            assert [c.num_threads for c in libs] == [1] * len(libs)
        assert [c.num_threads for c in libs] == [2] * len(libs)  # the last block out restores
    finally:
        release.set()
        t.join(10)
