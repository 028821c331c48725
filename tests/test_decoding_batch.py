"""Batched early-exit decoding (DecodeBatch): rows that exited skip the deeper layers, rows
finish and leave independently, rows join mid-flight, and every row still equals decoding its
prompt alone with the same controller."""

import pytest
import torch
from conftest import VOCAB, TinyPolicy, tiny_model
from greencode.decoding import ConfidenceExit, FixedExit, NeverExit, PolicyExit, generate
from greencode.decoding.generate import DecodeBatch, Row
from greencode.decoding.steps import grow_layer_class, layer_kv


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _rows_through(layer):
    """Count the rows each call of ``layer`` processes."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(args[0].shape[0]),
                                             with_kwargs=True)
    return seen, handle


def test_exited_rows_skip_the_deeper_layers(family):
    """A row that exited at the first exit point is not run through the last layer (propagate);
    with kv_strategy=compute it is. The layer calls' row counts equal the per-row layers_run."""
    model = tiny_model(family)
    prompts = _prompts(3, (7, 12, 5, 9))
    ctrls = lambda: [FixedExit(model.exit_layers[0]), NeverExit(), FixedExit(model.exit_layers[0]), NeverExit()]  # noqa: E731
    out = {}
    for kv in ("propagate", "compute"):
        seen, handle = _rows_through(model.adapter.layers[-1])
        try:
            rows = generate(model, prompts, ctrls(), 6, kv_strategy=kv)
        finally:
            handle.remove()
        out[kv] = (seen, rows)
    seen_p, rows_p = out["propagate"]
    seen_c, _ = out["compute"]
    steps = 5  # 6 tokens: the first from the prefill
    assert seen_p[1:] == [2] * steps  # the prefill call (4 rows), then only the two rows that never exit
    assert seen_c[1:] == [4] * steps
    layers_run = sum(r.counters["layers_run"] for r in rows_p)
    assert layers_run == steps * (2 * model.num_layers + 2 * (model.exit_layers[0] + 1))


@pytest.mark.parametrize("skip_share", [0.0, 0.5, 2.0])  # always regrouped / carried, then regrouped / carried
@pytest.mark.parametrize("controller", ["never", "fixed", "confidence", "policy"])
def test_rows_joining_mid_flight_equal_batch_one(family, controller, skip_share):
    """Rows join a running batch (other prompt lengths, so both sides get padded), stop at their
    own length, and each row's tokens and exits equal decoding its prompt alone."""
    model = tiny_model(family)
    policy = TinyPolicy(model.hidden_size)

    def make():
        return {"never": NeverExit(), "fixed": FixedExit(model.exit_layers[0]),
                "confidence": ConfidenceExit(0.02), "policy": PolicyExit(policy, 0.45)}[controller]

    prompts = _prompts(11, (6, 15, 4, 21, 9))
    lengths = (9, 4, 7, 8, 5)
    alone = [generate(model, p, make(), n) for p, n in zip(prompts, lengths)]
    batch = DecodeBatch(model, skip_share=skip_share)
    rows = [Row(controller=make(), max_new_tokens=n) for n in lengths]
    batch.add(rows[:2], prompts[:2])
    batch.step()
    batch.step()
    batch.add(rows[2:4], prompts[2:4])  # one shorter, one longer than the rows already there
    batch.step()
    batch.add(rows[4:], prompts[4:])
    finished = []
    while batch.rows:
        finished += batch.step()
        assert len(batch.rows) == layer_kv(batch.cache, 0)[0].shape[0] or not batch.rows  # finished rows left
    for a, row in zip(alone, rows):
        res = batch.result(row)
        assert res.tokens == a.tokens and res.exit_layers == a.exit_layers
        assert res.counters["layers_run"] == a.counters["layers_run"]
    if controller != "never":
        assert any(layer != model.final_layer for r in rows for layer in r.exit_layers[1:])


def test_sampling_rows_use_their_own_generator(family):
    """With a seed, each row samples from its own generator: a row's tokens equal sampling its
    prompt alone with that seed, whatever else is in the batch."""
    model = tiny_model(family)
    prompts = _prompts(5, (8, 13, 6))
    kw = dict(do_sample=True, temperature=1.3, top_k=20, seed=17)
    alone = [generate(model, p, FixedExit(model.exit_layers[0]), 8, **kw) for p in prompts]
    rows = generate(model, prompts, FixedExit(model.exit_layers[0]), 8, **kw)
    assert [r.tokens for r in rows] == [a.tokens for a in alone]
    assert len({tuple(a.tokens) for a in alone}) > 1


def test_logprobs_are_the_log_softmax_of_the_choosing_logits(family):
    model = tiny_model(family)
    res = generate(model, _prompts(2, (9,))[0], FixedExit(model.exit_layers[0]), 6, return_logits=True, logprobs=3)
    assert len(res.token_logprobs) == len(res.tokens) == len(res.top_logprobs)
    for tok, lg, lp, top in zip(res.tokens, res.logits, res.token_logprobs, res.top_logprobs):
        ref = torch.log(torch.softmax(lg.double(), -1))
        assert abs(lp - float(ref[tok])) < 1e-4
        assert [i for i, _ in top] == ref.topk(3).indices.tolist()
        assert top[0][0] == tok  # greedy: the chosen token is the most likely one


def test_finished_rows_leave_and_padding_columns_are_trimmed(family):
    """When the longest prompt's row finishes, the columns that were padding for every row
    left are cut from the cache; the remaining rows go on unchanged."""
    model = tiny_model(family)
    prompts = _prompts(8, (20, 5, 6))
    batch = DecodeBatch(model)
    rows = [Row(controller=NeverExit(), max_new_tokens=n) for n in (2, 6, 6)]
    batch.add(rows, prompts)
    assert layer_kv(batch.cache, 0)[0].shape[2] == 20
    batch.step()  # the long row finishes (2 tokens)
    assert len(batch.rows) == 2
    keys = layer_kv(batch.cache, 0)[0]
    assert keys.shape[0] == 2 and keys.shape[2] == 6 + 1  # 6 real columns + the new position
    while batch.rows:
        batch.step()
    for p, row in zip(prompts[1:], rows[1:]):
        assert row.tokens == generate(model, p, NeverExit(), 6).tokens


def test_repeated_prompts_are_prefilled_once(family):
    """Rows repeating a prompt (several methods over several prompts, as the evaluator decodes
    them) share its prefill; each row equals decoding alone."""
    model = tiny_model(family)
    a, b = _prompts(4, (7, 13))
    ctrls = [NeverExit(), FixedExit(model.exit_layers[0]), ConfidenceExit(0.02)]
    seen, handle = _rows_through(model.adapter.layers[0])
    try:
        rows = generate(model, [a, a, a, b, b, b], ctrls * 2, 5)
    finally:
        handle.remove()
    assert seen[0] == 2  # the prefill ran two prompts
    for k, (prompt, got) in enumerate(zip([a] * 3 + [b] * 3, rows)):
        assert got.tokens == generate(model, prompt, ctrls[k % 3], 5).tokens


def test_cache_grows_in_place_between_steps(family):
    """Decoding appends each position into spare room of one buffer per layer (no copy of the whole
    layer per step); crop, row selection and copies still work (a changed tensor is re-buffered)."""
    import copy


    if grow_layer_class() is None:
        pytest.skip("this transformers has no DynamicLayer")
    model = tiny_model(family)
    batch = DecodeBatch(model)
    row = Row(controller=NeverExit(), max_new_tokens=8)
    batch.add([row], [_prompts(1, (9,))[0]])
    batch.step()
    ptrs = [layer_kv(batch.cache, 0)[0].data_ptr()]
    for _ in range(3):
        batch.step()
        ptrs.append(layer_kv(batch.cache, 0)[0].data_ptr())
    assert len(set(ptrs)) == 1  # the same buffer: positions written in place
    keys = layer_kv(batch.cache, 0)[0]
    assert keys.shape[2] == 9 + 4 and batch.cache.layers[0]._kbuf.shape[2] > keys.shape[2]
    clone = copy.deepcopy(batch.cache)
    batch.cache.crop(-2)
    batch.step()  # after a crop the next position lands where the cropped ones were
    assert layer_kv(batch.cache, 0)[0].shape[2] == 9 + 4 - 2 + 1
    assert layer_kv(clone, 0)[0].shape[2] == 9 + 4


def test_eager_buffers_grow_by_64_positions_and_a_compiled_step_gets_a_power_of_two():
    """An eager batch's K/V buffer holds the filled positions rounded up to 64 (a 131-token cache is not
    allocated, zeroed and copied at 256); the compiled step's view of it is a power of two."""
    if grow_layer_class() is None:
        pytest.skip("this transformers has no DynamicLayer")
    model = tiny_model("llama")
    batch = DecodeBatch(model)
    batch.add([Row(controller=NeverExit(), max_new_tokens=80)], [_prompts(2, (130,))[0]])
    batch.step()
    layer = batch.cache.layers[0]
    assert layer_kv(batch.cache, 0)[0].shape[2] == 131 and layer._kbuf.shape[2] == 192
    for _ in range(62):  # to 193 positions: one more 64
        batch.step()
    assert layer_kv(batch.cache, 0)[0].shape[2] == 193 and layer._kbuf.shape[2] == 256
    kb, vb, n = layer.reserve(1, static=True)
    assert (kb.shape[2], n) == (256, 193)  # already a power of two with room: kept
    batch.cache.crop(-70)  # 123 positions: the buffer stays; a static reserve keeps its 256
    assert layer.reserve(1, static=True)[0].shape[2] == 256
    fresh = DecodeBatch(model)
    fresh.add([Row(controller=NeverExit(), max_new_tokens=4)], [_prompts(2, (130,))[0]])
    fresh.step()
    assert fresh.cache.layers[0]._kbuf.shape[2] == 192
    assert fresh.cache.layers[0].reserve(1, static=True)[0].shape[2] == 256  # eager 192 -> a power of two


def test_chunked_prefill_equals_one_prefill_and_joins_a_running_batch(family):
    """A prompt prefilled in chunks has the one-shot prefill's logits and cache, and a row joining a
    running batch from it decodes the tokens it decodes alone."""
    from greencode.decoding import prefill, prefill_chunk

    model = tiny_model(family)
    g = torch.Generator().manual_seed(31)
    prompt = torch.randint(3, VOCAB, (1, 23), generator=g)
    whole = prefill(model, prompt)
    state = None
    for upto in (5, 6, 17, 23):
        state = prefill_chunk(model, prompt, upto, state)
    torch.testing.assert_close(state.logits, whole.logits, atol=1e-5, rtol=1e-5)
    for j in range(model.num_layers):
        for got, want in zip(layer_kv(state.cache, j), layer_kv(whole.cache, j)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="upto"):
        prefill_chunk(model, prompt, 23, state)
    other = torch.randint(3, VOCAB, (9,), generator=g).tolist()
    alone = generate(model, prompt, FixedExit(1), 8).tokens
    batch = DecodeBatch(model)
    first = Row(controller=NeverExit(), max_new_tokens=12)
    batch.add([first], [other])
    batch.step()
    late = Row(controller=FixedExit(1), max_new_tokens=8)
    batch.add([late], state.input_ids, prefilled=state)
    while batch.rows:
        batch.step()
    assert late.tokens == alone and first.tokens == generate(model, [other], NeverExit(), 12)[0].tokens


def _feature_policy(model, seed=1):
    from greencode.decoding.controllers import CANDIDATE_FEATURES, feature_size
    from greencode.rl import ExitPolicy

    feats = ["exit_index", "cosine_prev", "prev_exit", *CANDIDATE_FEATURES]
    torch.manual_seed(seed)
    policy = ExitPolicy(model.hidden_size + feature_size(feats, len(model.exit_layers)), [16],
                        metadata={"observation": "normed", "exit_layers": list(model.exit_layers), "features": feats,
                                  "candidates": {"source": "first_full", "k": 4}, "fingerprint": model.fingerprint()})
    with torch.no_grad():
        policy.action_net.weight.mul_(30.0)
        policy.policy_net[0].weight[:, model.hidden_size:].mul_(20.0)  # decisions that hang on the features
    return policy


@pytest.mark.parametrize("controller", ["policy_features", "cheap_confidence", "saturation"])
def test_per_row_copies_of_one_controller_decide_together_and_equal_batch_one(family, controller):
    """One controller with per-row state given to every row (a shared instance, as the evaluator and the
    endpoint do): each row gets its own copy, the copies' rows are decided in one call per exit point
    (decide_rows), and every row's tokens, exits and counters equal decoding its prompt alone."""
    from greencode.decoding import CheapConfidenceExit, SaturationExit

    model = tiny_model(family, num_layers=5, exit_layers=(1, 2, 3))
    policy = _feature_policy(model)
    make = {"policy_features": lambda t: PolicyExit(policy, t), "cheap_confidence": lambda t: CheapConfidenceExit(t),
            "saturation": lambda t: SaturationExit(t)}[controller]
    prompts = _prompts(5, (6, 15, 4, 21, 9))
    lengths = (9, 4, 7, 8, 5)
    # a threshold where the rows exit at several points (cheap confidence: a softmax over 4 candidates, >= 0.25)
    for thr in (0.5, 0.3, 0.7, 0.9, 0.1, 0.95, 0.05, 0.99, 0.27, 0.26, 0.28, 0.29, 0.35, 0.4):
        alone = [generate(model, p, make(thr), n) for p, n in zip(prompts, lengths)]
        if len({e for a in alone for e in a.exit_layers[1:]}) > 1:
            break
    else:
        pytest.fail("no threshold gave varied exits")
    shared = make(thr)
    groups = []
    real = type(shared).decide_rows

    def spy(self, layer, ctrls, *a):
        groups.append(len(ctrls))
        return real(self, layer, ctrls, *a)

    type(shared).decide_rows = spy
    try:
        batch = DecodeBatch(model)
        rows = [Row(controller=shared, max_new_tokens=n) for n in lengths]
        batch.add(rows[:3], prompts[:3])
        batch.step()
        batch.add(rows[3:], prompts[3:])  # copies made for rows joining later join the same group
        while batch.rows:
            batch.step()
    finally:
        type(shared).decide_rows = real
    assert len({id(r.controller) for r in rows}) == len(rows)  # each row its own copy
    assert groups and max(groups) == len(rows)
    for a, row in zip(alone, rows):
        res = batch.result(row)
        assert res.tokens == a.tokens and res.exit_layers == a.exit_layers
        assert res.counters["layers_run"] == a.counters["layers_run"]
        assert res.counters["controller_macs"] == a.counters["controller_macs"]
        assert res.counters["lm_head_calls"] == a.counters["lm_head_calls"]
