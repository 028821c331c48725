"""Cheap exit signals (greencode.decoding.signals): candidate logits equal the full head's entries,
the MAC count matches a hand computation on a tiny config, the features are finite and shaped as
stated, and the online per-check path computes what the offline pass computes."""

import pytest
import torch

from conftest import VOCAB, tiny_model
from greencode.config import ConfigError
from greencode.decoding import policy_observation
from greencode.decoding.signals import (FEATURES, CheapSignals, ContextBigrams, ModelShape, bigram_table, check_candidates,
                                        candidate_logits, candidate_stats, context_candidates, exit_signals,
                                        feature_names, head_parts, low_rank_factor, macs_in_layers, parse_source,
                                        signal_macs, token_macs)


def _states(model, seq=9, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    every = type(model)(model.hf, sorted(set(model.exit_layers) | {model.exit_layers[0] - 1}))
    with torch.no_grad():
        hs = every.exit_hidden_states(ids)
    by_layer = dict(zip(every.exit_points, hs))
    return ids, by_layer


def test_candidate_logits_equal_the_full_heads_entries(family):
    model = tiny_model(family)
    ids, by_layer = _states(model)
    weight, bias = head_parts(model)
    for layer in model.exit_layers:
        h = by_layer[layer].reshape(-1, model.hidden_size)
        full = model.decode(h)  # [N, V]
        normed = policy_observation(model, h, "normed")
        cands = torch.randint(0, VOCAB, (h.shape[0], 5), generator=torch.Generator().manual_seed(layer))
        got = candidate_logits(weight, bias, normed, cands)
        torch.testing.assert_close(got, torch.gather(full, 1, cands), rtol=1e-5, atol=1e-5)


def test_candidate_stats_by_hand():
    st = candidate_stats(torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(st["max_prob"][0], torch.tensor(0.25))
    torch.testing.assert_close(st["margin"][0], torch.tensor(0.0))
    torch.testing.assert_close(st["neg_entropy"][0], -torch.log(torch.tensor(4.0)))
    e2 = torch.exp(torch.tensor(2.0))
    torch.testing.assert_close(st["max_prob"][1], e2 / (e2 + 3))
    torch.testing.assert_close(st["margin"][1], (e2 - 1) / (e2 + 3))
    assert st["argmax"].tolist() == [0, 0]


def test_mac_count_matches_a_hand_computation():
    """Tiny Llama: hidden 32, 4 heads (head_dim 8), 2 KV heads, MLP 128, vocab 97."""
    model = tiny_model("llama", hidden_size=32, exit_layers=(1, 2))
    shape = ModelShape.of(model)
    h, v, k = 32, VOCAB, 4
    layer = h * h + 2 * (h * 16) + h * h + 3 * h * 128  # q, k, v (2 heads x 8), o, gate/up/down
    assert shape.layer_macs == layer == 15360
    assert (shape.head_in, shape.vocab_size, shape.n_exit_points, shape.norm) == (h, v, 2, "rms")
    norm = 3 * h
    # a later exit point: norm + k candidate logits + 2k (softmax, entropy) + 2h (saturation)
    later = signal_macs(shape, "cheap", k=k, source="first_full", exit_index=1)
    assert later["macs"] == norm + k * h + 2 * k + 2 * h == 296
    # the first exit point with first_full: the full head instead of the candidates, and the layer below's
    # norm + squared norm for the saturation
    first = signal_macs(shape, "cheap", k=k, source="first_full", exit_index=0)
    assert first["macs"] == norm + v * h + 2 * k + 2 * h + (norm + h) == 3400
    # low_rank:R:M at the first exit point: the rank-R head (R x (h + v)) and the shortlist's M exact logits
    first_low = signal_macs(shape, "cheap", k=k, source="low_rank:8:16", exit_index=0)
    assert first_low["macs"] == norm + 8 * (h + v) + 16 * h + 2 * k + 2 * h + (norm + h) == 1840
    assert signal_macs(shape, "cheap", k=k, source="low_rank:8:16", exit_index=1)["macs"] == 296
    parts = signal_macs(shape, "cheap", k=k, source="low_rank", exit_index=0)["parts"]
    assert (parts["low_rank_head"], parts["shortlist_logits"]) == (32 * (h + v), 64 * h)
    first_bigram = signal_macs(shape, "cheap", k=k, source="bigram", exit_index=0)
    assert first_bigram["macs"] == norm + k * h + 2 * k + 2 * h + (norm + h) == 424
    assert signal_macs(shape, "full_head", exit_index=1)["macs"] == norm + v * h + 2 * v == 3394
    assert signal_macs(shape, "hidden", exit_index=1, readout=h)["macs"] == norm + h == 128
    assert signal_macs(shape, "saturation", exit_index=1)["macs"] == norm + 2 * h
    assert token_macs(shape, "cheap", 2, k=k, source="first_full") == 3400 + 296
    assert macs_in_layers(296, shape) == pytest.approx(296 / 15360)
    # the default's figure from the architecture notes: a full head is 2.65 layers (8195 x 256 / 790,528)
    big = ModelShape(hidden_size=256, head_in=256, vocab_size=8195, layer_macs=790528, n_exit_points=7)
    assert macs_in_layers(8195 * 256, big) == pytest.approx(2.654, abs=1e-3)


@pytest.mark.parametrize("source", ["first_full", "low_rank:8:16", "prev_token", "bigram", "context"])
def test_features_are_finite_shaped_and_the_same_online(family, source):
    model = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    ids, by_layer = _states(model, seq=7, batch=3)
    n, k, e = ids.numel(), 4, len(model.exit_layers)
    flat = {layer: hs.reshape(n, -1) for layer, hs in by_layer.items()}
    normed = [policy_observation(model, flat[layer], "normed") for layer in model.exit_layers]
    below = policy_observation(model, flat[model.exit_layers[0] - 1], "normed")
    prev_logits = model.decode(flat[model.final_layer]).roll(1, 0)  # any [N, V] logits will do here
    table = bigram_table(ids.tolist(), VOCAB, k)
    prev_exit = torch.randint(0, e + 1, (n,))
    full_first = model.decode(flat[model.exit_layers[0]])
    context = torch.cat([context_candidates(row, k, table) for row in ids.tolist()])  # [N, k], row by row
    with torch.no_grad():
        feats = exit_signals(model, normed, k=k, source=source, prev_exit=prev_exit, below=below,
                             full_logits_first=full_first, input_ids=ids.reshape(-1), prev_logits=prev_logits,
                             bigram=table, context=context)
    assert feats.shape == (e, n, len(FEATURES) + e) and len(feature_names(e)) == feats.shape[-1]
    assert torch.isfinite(feats).all()
    names = feature_names(e)
    col = {c: i for i, c in enumerate(names)}
    assert ((feats[..., col["cand_max_prob"]] > 0) & (feats[..., col["cand_max_prob"]] <= 1)).all()
    assert (feats[..., col["cand_margin"]] >= 0).all() and (feats[..., col["cand_neg_entropy"]] <= 1e-6).all()
    assert (feats[0, :, col["cand_top1_stable"]] == 0).all()  # nothing to compare with at the first exit
    for j in range(e):
        assert (feats[j, :, col[f"exit_index_{j}"]] == 1).all()
    torch.testing.assert_close(feats[0, :, col["prev_exit"]], prev_exit.float() / e)
    if source == "first_full":  # at the first exit point, the full head's top-k itself
        top = torch.softmax(full_first, -1).max(-1).values
        torch.testing.assert_close(feats[0, :, col["cand_top1_logit"]], full_first.max(-1).values)
        assert (feats[0, :, col["cand_max_prob"]] >= top - 1e-6).all()
    # online, check by check, through the raw states: the same numbers
    sig = CheapSignals(model, k=k, source=source, bigram=table)
    sig.start(ids.reshape(-1), prev_exit, prev_logits=prev_logits, context=context)
    sig.below(flat[model.exit_layers[0] - 1])
    with torch.no_grad():
        for j, layer in enumerate(model.exit_layers):
            got = sig.check(j, flat[layer], full_logits=full_first if j == 0 else None)
            torch.testing.assert_close(got, feats[j], rtol=1e-5, atol=1e-5)
    assert sig.macs_per_check(1) == signal_macs(ModelShape.of(model), "cheap", k=k, source=source,
                                                exit_index=1)["macs"]


def test_the_low_rank_source_is_the_heads_best_approximation_and_at_full_rank_the_full_heads_top_k(family):
    model = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    weight, bias = head_parts(model)
    d = weight.shape[1]
    a, b = low_rank_factor(weight, d)  # full rank: A B is W
    torch.testing.assert_close(a @ b, weight.float(), rtol=1e-4, atol=1e-5)
    assert low_rank_factor(weight, d)[0] is a  # cached
    a4, b4 = low_rank_factor(weight, 4)
    assert a4.shape == (weight.shape[0], 4) and b4.shape == (4, d)
    # Eckart-Young: the rank-4 error is the root of the squared singular values past the 4th
    sv = torch.linalg.svdvals(weight.detach().double())
    assert torch.linalg.matrix_norm(weight.double() - (a4 @ b4).double()).item() == pytest.approx(
        float(sv[4:].square().sum().sqrt()), rel=1e-4)
    ids, by_layer = _states(model, seq=7, batch=3)
    n, k, e = ids.numel(), 4, len(model.exit_layers)
    flat = {layer: hs.reshape(n, -1) for layer, hs in by_layer.items()}
    normed = [policy_observation(model, flat[layer], "normed") for layer in model.exit_layers]
    prev_exit = torch.full((n,), e)
    full_first = model.decode(flat[model.exit_layers[0]])
    with torch.no_grad():
        exact = exit_signals(model, normed, k=k, source="first_full", prev_exit=prev_exit,
                             full_logits_first=full_first)
        full_rank = exit_signals(model, normed, k=k, source=f"low_rank:{d}:8", prev_exit=prev_exit)
        low = exit_signals(model, normed, k=k, source="low_rank:2:4", prev_exit=prev_exit)
    torch.testing.assert_close(full_rank, exact, rtol=1e-4, atol=1e-4)
    # at rank 2 with no room to re-rank (M = k) the candidates are the approximate top-k, so the features
    # differ somewhere; their logits
    # are still exact: the top candidate logit is at most the full head's maximum
    col = {c: i for i, c in enumerate(feature_names(e))}
    assert not torch.allclose(low, exact, atol=1e-4)
    assert (low[0, :, col["cand_top1_logit"]] <= full_first.max(-1).values + 1e-5).all()
    # online the full head's logits are ignored (the source never pays for them)
    sig = CheapSignals(model, k=k, source="low_rank:2:4")
    sig.start(ids.reshape(-1), prev_exit)
    with torch.no_grad():
        got = sig.check(0, flat[model.exit_layers[0]], full_logits=full_first)
    torch.testing.assert_close(got, low[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [("low_rank:x", "positive integers"), ("low_rank:0", "positive integers"),
                                       ("low_rank:8:4:2", "positive integers"), ("first_full:4", "choose one of"),
                                       ("nope", "choose one of")])
def test_bad_candidate_sources_name_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_source(bad)
    with pytest.raises(ConfigError, match="rank must be in"):
        low_rank_factor(torch.zeros(6, 4), 5)
    with pytest.raises(ConfigError, match="shortlist M=3 must hold"):
        check_candidates(4, "low_rank:8:3")
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        CheapSignals(tiny_model("llama"), k=4, source=f"low_rank:4:{VOCAB + 1}")
    assert parse_source("low_rank") == ("low_rank", (32, 64))
    assert parse_source("low_rank:16") == ("low_rank", (16, 64)) and parse_source("low_rank:8:16") == ("low_rank", (8, 16))
    assert parse_source("first_full") == ("first_full", None)


def test_context_bigrams_by_hand():
    fill = torch.tensor([[9, 8, 7]] * 10)  # every token's fill: 9, 8, 7
    ctx = ContextBigrams(3, fill)
    seen = []
    for t in [1, 2, 1, 3, 1]:
        ctx.push(t)
        seen.append(ctx.candidates(t))
    assert seen[0] == [9, 8, 7]  # nothing followed 1 yet
    assert seen[1] == [9, 8, 7]  # nothing followed 2 yet
    assert seen[2] == [2, 9, 8]  # 1 was followed by 2
    assert seen[3] == [9, 8, 7]
    assert seen[4] == [3, 2, 9]  # 1 -> 3 most recently, then 1 -> 2
    table = context_candidates([1, 2, 1, 3, 1], 3, fill)
    assert table.tolist() == seen


def test_bigram_table_and_bad_arguments():
    table = bigram_table([[1, 2, 1, 2, 1, 3], [4, 4]], vocab_size=6, k=2)
    assert table[1].tolist() == [2, 3]  # 1->2 twice, 1->3 once
    assert table[2].tolist() == [1, 2]  # 2->1 twice, then the most frequent overall not yet in (1: 3, 2: 2, 4: 2)
    assert table[4].tolist() == [4, 1]
    assert table[5].tolist() == [1, 2]  # unseen: the most frequent tokens, ties by the lower id
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="candidates k"):
        CheapSignals(model, k=11)
    with pytest.raises(ConfigError, match="candidate source"):
        CheapSignals(model, source="nope")
    with pytest.raises(ConfigError, match="bigram"):
        CheapSignals(model, source="bigram")
