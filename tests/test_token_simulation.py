"""Token consistency from one teacher-forced pass (greencode.rl.simulate.simulate_forced): every
controller's exits simulated over the continuation's positions give the same own choices, exit
layers and counters (so the same compute) as the decoding loop's teacher-forced rows
(generate(..., forced_tokens=...)), which is what the token criterion was computed from."""

import pytest
import torch
from conftest import VOCAB, sharp_exit_policy, tiny_model

from greencode.decoding import (ConfidenceExit, EntropyExit, FixedExit, NeverExit, SaturationExit, compute_cost,
                                generate)
from greencode.rl.simulate import simulate_forced, token_local


def _ids(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def _controllers(model):
    return [NeverExit(), FixedExit(1), FixedExit(2), ConfidenceExit(0.05), ConfidenceExit(0.08),
            EntropyExit(4.0), EntropyExit(4.3), SaturationExit(0.3), SaturationExit(0.6)]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_simulated_teacher_forced_rows_equal_the_loops(family):
    model = tiny_model(family, num_layers=6, exit_layers=(1, 2, 4))
    exited_somewhere = set()
    for seed, (p_len, n) in enumerate([(9, 12), (17, 15), (5, 1), (30, 7)]):
        prompt = _ids(100 + seed, p_len)
        # the full model's greedy continuation, as the calibration feeds it
        forced = generate(model, torch.tensor([prompt]), NeverExit(), n).tokens
        ctrls = _controllers(model)
        sim, oracle = simulate_forced(model, prompt, forced, ctrls, oracle=True)
        loop = generate(model, [prompt] * len(ctrls), _controllers(model), len(forced),
                        forced_tokens=[forced] * len(ctrls))
        for c, s, l in zip(ctrls, sim, loop):
            assert s.own_tokens == l.own_tokens, c.describe()  # exact: the per-token disagreement is the loop's
            assert s.exit_layers == l.exit_layers, c.describe()
            for key in ("decode_steps", "layers_run", "kv_propagated_layers", "lm_head_calls", "exit_checks",
                        "controller_macs"):
                assert s.counters[key] == l.counters[key], (c.describe(), key)
            assert compute_cost(model, [s], c) == compute_cost(model, [l], c)
            exited_somewhere |= {x for x in s.exit_layers if x != model.final_layer}
        # the oracle: the first exit point agreeing with the final layer on the full model's stream
        assert len(oracle) == len(forced) - 1
        ref = generate(model, torch.tensor([prompt]), __import__("greencode.decoding", fromlist=["OracleExit"]).OracleExit(),
                       len(forced), forced_tokens=[forced])
        assert [model.exit_points[k] for k in oracle] == ref.exit_layers[1:]
    assert len(exited_somewhere) >= 2  # the controllers really exited, at several layers


def test_disagreement_is_the_loops_share():
    model = tiny_model("opt", num_layers=6, exit_layers=(1, 2, 4))
    shares = []
    for seed in range(4):
        prompt = _ids(5 + seed, 11)
        forced = generate(model, torch.tensor([prompt]), NeverExit(), 10).tokens
        (row,), _ = simulate_forced(model, prompt, forced, [FixedExit(1)])
        loop = generate(model, torch.tensor([prompt]), FixedExit(1), len(forced), forced_tokens=[forced])
        assert row.own_tokens[0] == forced[0]  # the prefill's token is the full model's
        share = sum(a != b for a, b in zip(row.own_tokens, forced)) / len(forced)
        assert share == sum(a != b for a, b in zip(loop.own_tokens, forced)) / len(forced)
        shares.append(share)
    assert max(shares) > 0


def test_controllers_with_state_across_tokens_are_refused():
    from greencode.decoding import OracleExit

    assert token_local(FixedExit(1)) and token_local(SaturationExit(0.9))
    assert not token_local(OracleExit())
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    with pytest.raises(ValueError, match="decoding loop"):
        simulate_forced(model, [3, 4, 5], [6, 7], [OracleExit()])


@pytest.mark.parametrize("source", ["first_full", "low_rank:8:16"])
def test_simulated_rows_of_controllers_with_per_token_state_equal_the_loops(family, source):
    """GC and the classifier with the cheap candidate features, and cheap confidence, as the calibration
    simulates them (every position's check of one controller decided together): the loop's own choices, exit
    layers and counters, on the host path (a CPU float32 model) and on the tensor path."""
    from greencode.decoding import CheapConfidenceExit, PolicyExit
    from greencode.decoding.controllers import CANDIDATE_FEATURES

    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    hidden_only = sharp_exit_policy(model, [], source, seed=2)
    with_features = sharp_exit_policy(model, ["exit_index", *CANDIDATE_FEATURES], source, seed=2)

    def controllers(host_path):
        out = [PolicyExit.of(hidden_only, 0.5)]
        out += [PolicyExit.of(with_features, thr) for thr in (0.05, 0.5, 0.95)]
        out += [CheapConfidenceExit(thr, source=source) for thr in (0.2, 0.5)]
        for c in out:
            c.host_path = host_path
        return out

    exited = set()
    simulated = {True: controllers(True), False: controllers(False)}  # kept across prompts, as the pass does
    for seed, (p_len, n) in enumerate([(9, 12), (17, 15), (30, 7), (12, 15)]):
        prompt = _ids(200 + seed, p_len)
        forced = generate(model, torch.tensor([prompt]), NeverExit(), n).tokens
        loop = generate(model, [prompt] * 6, controllers(True), len(forced), forced_tokens=[forced] * 6)
        for host_path in (True, False):
            ctrls = simulated[host_path]
            sim, _ = simulate_forced(model, prompt, forced, ctrls)
            for c, s, l in zip(ctrls, sim, loop):
                assert (s.own_tokens, s.exit_layers) == (l.own_tokens, l.exit_layers), (c.describe(), host_path)
                assert s.counters == {k: l.counters[k] for k in s.counters}, (c.describe(), host_path)
                exited |= {(c.describe()["controller"], x) for x in s.exit_layers if x != model.final_layer}
    # a kept controller whose setting changes gets fresh copies (not the ones made for its old threshold)
    moved = simulated[True][1]
    moved.threshold = 0.95
    sim, _ = simulate_forced(model, prompt, forced, [moved])
    want = generate(model, prompt, PolicyExit.of(with_features, 0.95), len(forced), forced_tokens=[forced])
    assert (sim[0].own_tokens, sim[0].exit_layers) == (want.own_tokens, want.exit_layers)
    assert sim[0].exit_layers != loop[1].exit_layers  # 0.05 and 0.95 exit differently here: the check can fail
    assert {name for name, _ in exited} >= {"policy", "cheap_confidence"}  # exits for the comparison to mean something
    assert len({x for _, x in exited}) >= 2
