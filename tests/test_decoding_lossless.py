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
            assert c["accepted"] <= c["drafted"] and c["rounds"] >= 1 and c["verified_tokens"] >= len(full) - 1
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
