"""EarlyExitModel construction, loading, saving and bad input; controllers' contracts."""

import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_model
from greencode.config import ConfigError
from greencode.decoding import (ConfidenceExit, EntropyExit, FixedExit, NeverExit, OracleExit, PolicyExit, compute_cost,
                                generate, policy_observation)
from greencode.models import EarlyExitModel


def test_save_and_load_keeps_exits_and_outputs(family, tmp_path):
    model = tiny_model(family, exit_layers=(0, 2))
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.exit_layers == [0, 2] and loaded.exit_points == [0, 2, 3]
    x = torch.randint(3, VOCAB, (1, 8))
    torch.testing.assert_close(loaded.hf(x).logits, model.hf(x).logits)
    assert loaded.fingerprint()["weights_sha256"] == model.fingerprint()["weights_sha256"]
    assert EarlyExitModel.from_pretrained(tmp_path / "m", exit_layers=[1]).exit_layers == [1]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or has no config.json"):
        EarlyExitModel.from_pretrained(tmp_path / "no_such_model")


def test_unsupported_architecture_lists_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="supported model families: llama, opt"):
        EarlyExitModel(hf, [0])


def test_exit_layers_out_of_range():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="outside"):
        EarlyExitModel(model.hf, [3])
    with pytest.raises(ConfigError, match="out of range"):
        generate(model, [5, 6, 7], FixedExit(3), 4)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_thresholds_outside_unit_interval(bad):
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        ConfidenceExit(bad)
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        PolicyExit(nn.Linear(64, 2), bad)


def test_entropy_threshold_must_be_non_negative():
    with pytest.raises(ConfigError, match=">= 0"):
        EntropyExit(-1.0)


def test_generate_bad_input():
    model = tiny_model("llama")
    rows = generate(model, torch.full((2, 3), 4, dtype=torch.long), max_new_tokens=2)  # two prompts: two rows
    assert len(rows) == 2 and rows[0].tokens == rows[1].tokens
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [[4, 5], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [4, 5], max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, list(range(3, 90)) * 3, max_new_tokens=20)
    with pytest.raises(ConfigError, match="kv_strategy"):
        generate(model, [4, 5], kv_strategy="copy")


class ConstantPolicy(nn.Module):
    """P(exit) = sigmoid(bias): a policy whose decision is known in advance."""

    def __init__(self, hidden_size, exit_logit):
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.lin.weight)
        with torch.no_grad():
            self.lin.bias.copy_(torch.tensor([0.0, exit_logit]))

    def forward(self, x):
        return self.lin(x)


def test_policy_controller_threshold_and_temperature():
    model = tiny_model("llama", num_layers=6, exit_layers=(1, 2, 4))
    prompt = [5, 6, 7, 8]
    pol = ConstantPolicy(model.hidden_size, 1.0)  # P(exit) = sigmoid(1) = 0.731
    assert generate(model, prompt, PolicyExit(pol, 0.7), 6).exit_layers[1:] == [1] * 5
    assert generate(model, prompt, PolicyExit(pol, 0.75), 6).exit_layers[1:] == [5] * 5
    # temperature 2 flattens: sigmoid(0.5) = 0.62 < 0.7
    assert generate(model, prompt, PolicyExit(pol, 0.7, temperature=2.0), 6).exit_layers[1:] == [5] * 5
    # evaluated but ignored: same tokens as the full model, policy cost still paid
    ab = generate(model, prompt, PolicyExit(pol, 0.7, ignore_decision=True), 6)
    assert ab.tokens == generate(model, prompt, NeverExit(), 6).tokens and ab.counters["exit_checks"] == 15
    with pytest.raises(ConfigError, match="hidden size"):
        generate(model, prompt, PolicyExit(ConstantPolicy(32, 1.0), 0.5), 3)


def test_policy_observation_modes():
    model = tiny_model("opt")
    h = torch.randn(1, 1, model.hidden_size)
    # computed from the norm's parts; HF's own final_layer_norm module is the reference
    torch.testing.assert_close(policy_observation(model, h, "normed"), model.final_norm(h))
    llama = tiny_model("llama")
    torch.testing.assert_close(policy_observation(llama, h, "normed"), llama.final_norm(h))
    # a bf16 model normalises in float32 (as the fused fast path does), not in bf16
    llama.hf.to(torch.bfloat16)
    hb = h.to(torch.bfloat16)
    w = llama.hf.model.norm.weight.float()
    x = hb.float()
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + llama.hf.model.norm.variance_epsilon) * w
    got = policy_observation(llama, hb, "normed")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy_observation(model, h, "raw"), h)
    with pytest.raises(ConfigError):
        policy_observation(model, h, "whitened")


def test_logit_controllers_pay_for_the_head_only_when_asked():
    model = tiny_model("llama", num_layers=6, exit_layers=(1, 2, 4))
    prompt = [5, 6, 7, 8]
    never = generate(model, prompt, NeverExit(), 8)
    assert never.counters["lm_head_calls"] == 8 and never.counters["exit_checks"] == 0
    conf = generate(model, prompt, ConfidenceExit(1.0), 8)  # never confident enough: checks all 3 points
    assert conf.counters["exit_checks"] == 21 and conf.counters["lm_head_calls"] == 8 + 21
    assert conf.tokens == never.tokens
    ent = generate(model, prompt, EntropyExit(100.0), 8)  # always below: exits at the first point
    assert ent.exit_layers[1:] == [1] * 7


def test_oracle_picks_first_agreeing_exit():
    model = tiny_model("llama", num_layers=6, exit_layers=(1, 2, 4))
    prompt = [5, 6, 7, 8, 9]
    out = generate(model, prompt, OracleExit(), 10)
    full = generate(model, prompt, NeverExit(), 10)
    assert out.tokens == full.tokens  # the oracle's token is the final layer's
    seq = prompt + out.tokens[:-1]
    logits = model.exit_logits(torch.tensor([seq]))
    for i, layer in enumerate(out.exit_layers[1:], start=1):
        p = len(prompt) - 1 + i
        preds = [int(lg[0, p].argmax()) for lg in logits]
        first = next(model.exit_points[j] for j, v in enumerate(preds) if v == preds[-1])
        assert layer == first


def test_compute_cost_accounting():
    model = tiny_model("llama", num_layers=6, exit_layers=(1, 2, 4))
    prompt = [5, 6, 7, 8]
    full = compute_cost(model, [generate(model, prompt, NeverExit(), 8)])
    assert full["compute_ratio"] == pytest.approx(1.0) and full["layers_skipped_share"] == 0
    fixed = compute_cost(model, [generate(model, prompt, FixedExit(2), 8)])
    cm = model.cost_model()
    per_step = 3 * cm["layer_macs"] + 3 * cm["kv_macs"] + cm["lm_head_macs"]
    assert fixed["compute_ratio"] == pytest.approx(per_step / (6 * cm["layer_macs"] + cm["lm_head_macs"]))
    assert fixed["layers_skipped_share"] == pytest.approx(0.5)


def test_sampling_is_seeded_and_stop_strings_cut():
    model = tiny_model("llama")

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    a = generate(model, [5, 6, 7], max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    b = generate(model, [5, 6, 7], max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    assert a.tokens == b.tokens
    full = generate(model, [5, 6, 7], max_new_tokens=10, tokenizer=Tok())
    stop = full.text[3]
    out = generate(model, [5, 6, 7], max_new_tokens=10, tokenizer=Tok(), stop_strings=[stop])
    assert out.finish_reason == "stop" and stop not in out.text and full.text.startswith(out.text)
    eos = generate(model, [5, 6, 7], max_new_tokens=10, eos_token_id=full.tokens[2])
    first = full.tokens.index(full.tokens[2])
    assert eos.finish_reason == "eos" and eos.tokens == full.tokens[:first + 1]


def test_fingerprint_is_dtype_independent(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    bf16 = EarlyExitModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.fingerprint() == model.fingerprint() | {"name_or_path": bf16.fingerprint()["name_or_path"]}


def test_streaming_callback_and_cancellation():
    model = tiny_model("llama", num_layers=6, exit_layers=(1, 2, 4))
    seen = []
    out = generate(model, [5, 6, 7], FixedExit(2), 6, on_token=lambda t, layer: seen.append((t, layer)))
    assert seen == list(zip(out.tokens, out.exit_layers))
    calls = []
    stop = generate(model, [5, 6, 7], NeverExit(), 6, should_stop=lambda: len(calls.append(1) or calls) >= 3)
    assert stop.finish_reason == "cancelled" and len(stop.tokens) == 3


@pytest.mark.parametrize("observation", ["normed", "raw"])
def test_fused_policy_check_equals_the_module(family, observation):
    """The fast path (norm folded into the first layer, logit difference) gives the
    probability the policy module gives on the preprocessed observation."""
    model = tiny_model(family, num_layers=6, exit_layers=(1, 2, 4))
    for p in model.hf.parameters():  # non-trivial final-norm affine parameters
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0, 0.3)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.policy_net = nn.Sequential(nn.Linear(model.hidden_size, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU())
            self.action_net = nn.Linear(8, 2)
            self.hidden_size = model.hidden_size

        def forward(self, x):
            return self.action_net(self.policy_net(x))

    pol = MLP()
    ctl = PolicyExit(pol, 0.5, temperature=1.7, observation=observation)
    ctl.check_layers(model)
    assert ctl._fast is not None and not ctl.needs_normed
    with torch.no_grad():  # as inside the decoding loop
        for _ in range(20):
            h = torch.randn(1, 1, model.hidden_size) * 4
            expected = float(ctl.exit_probability(policy_observation(model, h, observation))[-1])
            assert ctl._fast_probability(h) == pytest.approx(expected, abs=1e-5)
