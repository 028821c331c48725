"""Early-exit-ready pretraining pieces on tiny random HF models: loss scales, curricula,
layer dropout (pass-through rows, kept rows exact) and the early-exit loss against an
independent computation from HF's own hidden states."""

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

from greencode.training.early_exit_loss import (ExitCurriculum, LayerDropout, early_exit_loss, layer_dropout_probs,
                                                loss_scales)


def _ids(batch=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def test_loss_scales():
    assert loss_scales([0, 1, 3], "one") == pytest.approx([1 / 3] * 3)
    assert loss_scales([0, 1, 3], "l") == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    inv = loss_scales([0, 1, 3], "inv_l")
    assert inv[0] > inv[1] > inv[2] and sum(inv) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown early-exit loss scale"):
        loss_scales([1], "square")


def test_curricula():
    rot = ExitCurriculum(5, "rotational", period=2)
    assert rot.active(0) == [0, 2, 4] and rot.active(1) == [1, 3] and rot.active(2) == [0, 2, 4]
    assert ExitCurriculum(5, "none").active(7) == [0, 1, 2, 3, 4]
    grad = ExitCurriculum(4, "gradual", gradual_fraction=0.5, max_steps=100)
    assert grad.active(0) == [3]
    assert grad.active(25) == [1, 2, 3]
    assert grad.active(50) == grad.active(99) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown early-exit curriculum"):
        ExitCurriculum(3, "random")


def test_layer_dropout_probs_rise_with_depth():
    p = layer_dropout_probs(5, 0.2, "linear")
    assert p[0] == 0.0 and p[-1] == pytest.approx(0.2) and p == sorted(p)
    e = layer_dropout_probs(5, 0.2, "exp")
    assert e[0] == 0.0 and e[-1] == pytest.approx(0.2) and all(a <= b for a, b in zip(e, p))
    assert layer_dropout_probs(3, 0.1, "uniform") == [0.1, 0.1, 0.1]
    with pytest.raises(ValueError):
        layer_dropout_probs(3, 1.0)


def test_layer_dropout_passes_dropped_rows_and_runs_kept_rows_exactly():
    # Llama: no dropout of its own in training mode (OPT's config has 0.1), so outputs are comparable
    m = tiny_model("llama", num_layers=3, exit_layers=(0, 1))
    ids = _ids(batch=6)
    m.hf.train()  # layer dropout acts in training mode only
    with torch.no_grad():
        ref = m.hf(input_ids=ids, output_hidden_states=True).hidden_states
    # drop only layer 1, for about half the rows
    drop = LayerDropout([0.0, 0.5, 0.0], seed=1).install(list(m.layers))
    seen = {}
    h = m.layers[1].register_forward_hook(lambda _m, _a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            got = m.hf(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        h.remove()
        drop.remove()
    out1 = seen["out"]
    dropped = [r for r in range(6) if torch.equal(out1[r], ref[1][r])]
    kept = [r for r in range(6) if r not in dropped]
    assert dropped and kept, "seed 1 should drop some rows and keep others"
    for r in kept:  # a kept row ran the layer on its own inputs: the same output as without dropout
        torch.testing.assert_close(out1[r], ref[2][r], rtol=1e-5, atol=1e-5)
    for r in dropped:
        assert not torch.allclose(out1[r], ref[2][r])
    # removed: the model is back to its own forward
    with torch.no_grad():
        again = m.hf(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(again[-1], ref[-1])
    assert len(got) == len(ref)


def test_layer_dropout_is_off_in_eval_mode():
    m = tiny_model("llama", num_layers=3, exit_layers=(0, 1))
    ids = _ids()
    with torch.no_grad():
        ref = m.hf(input_ids=ids).logits
    drop = LayerDropout([0.9, 0.9, 0.9], seed=0).install(list(m.layers))
    try:
        with torch.no_grad():
            got = m.hf(input_ids=ids).logits
    finally:
        drop.remove()
    torch.testing.assert_close(got, ref)


def _reference_terms(m, ids):
    """Per-layer logits from HF's own hidden states, through the model's own final norm and head."""
    with torch.no_grad():
        hs = m.hf(input_ids=ids, output_hidden_states=True).hidden_states  # [emb, layer 0, ..., final normed]
    return hs


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_early_exit_loss_matches_an_independent_computation(family):
    m = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    ids = _ids()
    hs = _reference_terms(m, ids)
    y = ids[:, 1:].reshape(-1)
    final_logits = m.hf(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    ce_final = F.cross_entropy(final_logits, y)
    exit_logits = {i: m.adapter.lm_head(m.adapter.final_norm(hs[i + 1]))[:, :-1].reshape(-1, VOCAB) for i in (1, 2)}
    ce = {i: F.cross_entropy(exit_logits[i], y) for i in (1, 2)}
    p_final = F.softmax(final_logits, -1)
    kl = {i: (p_final * (F.log_softmax(final_logits, -1) - F.log_softmax(exit_logits[i], -1))).sum(-1).mean()
          for i in (1, 2)}
    with torch.no_grad():
        total, per = early_exit_loss(m, ids, active=[0, 1], scales=[0.25, 0.75], e_scale=0.5, distill=0.3)
    want = ce_final + 0.25 * (0.5 * ce[1] + 0.3 * kl[1]) + 0.75 * (0.5 * ce[2] + 0.3 * kl[2])
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per[3], ce_final)
    torch.testing.assert_close(per[1], ce[1])
    assert abs(float(ce[1].detach()) - float(ce_final.detach())) > 1e-3  # exits really differ from the final layer
    # one active exit: its scale is renormalised to 1
    with torch.no_grad():
        one, per1 = early_exit_loss(m, ids, active=[1], scales=[0.25, 0.75])
    torch.testing.assert_close(one, ce_final + ce[2], rtol=1e-5, atol=1e-5)
    assert set(per1) == {2, 3}


def test_distillation_at_a_temperature_matches_the_textbook_kl():
    """At T != 1 the KL term uses its own tempered log-softmax (the fused T = 1 path shares CE's), scaled by T^2."""
    m = tiny_model("llama", num_layers=4, exit_layers=(1,))
    ids = _ids()
    hs = _reference_terms(m, ids)
    y = ids[:, 1:].reshape(-1)
    t = 2.0
    final_logits = m.hf(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    exit_logits = m.adapter.lm_head(m.adapter.final_norm(hs[2]))[:, :-1].reshape(-1, VOCAB)
    kl = F.kl_div(F.log_softmax(exit_logits / t, -1), F.log_softmax(final_logits / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    want = F.cross_entropy(final_logits, y) + F.cross_entropy(exit_logits, y) + 0.4 * kl
    with torch.no_grad():
        total, _ = early_exit_loss(m, ids, active=[0], scales=[1.0], distill=0.4, distill_temperature=t)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    assert float(kl.detach()) > 1e-3  # the term is really there


def test_token_fraction_samples_the_same_positions_for_every_exit():
    m = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    ids = _ids(batch=4, length=16)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        a, pa = early_exit_loss(m, ids, active=[0, 1], scales=[0.5, 0.5], token_fraction=0.25, generator=g1)
        b, pb = early_exit_loss(m, ids, active=[0, 1], scales=[0.5, 0.5], token_fraction=0.25, generator=g2)
        full, pf = early_exit_loss(m, ids, active=[0, 1], scales=[0.5, 0.5])
    torch.testing.assert_close(a, b)  # seeded: repeatable
    torch.testing.assert_close(pa[3], pf[3])  # the final layer always covers every position
    assert float(pa[1]) != pytest.approx(float(pf[1]), abs=1e-6)  # a subset, not all positions
    with pytest.raises(ValueError, match="token_fraction"):
        early_exit_loss(m, ids, active=[0], scales=[1.0, 1.0], token_fraction=0.0)


def test_gradients_reach_the_shallow_layers_through_the_exit_loss():
    m = tiny_model("llama", num_layers=4, exit_layers=(0,))
    m.hf.train()
    ids = _ids()
    total, _ = early_exit_loss(m, ids, active=[], scales=[1.0])
    total.backward()
    g_plain = m.layers[0].mlp.down_proj.weight.grad.norm().item()
    m.hf.zero_grad()
    total, _ = early_exit_loss(m, ids, active=[0], scales=[1.0], e_scale=5.0)
    total.backward()
    g_ee = m.layers[0].mlp.down_proj.weight.grad.norm().item()
    assert g_ee > 1.5 * g_plain
