"""Lossless early exit (self-speculative decoding drafted by the exit controller): the tokens
are the full model's, whatever the controller, and the counters account for the work."""

import pytest
import torch

from conftest import VOCAB, tiny_model
from greencode.decoding import ConfidenceExit, FixedExit, NeverExit, generate
from greencode.decoding.speculative import generate_lossless
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


def test_return_state_continues_exactly(family):
    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    whole = generate(model, prompt, NeverExit(), 12).tokens
    first = generate(model, prompt, NeverExit(), 5, return_state=True)
    rest = generate(model, first.state.input_ids, NeverExit(), 8, prefilled=first.state)
    assert first.tokens + rest.tokens[1:] == whole  # rest[0] is first's last token, chosen from the same logits
    with pytest.raises(ValueError, match="one row"):
        generate(model, prompt, [NeverExit(), NeverExit()], 3, return_state=True)


def test_lossless_never_copies_the_cache(family, monkeypatch):
    """One cache, advanced by the draft and cropped back for verification: copying it per round
    (12 layers x the whole context) cost more than a decode step on the CPU default."""
    import importlib

    gen_mod = importlib.import_module("greencode.decoding.generate")  # the module (the package exports a function)

    model = tiny_model(family)
    prompt = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(6))
    full = generate(model, prompt, NeverExit(), 14).tokens

    def no_copy(cache):
        raise AssertionError("the cache was copied")

    monkeypatch.setattr(gen_mod, "_copy_cache", no_copy)
    for ctrl in (FixedExit(model.exit_layers[0]), ConfidenceExit(0.05), NeverExit()):
        out = generate_lossless(model, prompt, ctrl, 14, k_max=4)
        assert out.tokens == full, type(ctrl).__name__
