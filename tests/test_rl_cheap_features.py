"""The cheap candidate features in the RL observation (rl.observation_features cand_*, rl.candidate_source,
rl.candidate_k): what both bank sources record for a token equals what PolicyExit computes online for the
same state and history, and the feature block has the size feature_size says."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from greencode.config import ConfigError, config_from_dict, load_config
from greencode.decoding import PolicyExit, compute_cost, generate
from greencode.decoding.controllers import CANDIDATE_FEATURES, feature_size
from greencode.decoding.signals import FEATURES
from greencode.rl import ExitPolicy, TrajectoryBank, build_bank
from greencode.rl.build import record_batch
from greencode.rl.simulate import pattern_decider, record_simulation, simulate_exits

FEATS = ["exit_index", "cosine_prev", "prev_exit", *CANDIDATE_FEATURES]
CANDS = {"source": "first_full", "k": 4}
PROMPT = [5, 9, 11, 7, 30, 41, 12, 3]


def _policy(model, feats=FEATS, seed=1, cands=CANDS):
    e = len(model.exit_layers)
    torch.manual_seed(seed)
    policy = ExitPolicy(model.hidden_size + feature_size(feats, e), [16],
                        metadata={"observation": "normed", "exit_layers": list(model.exit_layers), "features": feats,
                                  "candidates": cands, "fingerprint": model.fingerprint()})
    with torch.no_grad():
        policy.action_net.weight.mul_(30.0)
    return policy


def _spy(policy, threshold):
    """A PolicyExit that records each check's (layer, features) as it computes them online."""
    ctrl = PolicyExit(policy, threshold)
    seen = []

    def spy(real):
        def record(layer, x, *rest):
            f = real(layer, x, *rest)
            seen.append((layer, torch.as_tensor(f).detach().clone()))
            return f
        return record

    # the tensor path (a batch's rows) and the host path (one row on a CPU): whichever the loop takes
    ctrl._features, ctrl._host_features = spy(ctrl._features), spy(ctrl._host_features)
    return ctrl, seen


def _threshold_with_varied_exits(model, policy, make):
    for thr in (0.5, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9, 0.05, 0.95, 0.01, 0.99):
        if len(set(make(PolicyExit(policy, thr)).exit_layers[1:])) > 1:
            return thr
    pytest.fail("no threshold gave varied exits")


def _compare(model, seen, obs, exits):
    """Each online check's features == the recorded observation's feature block at that token and exit point."""
    points = {layer: j for j, layer in enumerate(model.exit_layers)}
    h, k = model.hidden_size, 0
    for t, e in enumerate(exits):
        last = points.get(e, len(model.exit_layers) - 1)
        for j in range(last + 1):
            layer, f = seen[k]
            assert layer == model.exit_layers[j]
            np.testing.assert_allclose(obs[t, j, h:], f.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"token {t} exit {j}")
            k += 1
    assert k == len(seen)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_decoding_bank_records_what_the_policy_computes_online(family):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    policy = _policy(model)
    assert policy.state_size == model.hidden_size
    assert feature_size(FEATS, 3) == 3 + 2 + len(CANDIDATE_FEATURES) == 10
    assert list(CANDIDATE_FEATURES) == list(FEATURES[:len(CANDIDATE_FEATURES)])  # signals.py's names and order
    thr = _threshold_with_varied_exits(model, policy, lambda c: generate(model, PROMPT, c, max_new_tokens=10))
    spy, seen = _spy(policy, thr)
    rec = record_batch(model, [PROMPT], [spy], 9, "normed", features=FEATS, candidates=CANDS)[0]
    obs = rec["obs"]
    assert obs.shape == (9, 3, model.hidden_size + 10)
    exits = [model.exit_points[b] for b in rec["behaviour_exit"]]
    assert len(set(exits)) > 1
    # the decided tokens' checks (token 0 comes from the prefill; the last decoded token is not recorded)
    _compare(model, seen[:sum(min(b, 2) + 1 for b in rec["behaviour_exit"])], obs, exits)
    # cand_top1_stable is 0 at the first exit point, the candidate max-prob is a probability over 4
    cand = obs[:, :, model.hidden_size + 5:]
    assert (cand[:, 0, 4] == 0).all() and ((cand[:, :, 0] >= 0.25 - 1e-6) & (cand[:, :, 0] <= 1 + 1e-6)).all()


def test_the_simulated_bank_records_what_the_policy_computes_online():
    """Teacher forced: the loop fed a window's tokens with the policy deciding; the simulation with the same
    exits records, per decided position, the features the policy saw."""
    model = tiny_model("llama", num_layers=5, exit_layers=(1, 2, 3))
    policy = _policy(model, seed=3)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 97, (1, 22), generator=g)
    m = 6
    run = lambda c: generate(model, ids[:, :m], c, 22 - m, forced_tokens=[ids[0, m:].tolist()])  # noqa: E731
    thr = _threshold_with_varied_exits(model, policy, run)
    spy, seen = _spy(policy, thr)
    res = generate(model, ids[:, :m], spy, 22 - m, forced_tokens=[ids[0, m:].tolist()])
    exits = res.exit_layers[1:]  # the decided positions m .. 20
    pattern = torch.full(ids.shape, 3)
    pattern[0, m:m + len(exits)] = torch.tensor([model.exit_points.index(e) for e in exits])
    sim = simulate_exits(model, ids, pattern_decider(pattern), m)
    rec = record_simulation(model, sim, ids, "normed", FEATS, CANDS)[0]
    assert rec["positions"].tolist() == list(range(m, 21))
    assert [model.exit_points[b] for b in rec["behaviour_exit"]] == exits
    _compare(model, seen, rec["obs"], exits)


def test_config_keys_banks_and_costs(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["rl.observation_features=[cand_max_prob,cand_margin]",
                                             "rl.candidate_k=5"])
    assert cfg.rl.candidates() == {"source": "first_full", "k": 5}
    assert load_config("configs/smoke.yaml").rl.candidates() is None  # the paper's hidden state only
    for bad, needle in (("rl.candidate_k=1", r"rl\.candidate_k=1 must be an integer in \[2, 10\]"),
                        ("rl.candidate_source=magic", r"rl\.candidate_source: candidate source 'magic'; choose one "
                                                      "of first_full"),
                        ("rl.candidate_source=low_rank:x", r"rl\.candidate_source: .*'low_rank:x'.*positive integers"),
                        ("rl.observation_features=[cand_maxprob]", "has 'cand_maxprob'; known:")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/smoke.yaml", [bad])
    with pytest.raises(ConfigError, match="measured offline only"):
        load_config("configs/smoke.yaml", ["rl.observation_features=[cand_margin]", "rl.candidate_source=context"])
    # the paper configs keep the paper's observation (the hidden state alone); the embedded default observes the
    # exit index and the cheap candidate features (chosen on tuning tokens), from the head's rank-32 factorisation
    # at the first exit point (chosen on validation tokens: results/default/signals/sources/auc.md)
    for path in ("configs/paper/llama-3.2-3b_java.yaml", "configs/paper/opt-2.7b_python.yaml"):
        assert load_config(path).rl.observation_features == [], path
    default = load_config("configs/default.yaml").rl
    assert default.observation_features[0] == "exit_index" and default.candidates() == {"source": "low_rank", "k": 4}
    assert set(default.observation_features) <= set(default.bank.record_features)

    # a decoding bank with the features records its candidates in the manifest and its key
    from test_rl_bank import CharTokenizer, corpus

    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    feats = ["exit_index", "cand_max_prob", "cand_margin"]
    c = config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "res"),
                          "rl": {"observation_features": feats,
                                 "bank": {"num_sequences": 3, "tokens_per_sequence": 4, "heldout_fraction": 0.34,
                                          "behaviour": "random", "exit_rate": [0.3, 0.6], "batch_size": 2}}})
    bank = TrajectoryBank.load(build_bank(c, model=model, tokenizer=CharTokenizer(), dataset=corpus()), model)
    assert bank.manifest["candidates"] == {"source": "first_full", "k": 4}
    assert bank.manifest["key"]["candidates"] == {"source": "first_full", "k": 4}
    assert bank.hidden_size == model.hidden_size + feature_size(feats, 2) == model.hidden_size + 4
    assert bank.state_size == model.hidden_size

    # a policy with candidate features pays the first exit point's head once and the candidate logits after
    policy = _policy(model, feats)
    ctrl = PolicyExit(policy, 0.5)
    res = generate(model, PROMPT, ctrl, max_new_tokens=8)
    mlp = sum(mod.weight.numel() for mod in policy.modules() if isinstance(mod, torch.nn.Linear))
    h, k = model.hidden_size, 4
    assert ctrl.check_macs(1) == mlp + 3 * h + 2 * k and ctrl.check_macs(2) == mlp + 3 * h + k * h + 2 * k
    points = {1: 1, 2: 2}
    checks = [points.get(e, 2) for e in res.exit_layers[1:]]
    assert res.counters["controller_macs"] == sum(ctrl.check_macs(1) + (n - 1) * ctrl.check_macs(2) for n in checks)
    assert res.counters["lm_head_calls"] == 1 + sum(1 + (e != 1) for e in res.exit_layers[1:])
    assert compute_cost(model, [res], ctrl)["macs_done"] > 0
    # with low_rank candidates no head is paid for the decision: the rank-8 head and the 16-token shortlist's
    # logits at the first exit point, one LM head per token (the one that chooses it)
    low = PolicyExit(_policy(model, feats, cands={"source": "low_rank:8:16", "k": 4}), 0.5)
    res = generate(model, PROMPT, low, max_new_tokens=8)
    v = model.adapter.lm_head.weight.shape[0]
    assert low.check_macs(1) == mlp + 3 * h + 8 * (h + v) + 16 * h + 2 * k and low.check_macs(2) == ctrl.check_macs(2)
    assert not low.logits_at(1) and res.counters["lm_head_calls"] == len(res.exit_layers)
    checks = [points.get(e, 2) for e in res.exit_layers[1:]]
    assert res.counters["controller_macs"] == sum(low.check_macs(1) + (n - 1) * low.check_macs(2) for n in checks)
    # without a recorded candidate source, a policy observing cand_* is refused
    bare = ExitPolicy(model.hidden_size + 2, [8], metadata={"observation": "normed", "exit_layers": [1, 2],
                                                            "features": ["cand_margin", "cand_max_prob"]})
    with pytest.raises(ConfigError, match="records no candidate source"):
        PolicyExit(bare, 0.5)
