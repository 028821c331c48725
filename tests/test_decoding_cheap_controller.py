"""The cheap-confidence controller (registry name ``cheap_confidence``): its decisions on a tiny model equal a
hand computation from the full head's logits restricted to the candidates, the loop counts its stated MACs
(the first exit point's full head once, as an LM-head call, reused when the token exits there), and it runs
in the evaluator, calibration and the endpoint from the registry alone."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from greencode.config import ConfigError
from greencode.decoding import CheapConfidenceExit, compute_cost, generate
from greencode.decoding import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = [5, 9, 11, 7, 30, 41]
K = 4


def _hand_exits(model, states, threshold, score="max_prob"):
    """Per decided token (its raw states at the early exit points [E, H]): the first exit point whose score
    over the first exit point's full-head top-4 (softmax over the full head's logits at those ids) clears
    the threshold, else the final layer."""
    out = []
    with torch.no_grad():
        for st in states:
            full = model.decode(st)  # [E, V]: the full head at every exit point
            cands = torch.topk(full[0], K).indices
            layer = model.final_layer
            for j, lay in enumerate(model.exit_layers):
                p = torch.softmax(full[j, cands].float(), -1)
                top2 = torch.topk(p, 2).values
                s = top2[0] if score == "max_prob" else top2[0] - top2[1]
                if s >= threshold:
                    layer = lay
                    break
            out.append(layer)
    return out


def _scores(model, states, score="max_prob"):
    with torch.no_grad():
        vals = []
        for st in states:
            full = model.decode(st)
            cands = torch.topk(full[0], K).indices
            for j in range(len(model.exit_layers)):
                top2 = torch.topk(torch.softmax(full[j, cands].float(), -1), 2).values
                vals.append(float(top2[0] if score == "max_prob" else top2[0] - top2[1]))
    return torch.tensor(vals)


@pytest.mark.parametrize("score", ["max_prob", "margin"])
def test_decisions_equal_a_hand_computation_from_the_full_heads_candidate_logits(family, score):
    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    # the full model's run gives the scores' range: thresholds at their quantiles make the exits vary
    ref = generate(model, PROMPT, CheapConfidenceExit(1.0, score=score), max_new_tokens=12, observe=True)
    s = _scores(model, ref.exit_states, score)
    varied = 0
    for q in (0.3, 0.5, 0.7, 0.85):
        thr = float(torch.quantile(s, q))
        res = generate(model, PROMPT, CheapConfidenceExit(thr, score=score), max_new_tokens=12, observe=True)
        # observe mode records each decided token's states at every exit point (those it decided on, as seen)
        assert res.exit_layers[1:] == _hand_exits(model, res.exit_states, thr, score), (q, thr)
        varied += len(set(res.exit_layers[1:])) > 1
    assert varied  # some threshold used several exit points


def test_the_loop_counts_the_stated_macs_and_pays_the_first_head_once():
    model = tiny_model("llama", num_layers=5, exit_layers=(1, 2, 3))
    h, k = model.hidden_size, K
    first, later = 3 * h + 2 * k, 3 * h + k * h + 2 * k  # RMS norm 3h; k candidate logits; candidate softmax 2k
    ref = generate(model, PROMPT, CheapConfidenceExit(1.0), max_new_tokens=12, observe=True)
    thr = float(torch.quantile(_scores(model, ref.exit_states), 0.6))
    ctrl = CheapConfidenceExit(thr)
    res = generate(model, PROMPT, ctrl, max_new_tokens=12)
    exits = res.exit_layers[1:]
    assert len(set(exits)) > 1 and model.exit_layers[0] in exits  # some tokens exit at the first exit point
    points = {layer: j for j, layer in enumerate(model.exit_layers)}
    checks = [points[e] + 1 if e in points else len(model.exit_layers) for e in exits]
    c = res.counters
    assert c["exit_checks"] == sum(checks)
    assert c["controller_macs"] == sum(first + (n - 1) * later for n in checks)
    assert ctrl.check_macs(model.exit_layers[0]) == first and ctrl.check_macs(model.exit_layers[1]) == later
    # LM heads: the prefill's, then per token the first exit point's (the controller's) and, unless the token
    # exited right there (its logits choose the token), one more where it exits or at the top
    assert c["lm_head_calls"] == 1 + sum(1 + (e != model.exit_layers[0]) for e in exits)
    cm = model.cost_model()
    cost = compute_cost(model, [res], ctrl)
    assert cost["macs_done"] == (c["layers_run"] * cm["layer_macs"] + c["kv_propagated_layers"] * cm["kv_macs"]
                                 + (c["lm_head_calls"] - 1) * cm["lm_head_macs"] + c["controller_macs"])
    # never exiting costs more than the full model: every token pays the first exit point's head
    full = generate(model, PROMPT, CheapConfidenceExit(1.0), max_new_tokens=12)
    assert compute_cost(model, [full], CheapConfidenceExit(1.0))["compute_ratio"] > 1.0
    # the same tokens in a batch of several rows sharing one controller (per-row instances)
    batch = generate(model, [PROMPT, PROMPT[:4]], [ctrl, ctrl], max_new_tokens=12)
    alone = generate(model, PROMPT[:4], CheapConfidenceExit(thr), max_new_tokens=12)
    assert batch[0].tokens == res.tokens and batch[0].exit_layers == res.exit_layers
    assert batch[1].tokens == alone.tokens and batch[1].counters["controller_macs"] == alone.counters["controller_macs"]


def test_registered_once_with_its_grid_and_clear_errors():
    info = registry.get_controller("cheap_confidence")
    assert info.cls is CheapConfidenceExit and info.param == "threshold" and info.needs == frozenset()
    assert info.grid == registry.CHEAP_GRID and info.conservative == "high"
    c = registry.build_controller("cheap_confidence", 0.9)
    assert c.describe() == {"controller": "cheap_confidence", "threshold": 0.9, "source": "first_full", "k": 4,
                            "score": "max_prob"}
    # built with the run's candidate source (the evaluator passes rl.candidate_source / rl.candidate_k)
    low = registry.build_controller("cheap_confidence", 0.7,
                                    registry.Resources(candidates={"source": "low_rank:8:16", "k": 3}))
    assert (low.source, low.k) == ("low_rank:8:16", 3)
    from greencode.config import load_config
    from greencode.eval.runner import EvalInputs, Runner

    cfg = load_config("configs/smoke.yaml", ["rl.candidate_source=low_rank:8:16", "rl.candidate_k=3"])
    runner = Runner(EvalInputs(model=tiny_model("llama"), tokenizer=None), cfg, None, 0, 0)
    assert runner.resources.candidates == {"source": "low_rank:8:16", "k": 3}
    assert load_config("configs/default.yaml").rl.candidate_source == "low_rank"
    with pytest.raises(ConfigError, match="measured offline only"):
        CheapConfidenceExit(0.9, source="bigram")
    with pytest.raises(ConfigError, match=r"k=11"):
        CheapConfidenceExit(0.9, k=11)
    with pytest.raises(ConfigError, match="score='entropy'"):
        CheapConfidenceExit(0.9, score="entropy")


def test_evaluated_calibrated_and_served_from_the_registry(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import greencode.data
    from greencode.eval import evaluate
    from greencode.eval.calibration import calibrate
    from greencode.serve import create_app
    from greencode.utils import read_json
    from test_eval_evaluator import fake_samples, make_run

    monkeypatch.setattr(greencode.data, "samples_for_config",
                        lambda cfg, tok: fake_samples(tok, cfg.eval.num_samples), raising=False)
    cfg, paths, _ = make_run(tmp_path, "eval.methods=[full,cheap_confidence]", "eval.thresholds.cheap_confidence=[0.3,1.0]",
                             "calibration.families=[cheap_confidence]", "calibration.criteria=[sequence,token]",
                             "calibration.num_samples=4", "calibration.thresholds.cheap_confidence=[1.0,0.3]",
                             "serve.controller=cheap_confidence", policy=False)
    out = evaluate(cfg)
    never = read_json(out / "methods" / "cheap_confidence@1.0.json")["records"]
    always = read_json(out / "methods" / "cheap_confidence@0.3.json")["records"]  # >= 0.25 over 4 candidates
    assert len(never) == len(always) == 3
    first = min(cfg_layer for cfg_layer in read_json(out / "methods" / "cheap_confidence@0.3.json")["records"][0]
                ["exit_layers"][1:])
    assert all(e == first for r in always for e in r["exit_layers"][1:])  # every token at the first exit point
    for r in never + always:
        assert r["counters"]["controller_macs"] > 0 and r["counters"]["exit_checks"] > 0
    # the check's MACs are in the cost: never exiting costs more than the full model, always exiting less
    assert all(r["cost"]["macs_done"] > r["cost"]["macs_full"] for r in never)
    assert all(r["cost"]["macs_done"] < r["cost"]["macs_full"] for r in always)

    cal = read_json(calibrate(cfg))
    fam = cal["criteria"]["sequence"]["families"]["cheap_confidence"]
    assert fam["order"] == ["cheap_confidence@1.0", "cheap_confidence@0.3"]

    with TestClient(create_app(cfg)) as c:
        health = c.get("/health").json()
        assert health["controller"] == "cheap_confidence"
        s = c.post("/api/generate", json={"inputs": "def f(x):\n    return",
                                          "options": {"num_predict": 4, "RL_agent_thresh": 0.3}}).json()["greencode"]
        assert s["controller"] == "cheap_confidence" and s["threshold"] == 0.3
        assert s["exit_layers"][1:] and all(e == first for e in s["exit_layers"][1:])
