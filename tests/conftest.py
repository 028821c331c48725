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
    return EarlyExitModel.from_config(mc, vocab_size=VOCAB, eos_token_id=2, bos_token_id=1, pad_token_id=0).eval()


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
