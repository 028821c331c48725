"""Row strategies (greencode.decoding.strategies): a row carries what it does differently; the
same rows through DecodeBatch with strategies equal generate()'s teacher-forced / observed runs."""

import pytest
import torch
from conftest import VOCAB, tiny_model

from greencode.decoding import FixedExit, NeverExit, generate
from greencode.decoding.generate import DecodeBatch, Row
from greencode.decoding.strategies import Observed, TeacherForced


def _prompt(seed=0, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def test_strategies_per_row_in_one_batch_equal_their_runs_alone():
    """One batch: a plain row, a teacher-forced row and an observed teacher-forced row; each equals
    generate() of its own kind alone (tokens, exits, own tokens, observed states and predictions)."""
    m = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    prompt = _prompt()
    forced = generate(m, prompt, NeverExit(), 6).tokens
    plain = generate(m, prompt, FixedExit(1), 6)
    tf = generate(m, prompt, FixedExit(2), 6, forced_tokens=[forced])
    obs = generate(m, prompt, FixedExit(1), 6, forced_tokens=[forced], observe=True)
    rows = [Row(controller=FixedExit(1), max_new_tokens=6),
            Row(controller=FixedExit(2), max_new_tokens=6, strategies=[TeacherForced(forced)]),
            Row(controller=FixedExit(1), max_new_tokens=6, strategies=[TeacherForced(forced), Observed()])]
    batch = DecodeBatch(m)
    batch.add(rows, [prompt] * 3)
    while batch.rows:
        batch.step()
    got = [batch.result(r) for r in rows]
    assert got[0].tokens == plain.tokens and got[0].own_tokens is None and got[0].exit_states is None
    assert got[1].tokens == forced and got[1].own_tokens == tf.own_tokens and got[1].exit_layers == tf.exit_layers
    assert got[2].own_tokens == obs.own_tokens and got[2].exit_layers == obs.exit_layers
    assert len(got[2].exit_states) == len(obs.exit_states) == len(forced) - 1
    for a, b in zip(got[2].exit_preds, obs.exit_preds):
        assert torch.equal(a, b)
    for a, b in zip(got[2].exit_states, obs.exit_states):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_strategy_instance_belongs_to_one_row():
    m = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    shared = TeacherForced([5, 6, 7])
    rows = [Row(controller=NeverExit(), max_new_tokens=3, strategies=[shared]) for _ in range(2)]
    with pytest.raises(ValueError, match="give each row its own"):
        DecodeBatch(m).add(rows, [_prompt()] * 2)


def test_lossless_is_a_strategy_the_row_carries():
    """Row(strategies=[Lossless(...)]) is Row(lossless=True): the full model's tokens, the same counters;
    the draft lives in the strategy; a lossless row cannot also be observed or teacher-forced."""
    from greencode.decoding import generate_lossless
    from greencode.decoding.speculative import Lossless

    m = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    prompt = _prompt(3, 9)
    full = generate(m, prompt, NeverExit(), 10).tokens
    want = generate_lossless(m, prompt, FixedExit(1), 10, k_max=3)
    lossless = Lossless(k_max=3)
    rows = [Row(controller=FixedExit(1), max_new_tokens=10, strategies=[lossless]),
            Row(controller=FixedExit(2), max_new_tokens=10)]
    batch = DecodeBatch(m)
    batch.add(rows, [prompt] * 2)
    while batch.rows:
        batch.step()
    got = batch.result(rows[0])
    assert got.tokens == full == want.tokens and rows[0].lossless and lossless.draft is not None
    assert {k: got.counters[k] for k in ("rounds", "drafted", "accepted")} == \
        {k: want.counters[k] for k in ("rounds", "drafted", "accepted")}
    assert batch.result(rows[1]).tokens == generate(m, prompt, FixedExit(2), 10).tokens
    with pytest.raises(ValueError, match="cannot be observed or teacher-forced"):
        DecodeBatch(m, observe=True).add([Row(controller=FixedExit(1), max_new_tokens=4, lossless=True)], [prompt])


def test_the_step_holds_no_branch_on_a_row_mode():
    """The row modes are strategies: only ``_prepare`` (which turns the shorthand flags into strategies) may name
    them; the step and its helpers ask the strategies' hooks and flags, never a mode."""
    import ast
    import inspect
    import textwrap

    from greencode.decoding.generate import DecodeBatch

    modes = {"lossless", "observe", "keep_states", "kept_states", "runs_all_layers", "forced", "oracle_preds",
             "keepers", "draft"}
    src = ast.parse(textwrap.dedent(inspect.getsource(DecodeBatch)))
    found = []
    for fn in ast.walk(src):
        if isinstance(fn, ast.FunctionDef) and fn.name not in ("_prepare", "__init__"):
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr in modes:
                    found.append(f"{fn.name}: .{node.attr}")
    assert not found, found
