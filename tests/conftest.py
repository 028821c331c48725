"""Shared fixtures: tiny random configs of the real HF classes (fp32, CPU)."""

import pytest
import torch

from greencode.config import ModelConfig
from greencode.models import EarlyExitModel

torch.set_num_threads(1)

VOCAB = 97


def tiny_model(family: str, num_layers: int = 4, exit_layers=(1, 2), seed: int = 0, **kw) -> EarlyExitModel:
    torch.manual_seed(seed)
    mc = ModelConfig(family=family, hidden_size=kw.pop("hidden_size", 64), num_layers=num_layers, num_heads=4,
                     num_kv_heads=2 if family == "llama" else 4, intermediate_size=128, max_position_embeddings=256,
                     exit_layers=list(exit_layers), **kw)
    model = EarlyExitModel.from_config(mc, vocab_size=VOCAB, eos_token_id=2, bos_token_id=1, pad_token_id=0).eval()
    _non_identity_norms(model, seed)
    return model


def _non_identity_norms(model, seed: int) -> None:
    """Norm weights (and OPT's biases) drawn away from their identity init, so code that dropped a
    norm's scale (e.g. a policy observation without the final norm's weight) would not pass."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, module in model.hf.named_modules():
            if "norm" in type(module).__name__.lower() or "layernorm" in name.lower() or name.endswith("_norm"):
                w = getattr(module, "weight", None)
                if w is not None:
                    w.copy_(1.0 + 0.2 * torch.randn(w.shape, generator=g))
                b = getattr(module, "bias", None)
                if b is not None:
                    b.copy_(0.05 * torch.randn(b.shape, generator=g))


@pytest.fixture(params=["llama", "opt"])
def family(request):
    return request.param


class TinyPolicy(torch.nn.Module):
    """An SB3-shaped exit policy (policy_net -> action_net, logits [continue, exit]) with fixed
    random weights, on the normed hidden state."""

    def __init__(self, hidden: int, seed: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.policy_net = torch.nn.Sequential(torch.nn.Linear(hidden, 16), torch.nn.Tanh())
        self.action_net = torch.nn.Linear(16, 2)
        self.observation = "normed"

    def forward(self, obs):
        return self.action_net(self.policy_net(obs))


def sharp_exit_policy(model, feats, source="low_rank:8:16", seed=1):
    """An exported-shape ExitPolicy over the normed state and ``feats`` (candidates from ``source``, k = 4),
    its action layer scaled 30x so its decisions are sharp and the exits vary with the state."""
    from greencode.decoding.controllers import feature_size
    from greencode.rl import ExitPolicy

    torch.manual_seed(seed)
    policy = ExitPolicy(model.hidden_size + feature_size(feats, len(model.exit_layers)), [16],
                        metadata={"observation": "normed", "exit_layers": list(model.exit_layers), "features": feats,
                                  "candidates": {"source": source, "k": 4}, "fingerprint": model.fingerprint()})
    with torch.no_grad():
        policy.action_net.weight.mul_(30.0)
    return policy
