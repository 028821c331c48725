"""Lossless early exit (self-speculative decoding drafted by the exit controller): the tokens
are the full model's, whatever the controller, and the counters account for the work."""

import pytest
import torch

from conftest import VOCAB, tiny_model
from greencode.decoding import ConfidenceExit, ExitController, FixedExit, NeverExit, generate
from greencode.decoding import generate_lossless
from test_decoding_equivalence import RandomExit


@pytest.mark.parametrize("kv_strategy", ["propagate", "compute"])
def test_lossless_tokens_equal_the_full_model(family, kv_strategy):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    accepted = 0
    for n in range(6):
        prompt = torch.randint(3, VOCAB, (1, 4 + 3 * n), generator=g)
        full = generate(model, prompt, NeverExit(), 20).tokens
        for ctrl, k in ((FixedExit(model.exit_layers[0]), 4), (RandomExit(n), 3), (ConfidenceExit(0.05), 6),
                        (NeverExit(), 5)):
            out = generate_lossless(model, prompt, ctrl, 20, k_max=k, kv_strategy=kv_strategy)
            assert out.tokens == full, (type(ctrl).__name__, n)
            c = out.counters
            assert c["accepted"] <= c["drafted"] and c["rounds"] >= 1
            # every token after the first is either verified or drafted with every layer from an exact cache
            assert c["verified_tokens"] + c["exact_tokens"] >= len(full) - 1
            assert out.exit_layers == [model.final_layer] * 20
            accepted += c["accepted"]
    assert accepted > 0  # some drafts are accepted, so rounds emit more than one token


def test_lossless_stops_at_eos_and_checks_k(family):
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(8))
    full = generate(model, prompt, NeverExit(), 12).tokens
    eos = full[5]
    out = generate_lossless(model, prompt, FixedExit(model.exit_layers[0]), 12, eos_token_id=eos)
    assert out.tokens == full[:full.index(eos) + 1] and out.finish_reason == "eos"
    # a fixed exit drafts every time: k_max tokens per round after the round's exact first token
    # (LayerSkip's number of speculations), fewer only where max_new_tokens ends the last round
    for k in (1, 3):
        c = generate_lossless(model, prompt, FixedExit(model.exit_layers[0]), 30, k_max=k).counters
        assert c["drafted"] <= k * c["rounds"] and c["drafted"] >= k * (c["rounds"] - 1), (k, c)
    with pytest.raises(ValueError, match="k_max"):
        generate_lossless(model, prompt, NeverExit(), 4, k_max=0)


def test_a_round_without_exits_needs_no_verification(family):
    """NeverExit drafts with every layer from an exact cache: no verification pass at all, and the
    work equals the full model's own loop (no token computed twice)."""
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    full = generate(model, prompt, NeverExit(), 16)
    out = generate_lossless(model, prompt, NeverExit(), 16, k_max=4)
    assert out.tokens == full.tokens
    assert out.counters["verified_tokens"] == 0 and out.counters["exact_tokens"] == 15
    assert out.counters["layers_run"] == full.counters["layers_run"]
    # a controller that exits needs verification again (and stays lossless)
    fixed = generate_lossless(model, prompt, FixedExit(model.exit_layers[0]), 16, k_max=4)
    assert fixed.tokens == full.tokens and fixed.counters["verified_tokens"] > 0


def test_lossless_never_copies_the_cache(family, monkeypatch):
    """One cache, advanced by the draft and rewritten in place by verification: copying it per round
    (12 layers x the whole context) cost more than a decode step on the CPU default."""
    import importlib

    gen_mod = importlib.import_module("greencode.decoding.generate")  # the module (the package exports a function)

    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(6))
    full = generate(model, prompt, NeverExit(), 14).tokens

    def no_copy(cache):
        raise AssertionError("the cache was copied")

    monkeypatch.setattr(gen_mod, "copy_cache", no_copy)
    monkeypatch.setattr(gen_mod, "rebuild_cache", no_copy)
    for ctrl in (FixedExit(model.exit_layers[0]), ConfidenceExit(0.05), NeverExit()):
        out = generate_lossless(model, prompt, ctrl, 14, k_max=4)
        assert out.tokens == full, type(ctrl).__name__


# ---------------------------------------------------------------- edge cases

class Tok:
    """A tokenizer stand-in: one letter per token id."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def wide_model(family, vocab=16):
    """4 layers, exits at 1 and 2, ``vocab`` tokens, weights drawn wider than the default init so the
    distributions are peaked and the exit layers' differ from the final layer's (total variation
    0.1-0.5)."""
    from greencode.config import ModelConfig
    from greencode.models import EarlyExitModel

    torch.manual_seed(0)
    mc = ModelConfig(family=family, hidden_size=32, num_layers=4, num_heads=4,
                     num_kv_heads=2 if family == "llama" else 4, intermediate_size=64, max_position_embeddings=64,
                     exit_layers=[1, 2])
    model = EarlyExitModel.from_config(mc, vocab_size=vocab, eos_token_id=2, bos_token_id=1, pad_token_id=0).eval()
    with torch.no_grad():
        for p in model.hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def perfect_drafter(family):
    """A tiny model whose layers above layer 1 add nothing (zero output projections): exiting at
    layer 1 gives the full model's prediction and the propagated K/V are the computed ones, so
    every draft at layer 1 is accepted (verification still runs: the tokens exited early)."""
    model = wide_model(family, VOCAB)
    with torch.no_grad():
        for i, layer in enumerate(model.adapter.layers):
            if i <= 1:
                continue
            for name, mod in layer.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ("o_proj", "out_proj", "down_proj",
                                                                                 "fc2"):
                    mod.weight.zero_()
                    if mod.bias is not None:
                        mod.bias.zero_()
    return model


def test_eos_and_stop_string_inside_an_accepted_draft(family):
    model = perfect_drafter(family)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(11))
    full = generate(model, prompt, NeverExit(), 12, tokenizer=Tok())
    j = next(i for i in range(2, 5) if full.tokens.index(full.tokens[i]) == i)  # a first occurrence inside round 1
    out = generate_lossless(model, prompt, FixedExit(1), 12, k_max=6, eos_token_id=full.tokens[j])
    assert out.tokens == full.tokens[:j + 1] and out.finish_reason == "eos"
    assert out.counters["rounds"] == 1 and out.counters["accepted"] == j == out.counters["drafted"]
    assert out.counters["verified_tokens"] == j  # the draft stopped at EOS: nothing drafted past it
    # a stop string: the same tokens and text as the loop's own stop-string handling
    stop = full.text[j]
    assert stop not in full.text[:j]
    ref = generate(model, prompt, NeverExit(), 12, tokenizer=Tok(), stop_strings=[stop])
    out = generate_lossless(model, prompt, FixedExit(1), 12, k_max=6, tokenizer=Tok(), stop_strings=[stop])
    assert (out.tokens, out.text, out.finish_reason) == (ref.tokens, ref.text, "stop") == (full.tokens[:j + 1],
                                                                                            full.text[:j], "stop")
    assert out.counters["rounds"] == 1
    with pytest.raises(ValueError, match="tokenizer"):
        generate_lossless(model, prompt, FixedExit(1), 4, stop_strings=["x"])


def test_max_new_tokens_reached_mid_draft(family):
    for model in (perfect_drafter(family), tiny_model(family)):
        prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(12))
        full = generate(model, prompt, NeverExit(), 11).tokens
        for m in range(1, 12):
            for ctrl in (FixedExit(1), RandomExit(m)):
                out = generate_lossless(model, prompt, ctrl, m, k_max=4)
                assert out.tokens == full[:m] and out.finish_reason == "length", (m, type(ctrl).__name__)
                # nothing drafted or verified past max_new_tokens
                assert out.counters["drafted"] < m and out.counters["verified_tokens"] <= m


def test_cancellation_and_on_token_see_verified_tokens_only(family):
    model = perfect_drafter(family)
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(13))
    full = generate(model, prompt, NeverExit(), 16).tokens
    seen, polls = [], []
    out = generate_lossless(model, prompt, FixedExit(1), 16, k_max=3,
                            on_token=lambda t, layer: seen.append((t, layer)),
                            should_stop=lambda: len(polls.append(len(seen)) or polls) >= 3)
    assert out.finish_reason == "cancelled" and polls == [1, 1, 1]  # polled every step, drafting or not
    # a draft not verified when it was cancelled is dropped: the output is what was streamed
    assert out.tokens == full[:1] and seen == [(full[0], model.final_layer)]
    seen.clear()
    out = generate_lossless(model, prompt, FixedExit(1), 16, k_max=3,
                            on_token=lambda t, layer: seen.append((t, layer)), should_stop=lambda: len(seen) >= 5)
    assert out.finish_reason == "cancelled" and out.tokens == full[:len(out.tokens)] and 5 <= len(out.tokens) < 16
    assert seen == [(t, model.final_layer) for t in out.tokens]  # every verified token, in order, once
    # a generation that finishes is not cancelled, and on_token sees the whole output
    seen.clear()
    done = generate_lossless(model, prompt, FixedExit(1), 16, k_max=3,
                             on_token=lambda t, layer: seen.append((t, layer)), should_stop=lambda: False)
    assert done.finish_reason == "length" and done.tokens == full and [t for t, _ in seen] == full


def test_a_draft_rejected_at_its_first_drafted_token(family):
    model = wide_model(family, VOCAB)  # exits that often disagree with the final layer
    g = torch.Generator().manual_seed(14)
    for _ in range(50):  # a prompt whose first drafted token (exit at layer 1) is not the full model's
        prompt = torch.randint(3, VOCAB, (1, 6), generator=g)
        full = generate(model, prompt, NeverExit(), 10).tokens
        if generate(model, prompt, FixedExit(1), 2).tokens[1] != full[1]:
            break
    else:
        pytest.fail("no prompt with a rejected first draft")
    out = generate_lossless(model, prompt, FixedExit(1), 2, k_max=3)
    assert out.tokens == full[:2]
    c = out.counters
    assert (c["rounds"], c["drafted"], c["accepted"], c["verified_tokens"]) == (1, 1, 0, 1)
    assert generate_lossless(model, prompt, FixedExit(1), 10, k_max=3).tokens == full


def test_prompt_at_the_context_limit(family):
    model = tiny_model(family)  # 256 positions
    limit = model.hf.config.max_position_embeddings
    prompt = torch.randint(3, VOCAB, (1, limit - 6), generator=torch.Generator().manual_seed(15))
    full = generate(model, prompt, NeverExit(), 6).tokens
    for ctrl in (FixedExit(1), ConfidenceExit(0.05), NeverExit()):
        assert generate_lossless(model, prompt, ctrl, 6, k_max=4).tokens == full
    with pytest.raises(ValueError, match="exceeds the model's context of 256 positions"):
        generate_lossless(model, prompt, FixedExit(1), 7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_lossless(model, prompt, FixedExit(1), 0)


# ---------------------------------------------------------------- draft length chosen as it goes

def test_draft_threshold_stops_drafting_and_stays_lossless(family):
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(16))
    full = generate(model, prompt, NeverExit(), 16).tokens
    base = generate_lossless(model, prompt, FixedExit(1), 16, k_max=4)
    zero = generate_lossless(model, prompt, FixedExit(1), 16, k_max=4, draft_threshold=0.0)
    one = generate_lossless(model, prompt, FixedExit(1), 16, k_max=4, draft_threshold=1.0)
    assert base.tokens == zero.tokens == one.tokens == full
    # threshold 0 never stops a draft: the same rounds and the same work (the confidence is read off the logits
    # that chose the token at its exit layer: no extra LM head)
    assert zero.counters["rounds"] == base.counters["rounds"] and zero.counters["draft_threshold_stops"] == 0
    assert zero.counters["lm_head_calls"] == base.counters["lm_head_calls"]
    # threshold 1 stops every draft after its first drafted token
    assert one.counters["drafted"] <= one.counters["rounds"]
    assert one.counters["draft_threshold_stops"] > 0 and one.counters["rounds"] > base.counters["rounds"]
    conf = generate_lossless(model, prompt, ConfidenceExit(0.02), 16, k_max=4, draft_threshold=0.5)
    assert conf.tokens == full
    with pytest.raises(ValueError, match="draft_threshold"):
        generate_lossless(model, prompt, FixedExit(1), 4, draft_threshold=1.5)


def test_draft_threshold_config():
    from pathlib import Path

    from greencode.config import ConfigError, load_config

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    assert load_config(smoke).eval.lossless_draft_threshold is None  # default: drafting as before
    assert load_config(smoke, ["eval.lossless_draft_threshold=0.6"]).eval.lossless_draft_threshold == 0.6
    with pytest.raises(ConfigError, match="lossless_draft_threshold"):
        load_config(smoke, ["eval.lossless_draft_threshold=1.5"])


def test_draft_threshold_reads_the_exit_layers_max_probability(family):
    """The threshold compares the max softmax probability of the distribution the tentative token
    was chosen from, at its exit layer: thresholds just above and below that value of the first
    drafted token stop the draft there or let it go on."""
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(17))
    ref = generate(model, prompt, FixedExit(2), 2, return_logits=True)  # token 1: exited at layer 2
    conf = float(torch.softmax(ref.logits[1], -1).max())
    above = generate_lossless(model, prompt, FixedExit(2), 3, k_max=4, draft_threshold=min(1.0, conf * 1.001))
    below = generate_lossless(model, prompt, FixedExit(2), 3, k_max=4, draft_threshold=conf * 0.999)
    assert above.counters["draft_threshold_stops"] >= 1 and above.counters["rounds"] >= 2
    assert below.counters["rounds"] <= above.counters["rounds"]


# ---------------------------------------------------------------- speculative sampling

def test_sampling_probs_match_the_loops_token_selection():
    """The q and p of the acceptance test are the distributions the loop really samples from: with
    the same generator state, sampling from them picks the loop's token."""
    from greencode.decoding.steps import sampling_probs, select_token

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        logits = torch.randn(50, generator=g) * 3
        for temperature, top_p, top_k in ((1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.5, 0.8, 12), (2.0, 0.3, 1)):
            probs = sampling_probs(logits, temperature, top_p, top_k)
            assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
            want = select_token(logits, True, temperature, top_p, top_k, torch.Generator().manual_seed(trial))
            got = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(trial)))
            assert got == want
    rows = torch.randn(3, 50, generator=g)
    batched = sampling_probs(rows, 0.8, 0.9, 7)
    for r in range(3):
        assert torch.allclose(batched[r], sampling_probs(rows[r], 0.8, 0.9, 7))


def test_sampling_is_seeded_and_greedy_unchanged(family):
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(18))
    kw = dict(do_sample=True, temperature=1.2, top_k=30, top_p=0.95)
    a = generate_lossless(model, prompt, FixedExit(1), 12, k_max=4, seed=5, **kw)
    b = generate_lossless(model, prompt, FixedExit(1), 12, k_max=4, seed=5, **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    others = {tuple(generate_lossless(model, prompt, FixedExit(1), 12, k_max=4, seed=s, **kw).tokens)
              for s in range(6, 10)}
    assert len(others | {tuple(a.tokens)}) > 1
    assert a.counters["residual_samples"] <= a.counters["drafted"] - a.counters["accepted"]
    full = generate(model, prompt, NeverExit(), 12).tokens
    greedy = generate_lossless(model, prompt, FixedExit(1), 12, k_max=4, do_sample=True, temperature=0.0, seed=5)
    assert greedy.tokens == full


def _two_sample_chi2(a: list, b: list, min_count: int = 20) -> tuple[float, int, float]:
    """Chi-square test of homogeneity of two samples of categories (categories with fewer than
    ``min_count`` draws in both samples together pooled into one); returns (statistic, degrees of
    freedom, p-value by the Wilson-Hilferty approximation, accurate to a few percent here)."""
    import math
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    keys = set(ca) | set(cb)
    big = [k for k in keys if ca[k] + cb[k] >= min_count]
    rows = [[ca[k] for k in big], [cb[k] for k in big]]
    rest = [sum(ca[k] for k in keys if k not in big), sum(cb[k] for k in keys if k not in big)]
    if rest[0] + rest[1] > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    na, nb = len(a), len(b)
    stat = 0.0
    for j in range(len(rows[0])):
        col = rows[0][j] + rows[1][j]
        for n, obs in ((na, rows[0][j]), (nb, rows[1][j])):
            exp = col * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(rows[0]) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return stat, df, 0.5 * math.erfc(z / math.sqrt(2))


class CoinExit(ExitController):
    """Exits at each checked exit point with probability ``rate``, from one generator that every
    round continues (RandomExit restarts with each ``generate`` call, so each round would repeat
    the same exits)."""

    def __init__(self, rate: float, seed: int):
        self.rate = rate
        self.gen = torch.Generator().manual_seed(seed)

    def should_exit(self, layer, hidden, normed, logits):
        return bool(torch.rand((), generator=self.gen) < self.rate)


@pytest.mark.parametrize("family,settings", [
    ("llama", dict(exit_rate=1.0, k_max=4, temperature=1.0, top_p=1.0, top_k=0, eos=None, draft_threshold=None)),
    ("opt", dict(exit_rate=0.15, k_max=2, temperature=0.8, top_p=0.9, top_k=8, eos=0, draft_threshold=0.3)),
])
def test_speculative_sampling_matches_the_full_models_distribution(family, settings):
    """Chi-square over many seeded draws of the first three tokens (their joint outcome, and each
    position's token, EOS included): lossless sampling against the full model's own sampling.
    Negative control: the drafter's own samples (what accepting every draft would give) fail the
    same test. The llama case drafts every token at layer 1 (every round verified, many
    rejections); the opt case exits rarely (many rounds without exits, whose last token is carried
    into the next round), stops at EOS and drafts with a threshold."""
    model = wide_model(family)
    prompt = [3, 5, 7, 9]
    n = 1500
    kw = dict(do_sample=True, temperature=settings["temperature"], top_p=settings["top_p"], top_k=settings["top_k"],
              eos_token_id=settings["eos"])
    # one batched call, a row per draw; seed=None: the rows draw one after another from torch's global
    # generator (with a seed every row would repeat the same draws)
    torch.manual_seed(1)
    full = [tuple(r.tokens) for r in generate(model, prompt, [NeverExit()] * (2 * n), 3, **kw)]
    draft = [tuple(r.tokens) for r in generate(model, prompt, [FixedExit(1)] * n, 3, **kw)]
    assert len(set(full)) > 20
    ctrl = FixedExit(1) if settings["exit_rate"] == 1.0 else CoinExit(settings["exit_rate"], seed=4)
    lossless, residual, exact = [], 0, 0
    for s in range(n):
        out = generate_lossless(model, prompt, ctrl, 3, k_max=settings["k_max"], seed=1000 + s,
                                draft_threshold=settings["draft_threshold"], **kw)
        lossless.append(tuple(out.tokens))
        residual += out.counters["residual_samples"]
        exact += out.counters["exact_tokens"]
    assert residual > 20  # rejections happen, so the residual distribution is exercised
    if settings["exit_rate"] < 1:
        assert exact > 500  # and rounds without exits
    if settings["eos"] is not None:
        assert sum(len(t) < 3 for t in full) > 100 and sum(len(t) < 3 for t in lossless) > 100

    def views(sample):  # the joint outcome, then each position's token (None: ended before it)
        yield "joint", sample
        for pos in (1, 2):
            yield f"token {pos}", [t[pos] if len(t) > pos else None for t in sample]

    for (name, a), (_, b) in zip(views(lossless), views(full[:n])):
        _, df, p_value = _two_sample_chi2(a, b)
        assert df >= 5 and p_value > 1e-3, (name, df, p_value)
    _, df, p_control = _two_sample_chi2(draft, full[n:])
    assert p_control < 1e-6, (df, p_control)  # the test can tell a wrong distribution
    # full-model samples against themselves: the test's own calibration
    assert _two_sample_chi2(full[:n], full[n:])[2] > 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_verification_reuses_the_drafts_exact_lower_layers(family, seed):
    """Verifying a draft whose tokens exited at random exit points: the logits after every fed
    token and the cache afterwards equal the full model's on prompt + those tokens (HF forward, no
    cache), while each fed token ran only the layers above the lowest exit up to it."""
    from greencode.decoding import RandomExit, prefill
    from greencode.decoding.generate import DecodeBatch, Row
    from greencode.decoding.speculative import Block, block_logits
    from greencode.decoding.steps import layer_kv

    model = tiny_model(family, num_layers=6, exit_layers=(1, 2, 3))
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
    start = prompt.shape[1]
    batch = DecodeBatch(model)
    row = Row(controller=RandomExit(0.4, seed), max_new_tokens=6, keep_states=True, return_logits=True)
    batch.add([row], prompt)
    for _ in range(5):  # a normal row drafts: tokens 0..4 fed with exits, token 5 chosen
        batch.step()
    d, m = row.tokens, 5
    assert len(row.kept_states) == m
    exits = row.exit_layers[1:]  # exits[i]: the exit of the step that fed d[i]
    exact = [min(exits[:i + 1]) for i in range(m)]
    [(logits, layers_run, heads)] = block_logits(model, batch.cache, None, [
        Block(0, d[:m], start, exact, row.kept_states, row.logits_seen[1:])])
    whole = torch.cat([prompt, torch.tensor([d[:m]])], dim=1)
    with torch.inference_mode():
        ref = model.hf(whole).logits[0, start:]  # row i: the full model's logits after d[i]
    torch.testing.assert_close(torch.stack(logits), ref, atol=2e-4, rtol=1e-4)
    ref_cache = prefill(model, whole).cache
    for j in range(model.num_layers):
        for got, want in zip(layer_kv(batch.cache, j), layer_kv(ref_cache, j)):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # work: fed token i needs the layers above E_i = min(exits of the steps feeding tokens 0..i)
    assert layers_run == sum(model.num_layers - 1 - e for e in exact)
    assert heads == sum(e < model.final_layer for e in exact)
    assert any(e < model.final_layer for e in exits)  # the draft exited early somewhere: layers were saved
    assert layers_run < m * model.num_layers


def test_reusing_verification_equals_full_verification_with_less_work(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(12)
    saved = 0
    for n in range(4):
        prompt = torch.randint(3, VOCAB, (1, 5 + 4 * n), generator=g)
        for ctrl in (FixedExit(model.exit_layers[1]), ConfidenceExit(0.05)):
            reuse = generate_lossless(model, prompt, ctrl, 16, k_max=4)
            full = generate_lossless(model, prompt, ctrl, 16, k_max=4, verify="full")
            assert reuse.tokens == full.tokens
            assert reuse.counters["verified_tokens"] == full.counters["verified_tokens"]
            saved += full.counters["layers_run"] - reuse.counters["layers_run"]
            assert reuse.counters["layers_run"] <= full.counters["layers_run"]
    assert saved > 0
    with pytest.raises(ValueError, match="verify="):
        generate_lossless(model, prompt, NeverExit(), 4, verify="partial")


# ---------------------------------------------------------------- lossless rows in the batch

def test_lossless_rows_step_beside_lossy_rows(family):
    """A lossless row is a row of the batch: several of them step beside lossy rows, rows join
    mid-way, rejected drafts roll positions back, and every greedy row equals its run alone (each
    lossless one the full model's output)."""
    from greencode.decoding.generate import DecodeBatch, Row

    model = wide_model(family, VOCAB)  # exits that often disagree with the final layer: drafts get rejected
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, VOCAB, (5 + 3 * i,), generator=g).tolist() for i in range(6)]
    specs = [(FixedExit(1), True, {}), (FixedExit(1), False, {}), (ConfidenceExit(0.05), True, {}),
             (FixedExit(2), True, dict(do_sample=True, temperature=0.9, seed=3)), (NeverExit(), False, {}),
             (FixedExit(2), True, {})]
    alone = []
    for p, (ctrl, lossless, kw) in zip(prompts, specs):
        run = generate_lossless(model, p, ctrl, 12, k_max=3, **kw) if lossless else generate(model, p, ctrl, 12, **kw)
        alone.append(run.tokens)
    for p, (ctrl, lossless, kw), want in zip(prompts, specs, alone):
        if lossless and not kw:
            assert want == generate(model, p, NeverExit(), 12).tokens
    def run_batch():
        batch = DecodeBatch(model)
        rows = [Row(controller=ctrl, max_new_tokens=12, lossless=lossless, k_max=3, **kw)
                for ctrl, lossless, kw in specs]
        batch.add(rows[:3], prompts[:3])
        batch.step()
        batch.step()
        batch.add(rows[3:], prompts[3:])
        while batch.rows:
            batch.step()
        return rows

    rows = run_batch()
    greedy = [k for k, (_, _, kw) in enumerate(specs) if not kw]
    assert [rows[k].tokens for k in greedy] == [alone[k] for k in greedy]
    # a sampled lossless row verifies when the batch's lossless rows do (its drafts end elsewhere than alone), so
    # its draws differ from its run alone; its distribution is the full model's either way (the chi-square test),
    # and with its seed the batch is reproducible
    assert [r.tokens for r in run_batch()] == [r.tokens for r in rows]
    assert sum(r.counters["accepted"] < r.counters["drafted"] for r in rows if r.lossless) >= 1  # rejections
    assert all(r.exit_layers == [model.final_layer] * 12 for r in rows if r.lossless)


def test_lossless_rows_return_the_full_models_log_probabilities(family):
    """A lossless row's log probabilities are the full model's for the tokens it emits (from the
    verification pass), not the draft's exit layer's."""
    from greencode.decoding.generate import DecodeBatch, Row

    model = wide_model(family, VOCAB)
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(23)).tolist()
    rows = [Row(controller=NeverExit(), max_new_tokens=10, logprobs=2, return_logits=True),
            Row(controller=FixedExit(1), max_new_tokens=10, logprobs=2, return_logits=True, lossless=True, k_max=3)]
    batch = DecodeBatch(model)
    batch.add(rows, [prompt, prompt])
    while batch.rows:
        batch.step()
    full, lossless = rows
    assert lossless.tokens == full.tokens and lossless.counters["accepted"] < lossless.counters["drafted"]
    assert len(lossless.token_logprobs) == len(lossless.logits_seen) == 10
    torch.testing.assert_close(torch.tensor(lossless.token_logprobs), torch.tensor(full.token_logprobs),
                               atol=1e-4, rtol=1e-4)
    assert [[i for i, _ in t] for t in lossless.top_logprobs] == [[i for i, _ in t] for t in full.top_logprobs]
