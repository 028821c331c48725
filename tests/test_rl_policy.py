"""Policy export: same action probabilities as SB3, metadata, loading checks, bank evaluation."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from greencode.config import config_from_dict
from greencode.rl import (ExitPolicy, evaluate_agent_on_bank, export_policy, from_sb3, init_policy_from, load_policy,
                          make_ppo, make_vec_env, policy_controller, save_policy, synthetic_bank)


def sb3_model(hidden=16, arch=(32, 32)):
    cfg = config_from_dict({"rl": {"ppo": {"n_steps": 64, "batch_size": 32, "n_epochs": 1, "net_arch": list(arch)}}})
    bank = synthetic_bank(num_sequences=4, tokens_per_sequence=5, n_exit_points=2, hidden_size=hidden)
    model = make_ppo(make_vec_env(bank, cfg), cfg)
    model.learn(128)  # move the weights away from their init
    return model


def meta(model=None, hidden=16, exits=(1, 2)):
    fp = model.fingerprint() if model is not None else {"hidden_size": hidden, "exit_layers": list(exits)}
    return {"observation": "normed", "exit_layers": list(exits), "fingerprint": fp}


def test_exported_module_gives_the_sb3_action_probabilities(tmp_path):
    model = sb3_model()
    path = export_policy(model, tmp_path / "policy.pt", meta())
    policy = load_policy(path)
    obs = torch.randn(50, 16) * 3
    with torch.no_grad():
        ref = model.policy.get_distribution(obs).distribution.probs
        ours = torch.softmax(policy(obs), dim=-1)
    torch.testing.assert_close(ours, ref)
    assert policy.net_arch == [32, 32] and policy.activation == "tanh"
    assert (policy.observation, policy.exit_layers, policy.hidden_size) == ("normed", [1, 2], 16)
    # deterministic SB3 action == argmax == threshold 0.5
    actions, _ = model.predict(obs.numpy(), deterministic=True)
    assert np.array_equal(actions, (ours[:, 1] > 0.5).numpy().astype(int))


def test_ppo_starts_from_a_given_network_and_keeps_its_value_net():
    model = sb3_model()
    source = ExitPolicy(16, [32, 32], "tanh", meta())
    torch.manual_seed(3)
    for prm in source.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    value_before = {k: v.clone() for k, v in model.policy.mlp_extractor.value_net.state_dict().items()}
    obs = torch.randn(40, 16)
    with torch.no_grad():
        assert not torch.allclose(model.policy.get_distribution(obs).distribution.probs, torch.softmax(source(obs), -1))
    init_policy_from(model, source)
    with torch.no_grad():
        # SB3's own action distribution is now the source's P(exit): logit 1 = exit
        torch.testing.assert_close(model.policy.get_distribution(obs).distribution.probs,
                                   torch.softmax(source(obs), -1))
    for k, v in model.policy.mlp_extractor.value_net.state_dict().items():
        assert torch.equal(v, value_before[k])
    assert torch.allclose(from_sb3(model, meta())(obs), source(obs))
    with pytest.raises(ValueError, match="net_arch"):
        init_policy_from(model, ExitPolicy(16, [8], "tanh", meta()))
    with pytest.raises(ValueError, match="observes"):
        init_policy_from(model, ExitPolicy(12, [32, 32], "tanh", meta(hidden=12)))


def test_export_needs_metadata(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        export_policy(sb3_model(), tmp_path / "p.pt", {"observation": "raw"})


def test_load_policy_rejects_another_model(tmp_path):
    model = tiny_model("llama", num_layers=4, exit_layers=(1, 2), hidden_size=32)
    policy = ExitPolicy(32, [8], metadata=meta(model))
    path = save_policy(policy, tmp_path / "p.pt")
    assert load_policy(path, model).hidden_size == 32
    with pytest.raises(ValueError, match="expects hidden size 32 but the model has hidden size 64"):
        load_policy(path, tiny_model("llama", num_layers=4, exit_layers=(1, 2), hidden_size=64))
    with pytest.raises(ValueError, match=r"trained for exit layers \[1, 2\] but the model has exit layers \[0, 2\]"):
        load_policy(path, tiny_model("llama", num_layers=4, exit_layers=(0, 2), hidden_size=32))
    other_weights = tiny_model("llama", num_layers=4, exit_layers=(1, 2), hidden_size=32, seed=9)
    with pytest.raises(ValueError, match="other model weights"):
        load_policy(path, other_weights)
    assert load_policy(path, other_weights, strict_weights=False) is not None
    with pytest.raises(FileNotFoundError, match="train_agent.py"):
        load_policy(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a policy")
    with pytest.raises(ValueError, match="not a readable exit-policy"):
        load_policy(tmp_path / "junk.pt")


def test_policy_controller_carries_observation_threshold_and_temperature(tmp_path):
    model = tiny_model("opt", num_layers=4, exit_layers=(1, 2), hidden_size=32)
    m = meta(model)
    m["observation"] = "raw"
    path = save_policy(ExitPolicy(32, [8], metadata=m), tmp_path / "p.pt")
    ctrl = policy_controller(path, model, threshold=0.8, temperature=2.0)
    assert (ctrl.observation, ctrl.threshold, ctrl.temperature) == ("raw", 0.8, 2.0)


class ConstPolicy(torch.nn.Module):
    """Logits from obs[:, 0]: P(exit) = sigmoid(obs[:, 0])."""

    def forward(self, obs):
        return torch.stack([torch.zeros_like(obs[:, 0]), obs[:, 0]], dim=1)


def test_evaluate_agent_on_bank_counts_exits():
    bank = synthetic_bank(num_sequences=30, tokens_per_sequence=10, n_exit_points=3, hidden_size=4, signal=50.0)
    always = evaluate_agent_on_bank(ConstPolicy(), bank, threshold=0.0)
    assert always["share_exit_before_final"] == 1.0 and always["mean_exit_point"] == 0.0
    assert always["share_early"] == pytest.approx(np.mean(bank.l_opt > 0))
    never = evaluate_agent_on_bank(ConstPolicy(), bank, threshold=1.01)
    assert never["share_exit_before_final"] == 0.0 and never["agreement_with_final"] == 1.0
    assert never["exit_point_histogram"] == [0, 0, 0, bank.num_tokens]
    # obs[:, :, 0] is +-50 by agreement with the final layer: the policy exits at l_opt
    # (the first agreeing point), or at the final layer when none agrees
    smart = evaluate_agent_on_bank(ConstPolicy(), bank, threshold=0.5)
    assert smart["share_at_l_opt"] == 1.0 and smart["agreement_with_final"] == 1.0
    assert smart["mean_return_per_token"] > never["mean_return_per_token"]
