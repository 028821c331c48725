"""Teacher-forced decoding (token consistency): rows fed the full model's continuation record
their own choice at each position; checked against HF's forward over the same prefix."""

import pytest
import torch
from conftest import VOCAB, tiny_model

from greencode.decoding import FixedExit, NeverExit, generate


def _prompt(seed=0, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_forced_rows_choose_what_the_exit_layer_predicts_on_the_full_prefix(family):
    m = tiny_model(family, num_layers=4, exit_layers=(1, 2))
    ids = _prompt()
    full = generate(m, ids, NeverExit(), 8)
    # the full model fed its own continuation chooses it again at every position
    again = generate(m, ids, NeverExit(), 8, forced_tokens=[full.tokens])
    assert again.tokens == full.tokens and again.own_tokens == full.tokens
    # a fixed exit with an exact cache, fed any tokens: its choice at position t is layer 1's prediction
    # given the fed prefix, read here from HF's own hidden states over prompt + forced[:t]
    forced = _prompt(5, 8)[0].tolist()
    res = generate(m, ids, FixedExit(1), 8, forced_tokens=[forced], kv_strategy="compute")
    assert res.tokens == forced
    seq = torch.cat([ids, torch.tensor([forced])], dim=1)
    with torch.no_grad():
        hs = m.hf(input_ids=seq, output_hidden_states=True).hidden_states
        pred = m.decode(hs[2]).argmax(-1)[0]  # hidden_states[2] = output of layer 1
    p = ids.shape[1]
    # the first token comes from the prefill (the full model); the rest from layer 1
    want = [full.tokens[0]] + [int(pred[p + t - 1]) for t in range(1, len(forced))]
    assert res.own_tokens == want
    assert len(set(want)) > 2  # the choices really follow the fed prefix (else this proves little)


def test_forced_rows_stop_at_the_forced_length_and_batch_like_single_rows():
    m = tiny_model("llama", num_layers=4, exit_layers=(1, 2))
    ids = _prompt(1)
    forced = generate(m, ids, NeverExit(), 6).tokens
    alone = generate(m, ids, FixedExit(2), 10, forced_tokens=[forced[:4]])
    assert alone.tokens == forced[:4] and len(alone.own_tokens) == 4
    both = generate(m, ids, [FixedExit(2), FixedExit(1)], 10, forced_tokens=[forced[:4], forced])
    assert both[0].own_tokens == alone.own_tokens and both[1].tokens == forced
    with pytest.raises(ValueError, match="one per row"):
        generate(m, ids, [FixedExit(2), FixedExit(1)], 4, forced_tokens=[forced])
    with pytest.raises(ValueError, match="greedy"):
        generate(m, ids, FixedExit(2), 4, forced_tokens=[forced], do_sample=True)
