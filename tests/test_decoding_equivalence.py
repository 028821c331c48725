"""The decoding loop against HuggingFace and against a slow cache-free reference."""

import random

import pytest
import torch

from conftest import VOCAB, TinyPolicy, tiny_model
from greencode.decoding import ExitController, FixedExit, NeverExit, generate


class RandomExit(ExitController):
    """Exits at a seeded random exit point (or not at all): varied exits for the tests."""

    name = "random"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def should_exit(self, layer, hidden, normed, logits):
        return self.rng.random() < 0.4


def test_never_exit_matches_hf_generate(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    for n in range(10):
        prompt = torch.randint(3, VOCAB, (1, 3 + 2 * n), generator=g)
        ref = model.hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, prompt.shape[1]:]
        out = generate(model, prompt, NeverExit(), 16)
        assert out.tokens == ref.tolist()
        assert out.exit_layers == [model.final_layer] * 16
        assert out.counters["layers_run"] == 15 * model.num_layers


def test_final_layer_logits_match_hf_forward(family):
    model = tiny_model(family)
    x = torch.randint(3, VOCAB, (2, 11))
    ours = model.exit_logits(x)
    torch.testing.assert_close(ours[-1], model.hf(x).logits)
    assert len(ours) == len(model.exit_points)


def test_layer_k_decoding_is_norm_then_head(family):
    model = tiny_model(family)
    x = torch.randint(3, VOCAB, (1, 9))
    hs = model.hf.model(x, output_hidden_states=True).hidden_states  # [emb, layer0, ..., normed final]
    states = model.exit_hidden_states(x)
    for point, layer in enumerate(model.exit_layers):
        torch.testing.assert_close(states[point], hs[layer + 1])
        if family == "llama":
            hand = model.hf.lm_head(model.hf.model.norm(hs[layer + 1]))
        else:
            hand = model.hf.lm_head(model.hf.model.decoder.final_layer_norm(hs[layer + 1]))
        torch.testing.assert_close(model.decode(states[point]), hand)


def slow_reference_logits(model, tokens: list[int], exit_of_position: list[int]) -> torch.Tensor:
    """Re-run the whole sequence without a cache: at layer j, positions whose token exited
    earlier keep their exit hidden state (their K/V at layer j come from it: state
    propagation), the others run the layer. Returns logits per position."""
    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens)).unsqueeze(0)
    exits = torch.tensor(exit_of_position).view(1, -1, 1)
    with torch.no_grad():
        h = model.adapter.embed(ids, pos)
        kw = model.adapter.layer_kwargs(h, pos)
        for j, layer in enumerate(model.layers):
            out = layer(h, attention_mask=None, **kw)  # sdpa: causal without a mask
            out = out[0] if isinstance(out, tuple) else out
            h = torch.where(exits >= j, out, h)
        return model.decode(h)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_exits_match_cache_free_reference(family, seed):
    model = tiny_model(family, num_layers=6, exit_layers=(0, 1, 2, 4))
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(seed)).tolist()[0]
    out = generate(model, prompt, RandomExit(seed), 14, return_logits=True)
    assert len(set(out.exit_layers)) > 2, "the test needs varied exits"
    # generated token i (i >= 1) came from processing position len(prompt) + i - 1
    seq = prompt + out.tokens[:-1]
    exit_of_position = [model.final_layer] * len(prompt) + out.exit_layers[1:]
    ref = slow_reference_logits(model, seq, exit_of_position)
    for i in range(len(out.tokens)):
        torch.testing.assert_close(out.logits[i], ref[len(prompt) - 1 + i], rtol=1e-4, atol=1e-4)
    assert out.tokens == ref[len(prompt) - 1:].argmax(-1).tolist()
    assert out.counters["kv_propagated_layers"] == sum(model.final_layer - e for e in out.exit_layers[1:])


def test_reference_is_sensitive_to_the_cache(family):
    """Negative control: an exact cache (deeper layers really run) differs from propagation,
    so the reference test above would notice a loop that skipped or corrupted propagation."""
    model = tiny_model(family, num_layers=6, exit_layers=(0, 1, 2, 4))
    prompt = list(range(3, 12))
    prop = generate(model, prompt, RandomExit(5), 10, return_logits=True)
    exact = generate(model, prompt, RandomExit(5), 10, return_logits=True, kv_strategy="compute")
    assert prop.exit_layers == exact.exit_layers and len(set(prop.exit_layers)) > 2
    assert not torch.allclose(torch.stack(prop.logits[2:]), torch.stack(exact.logits[2:]), atol=1e-4)
    assert exact.counters["layers_run"] == 9 * model.num_layers
    fixed = generate(model, prompt, FixedExit(1), 10)
    assert fixed.exit_layers[1:] == [1] * 9 and fixed.counters["layers_run"] == 9 * 2


def test_fused_propagation_equals_per_layer_projection(family):
    model = tiny_model(family, num_layers=6, exit_layers=(0, 1, 2, 4))
    for layer in model.layers:  # non-trivial norm affine parameters
        for p in layer.parameters():
            if p.dim() == 1:
                torch.nn.init.normal_(p, 1.0, 0.3)
    h = torch.randn(1, 3, model.hidden_size) * 3
    pos = torch.tensor([[7, 8, 9]])
    kw = model.adapter.layer_kwargs(h, pos)
    for start in (1, 3, 5):
        fused = model.adapter.propagate(start, h, kw)
        assert len(fused) == model.num_layers - start
        for j, (k, v) in enumerate(fused, start=start):
            k_ref, v_ref = model.adapter.kv_for_layer(j, h, kw)
            torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    # editing a deeper layer's weights in place (not layer 0's) rebuilds the fused weights
    with torch.no_grad():
        model.layers[4].self_attn.k_proj.weight.mul_(2.0)
        norm = getattr(model.layers[5], "input_layernorm", None) or model.layers[5].self_attn_layer_norm
        norm.weight.add_(0.5)

    def same_as_per_layer():
        for j, (k, v) in enumerate(model.adapter.propagate(1, h, kw), start=1):
            k_ref, v_ref = model.adapter.kv_for_layer(j, h, kw)
            torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)

    same_as_per_layer()
    # a parameter replaced by a new tensor (not edited in place), then a whole projection module replaced:
    # the cached walk over the modules notices both
    attn = model.layers[3].self_attn
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach() * 0.5)
    same_as_per_layer()
    new = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features, bias=attn.k_proj.bias is not None)
    attn.k_proj = new
    same_as_per_layer()


@pytest.mark.parametrize("kv_strategy", ["propagate", "compute"])
def test_controller_list_rows_equal_separate_runs(family, kv_strategy):
    """One prompt, one row per controller (shared prefill, batched layer steps): each row's
    tokens, exit layers, logits and work counters equal a run with that controller alone."""
    from greencode.decoding import ConfidenceExit, OracleExit, prefill

    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(5))

    def make():
        return [NeverExit(), FixedExit(model.exit_layers[0]), RandomExit(3), RandomExit(11), ConfidenceExit(0.02),
                OracleExit(), FixedExit(model.exit_layers[-1])]

    alone = [generate(model, prompt, c, 12, kv_strategy=kv_strategy, return_logits=True) for c in make()]
    rows = generate(model, prompt, make(), 12, kv_strategy=kv_strategy, return_logits=True,
                    prefilled=prefill(model, prompt))
    assert len(rows) == len(alone)
    assert len({tuple(r.exit_layers) for r in rows}) >= 4  # the rows really exit at different layers
    for a, b in zip(alone, rows):
        assert b.tokens == a.tokens and b.exit_layers == a.exit_layers
        for la, lb in zip(a.logits, b.logits):
            torch.testing.assert_close(lb, la, atol=2e-5, rtol=1e-4)
        for key in ("layers_run", "exit_checks", "lm_head_calls", "kv_propagated_layers", "decode_steps"):
            assert b.counters[key] == a.counters[key], key
        assert b.counters["batch_rows"] == 7


def test_controller_list_rows_stop_on_their_own_eos(family):
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    never = generate(model, prompt, NeverExit(), 10)
    eos = never.tokens[3]  # the full model emits it at step 3: that row stops there, the other goes on
    rows = generate(model, prompt, [NeverExit(), FixedExit(model.exit_layers[0])], 10, eos_token_id=eos)
    alone = generate(model, prompt, FixedExit(model.exit_layers[0]), 10, eos_token_id=eos)
    assert rows[0].tokens == never.tokens[:never.tokens.index(eos) + 1] and rows[0].finish_reason == "eos"
    assert rows[1].tokens == alone.tokens and rows[1].finish_reason == alone.finish_reason
    with pytest.raises(ValueError, match="for one row"):
        generate(model, prompt, [NeverExit(), NeverExit()], 4, on_token=lambda t, l: None)


@pytest.mark.parametrize("kv_strategy", ["propagate", "compute"])
def test_batch_of_prompts_rows_equal_batch_one(family, kv_strategy):
    """Ragged prompts, left-padded with per-row positions: each row exits at its own layer and
    its tokens, exit layers and logits equal decoding that prompt alone."""
    from greencode.decoding import ConfidenceExit

    model = tiny_model(family)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 9, 12)]

    def make():
        return [RandomExit(1), FixedExit(model.exit_layers[0]), NeverExit(), ConfidenceExit(0.02)]

    alone = [generate(model, p, c, 10, kv_strategy=kv_strategy, return_logits=True) for p, c in zip(prompts, make())]
    rows = generate(model, prompts, make(), 10, kv_strategy=kv_strategy, return_logits=True)
    assert len({tuple(r.exit_layers) for r in rows}) >= 3
    for a, b, p in zip(alone, rows, prompts):
        assert b.tokens == a.tokens and b.exit_layers == a.exit_layers and b.prompt_tokens == len(p)
        for la, lb in zip(a.logits, b.logits):
            torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
        for key in ("layers_run", "exit_checks", "lm_head_calls", "kv_propagated_layers"):
            assert b.counters[key] == a.counters[key], key
    # one controller for every prompt; equal-length prompts need no padding
    same = generate(model, [prompts[1], prompts[1]], NeverExit(), 6)
    assert same[0].tokens == same[1].tokens == generate(model, prompts[1], NeverExit(), 6).tokens
    with pytest.raises(ValueError, match="2 prompts but 3 controllers"):
        generate(model, prompts[:2], make()[:3], 4)


def test_one_controller_over_a_batch_of_prompts_decides_per_row(family):
    """A controller shared by every row decides for all rows at once (vectorised); each row
    still equals decoding its prompt alone."""
    from greencode.decoding import ConfidenceExit, EntropyExit, PolicyExit

    model = tiny_model(family)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 11, 8, 14, 9)]

    policy = TinyPolicy(model.hidden_size)
    probs = []
    for ctrl in (PolicyExit(policy, 0.5), ConfidenceExit(0.02), EntropyExit(6.0)):
        rows = generate(model, prompts, ctrl, 8)
        alone = [generate(model, p, ctrl, 8) for p in prompts]
        for a, b in zip(alone, rows):
            assert b.tokens == a.tokens and b.exit_layers == a.exit_layers, ctrl.name
        probs.append({tuple(r.exit_layers) for r in rows})
    assert any(len(p) > 1 for p in probs)  # rows of one batch left at different layers
