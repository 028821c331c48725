"""The exported exit policy: SB3's policy network + action head as a plain torch module.

``export_policy`` copies ``policy.mlp_extractor.policy_net`` and ``policy.action_net``
of a trained SB3 PPO ``MlpPolicy`` into :class:`ExitPolicy` (same layers, same
parameter names) and saves its ``state_dict`` with metadata (format, network shape,
activation, observation preprocessing, exit layers, hidden size, the model
fingerprint). The file holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``. ``load_policy`` rebuilds the module and, given a
model, refuses one it was not trained on. ``policy_controller`` plugs it into the
decoding loop as a :class:`greencode.decoding.PolicyExit` with a threshold and a
softmax temperature: exit when ``softmax(logits / T)[1] >= threshold``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from greencode.config import RewardConfig
from greencode.decoding import PolicyExit
from greencode.decoding.controllers import feature_size
from greencode.rl.bank import TrajectoryBank, check_fingerprint
from greencode.rl.reward import bank_segment_costs, reward_tables
from greencode.stats import auc_table, paired_auc_difference
from greencode.utils import atomic_path

log = logging.getLogger(__name__)

POLICY_FORMAT = "greencode-exit-policy/1"
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU,
                                           "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}
REQUIRED_METADATA = ("observation", "exit_layers", "fingerprint")


class ExitPolicy(nn.Module):
    """``forward(obs [N, H] float32) -> logits [N, 2]`` (0 = continue, 1 = exit).

    Attributes used by the decoding loop and the checks: ``observation`` (``raw`` |
    ``normed``), ``exit_layers`` (0-based), ``hidden_size``, ``fingerprint`` (of the model
    the bank was built from), ``metadata`` (everything saved with it)."""

    def __init__(self, hidden_size: int, net_arch: Sequence[int], activation: str = "tanh",
                 metadata: Optional[dict[str, Any]] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        last = int(hidden_size)
        for width in net_arch:
            layers += [nn.Linear(last, int(width)), ACTIVATIONS[activation]()]
            last = int(width)
        self.policy_net = nn.Sequential(*layers)  # same parameter names as SB3's mlp_extractor.policy_net
        self.action_net = nn.Linear(last, 2)
        self.hidden_size = int(hidden_size)
        self.net_arch = [int(w) for w in net_arch]
        self.activation = activation
        meta = dict(metadata or {})
        self.metadata = meta
        self.observation: str = meta.get("observation", "normed")
        self.exit_layers: list[int] = list(meta.get("exit_layers", []))
        # extra observation features after the hidden state (rl.observation_features); state_size =
        # the model's hidden size the first part of the input comes from
        self.features: list[str] = list(meta.get("features", []))
        # the cand_* features' candidate source and k ({"source", "k"}; None without them)
        self.candidates: Optional[dict] = meta.get("candidates")

        self.state_size = self.hidden_size - feature_size(self.features, len(self.exit_layers))
        self.fingerprint: dict = dict(meta.get("fingerprint", {}))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.action_net(self.policy_net(obs))

    @torch.no_grad()
    def exit_probability(self, obs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return torch.softmax(self(obs).float() / temperature, dim=-1)[..., 1]


def _activation_name(module: nn.Module) -> str:
    for name, cls in ACTIVATIONS.items():
        if type(module) is cls:
            return name
    raise ValueError(f"cannot export activation {type(module).__name__}; supported: {', '.join(ACTIVATIONS)}")


def from_sb3(sb3_model, metadata: Optional[dict[str, Any]] = None) -> ExitPolicy:
    """Copy an SB3 ``ActorCriticPolicy`` (or the PPO model holding it) into an :class:`ExitPolicy`."""
    from stable_baselines3.common.torch_layers import FlattenExtractor

    policy = getattr(sb3_model, "policy", sb3_model)
    if not isinstance(getattr(policy, "pi_features_extractor", None), FlattenExtractor):
        raise ValueError("only SB3 MlpPolicy with the default FlattenExtractor can be exported")
    if getattr(policy.action_space, "n", None) != 2:
        raise ValueError(f"the policy's action space is {policy.action_space}, expected Discrete(2)")
    shape = policy.observation_space.shape
    if len(shape) != 1:
        raise ValueError(f"the policy's observation space has shape {shape}; expected [hidden_size]")
    linears = [m for m in policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)]
    acts = [m for m in policy.mlp_extractor.policy_net if not isinstance(m, nn.Linear)]
    activation = _activation_name(acts[0]) if acts else "tanh"
    meta = dict(metadata or {})
    meta.setdefault("hidden_size", int(shape[0]))
    if int(meta["hidden_size"]) != int(shape[0]):
        raise ValueError(f"metadata hidden_size={meta['hidden_size']} but the policy observes {shape[0]} features")
    out = ExitPolicy(int(shape[0]), [m.out_features for m in linears], activation, meta)
    out.policy_net.load_state_dict(policy.mlp_extractor.policy_net.state_dict())
    out.action_net.load_state_dict(policy.action_net.state_dict())
    return out.float().cpu().eval()


def export_policy(sb3_model, path: Union[str, Path], metadata: dict[str, Any]) -> Path:
    """Save the SB3 policy network + action head as a plain torch policy file.

    ``metadata`` must name ``observation``, ``exit_layers`` and ``fingerprint`` (of the
    model the bank came from); anything else JSON-like is kept too."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"export_policy metadata is missing {missing}; pass the bank's observation mode, "
                         "exit layers and model fingerprint")
    module = from_sb3(sb3_model, metadata)
    return save_policy(module, path)


def save_policy(module: ExitPolicy, path: Union[str, Path]) -> Path:
    payload = {"format": POLICY_FORMAT, "hidden_size": module.hidden_size, "net_arch": module.net_arch,
               "activation": module.activation, "metadata": module.metadata,
               "state_dict": {k: v.detach().cpu().float().clone() for k, v in module.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.info("exported exit policy to %s (hidden %d, net %s)", path, module.hidden_size, module.net_arch)
    return Path(path)


def load_policy(path: Union[str, Path], model=None, *, strict_weights: bool = True) -> ExitPolicy:
    """Load an exported policy (float32, eval mode). With ``model`` (an EarlyExitModel):
    check hidden size, family, depth, vocabulary, exit layers and weights against the
    model it was trained on (ValueError naming the fix), and move it to the model's device."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exit policy at {str(path)!r}; train one with "
                                "`python scripts/train_agent.py --config <cfg>`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not our file"
        raise ValueError(f"{str(path)!r} is not a readable exit-policy file ({e}); re-export it with "
                         "scripts/train_agent.py") from e
    if not isinstance(payload, dict) or payload.get("format") != POLICY_FORMAT:
        raise ValueError(f"{str(path)!r} is not a GREEN-CODE exit policy (format {POLICY_FORMAT!r}); "
                         "re-export it with scripts/train_agent.py")
    module = ExitPolicy(payload["hidden_size"], payload["net_arch"], payload["activation"], payload["metadata"])
    module.load_state_dict(payload["state_dict"])
    module.eval()
    if model is not None:
        fix = "train the agent on this model's trajectory bank (scripts/train_agent.py) or load the matching model"
        if module.state_size != model.hidden_size:
            raise ValueError(f"the policy at {str(path)!r} expects hidden size {module.state_size} but the model "
                             f"has hidden size {model.hidden_size}; {fix}")
        if list(module.exit_layers) != list(model.exit_layers):
            raise ValueError(f"the policy at {str(path)!r} was trained for exit layers {module.exit_layers} but the "
                             f"model has exit layers {list(model.exit_layers)}; {fix}")
        check_fingerprint(module.fingerprint, model.fingerprint(), f"the policy at {str(path)!r}", fix,
                          strict_weights=strict_weights)
        module = module.to(model.device)
    return module


def policy_controller(path: Union[str, Path, ExitPolicy], model, threshold: float, temperature: float = 1.0,
                      *, strict_weights: bool = True, **kwargs):
    """A :class:`greencode.decoding.PolicyExit` for ``model`` from an exported policy
    (path or loaded module), with the policy's own observation preprocessing."""
    if isinstance(path, ExitPolicy):
        policy = path.to(model.device)
        if policy.state_size != model.hidden_size:
            raise ValueError(f"the policy expects hidden size {policy.state_size} but the model has "
                             f"{model.hidden_size}; train the agent on this model's trajectory bank")
    else:
        policy = load_policy(path, model, strict_weights=strict_weights)
    return PolicyExit.of(policy, threshold, temperature, **kwargs)


# --------------------------------------------------------------------------- evaluation on a bank
@torch.no_grad()
def exit_probabilities(policy: nn.Module, obs: np.ndarray, temperature: float = 1.0,
                       batch_size: int = 65536) -> np.ndarray:
    """P(exit) = softmax(policy(obs) / T)[:, 1] for obs [..., H]; returns float32 [...]."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    flat = np.asarray(obs).reshape(-1, obs.shape[-1])
    param = next(policy.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    out = np.empty(flat.shape[0], dtype=np.float32)
    for i in range(0, flat.shape[0], batch_size):
        x = torch.from_numpy(np.asarray(flat[i:i + batch_size], dtype=np.float32)).to(device, dtype)
        out[i:i + batch_size] = torch.softmax(policy(x).float() / temperature, dim=-1)[:, 1].cpu().numpy()
    return out.reshape(obs.shape[:-1])


def exit_points_at(p_exit: np.ndarray, threshold: float) -> np.ndarray:
    """First early exit point with P(exit) >= threshold per token; E (final) when none."""
    hit = p_exit >= threshold
    e = p_exit.shape[1]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), e).astype(np.int64)


def exit_metrics(exit_point: np.ndarray, bank: TrajectoryBank, reward_cfg=None) -> dict[str, Any]:
    """Exit accuracy of per-token exit points (E = final layer) against the bank."""
    e = bank.n_exit_points
    n = bank.num_tokens
    l_opt = bank.l_opt.astype(np.int64)
    rows = np.arange(n)
    pred = bank.preds[rows, exit_point]
    agree = pred == bank.preds[:, e]
    layers = np.asarray(bank.exit_layers + [bank.manifest.get("final_layer", e)], dtype=np.float64) \
        if bank.exit_layers else np.arange(e + 1, dtype=np.float64)
    r_exit, r_cont = reward_tables(bank.preds, bank.l_opt, reward_cfg or RewardConfig(), bank_segment_costs(bank))
    cum_cont = np.concatenate([np.zeros((n, 1)), np.cumsum(r_cont, axis=1)], axis=1)  # [N, E+1]
    ret = cum_cont[rows, exit_point] + np.where(exit_point < e, r_exit[rows, np.minimum(exit_point, e - 1)], 0.0)
    hist = np.bincount(exit_point, minlength=e + 1)
    return {
        "num_tokens": int(n),
        "share_at_l_opt": float(np.mean(exit_point == l_opt)),
        "share_early": float(np.mean(exit_point < l_opt)),
        "share_late": float(np.mean(exit_point > l_opt)),
        "agreement_with_final": float(np.mean(agree)),
        "share_exit_before_final": float(np.mean(exit_point < e)),
        "agreement_of_early_exits": float(np.mean(agree[exit_point < e])) if np.any(exit_point < e) else None,
        "mean_exit_point": float(np.mean(exit_point)),
        "mean_exit_layer": float(np.mean(layers[exit_point])),
        "mean_return_per_token": float(np.mean(ret)),
        "exit_point_histogram": hist.tolist(),
    }


def evaluate_agent_on_bank(policy: nn.Module, bank: TrajectoryBank, threshold: float, temperature: float = 1.0,
                           reward_cfg=None) -> dict[str, Any]:
    """Simulate the policy controller on every token of ``bank``: exit at the first early
    exit point with softmax(logits / T)[exit] >= threshold, else the final layer. Returns
    the share of tokens exiting at / before / after l_opt, agreement with the final layer,
    mean exit point and layer (0-based), the share exiting before the final layer, the
    mean return per token (eqs. 2-3) and the exit-point histogram."""
    p = exit_probabilities(policy, bank.obs, temperature)
    out = exit_metrics(exit_points_at(p, threshold), bank, reward_cfg)
    return {"threshold": float(threshold), "temperature": float(temperature), **out}


DECISION_LABEL = "the exit point's greedy token == the final layer's on the recorded state (the oracle label)"


def decision_auc(policy: nn.Module, bank: TrajectoryBank, *, resamples: int = 200, seed: int = 0) -> dict[str, Any]:
    """How well a policy's P(exit) (or the classifier's P(agree): logit 1 of an :class:`ExitPolicy` either way)
    ranks the tokens whose exit is right above those whose exit is wrong, per early exit point, over every token
    of ``bank`` (the state at each exit point is recorded for every token). AUC against the oracle label with a
    bootstrap over the bank's sequences (a sequence's tokens move together), and the mean over exit points with
    its interval. The temperature does not change an AUC. ``mean_draws`` pairs two results on the same bank
    (:func:`greencode.stats.paired_auc_difference`)."""
    e = bank.n_exit_points
    p = exit_probabilities(policy, bank.obs)
    labels = bank.preds[:, :e] == bank.preds[:, e:e + 1]
    seq = np.repeat(np.arange(bank.num_sequences), np.diff(bank.offsets))
    tab = auc_table([p[:, k] for k in range(e)], [labels[:, k] for k in range(e)], [seq] * e,
                    resamples=resamples, seed=seed)
    return {"label": DECISION_LABEL, "exit_layers": bank.exit_layers, "num_tokens": bank.num_tokens,
            "num_sequences": bank.num_sequences,
            "positive_share_per_exit": [float(x) for x in labels.mean(axis=0)],
            "auc_per_exit": tab["auc"], "auc_per_exit_ci": tab["ci"], "auc_mean": tab["mean"],
            "auc_mean_ci": tab["mean_ci"],
            "bootstrap": {"unit": "bank sequence", "resamples": int(resamples), "seed": int(seed), "level": 0.95},
            "mean_draws": tab["mean_draws"]}


def decision_auc_report(scored: dict[str, dict], reference: Optional[str] = None) -> dict[str, Any]:
    """The JSON-ready form of several :func:`decision_auc` results on one bank (``{name: result}``), each
    with its paired difference from ``reference`` (another name) when given."""
    out = {}
    for name, r in scored.items():
        row = {k: v for k, v in r.items() if k != "mean_draws"}
        if reference and name != reference and reference in scored:
            ref = scored[reference]
            d = paired_auc_difference({"mean": r["auc_mean"], "mean_draws": r["mean_draws"]},
                                      {"mean": ref["auc_mean"], "mean_draws": ref["mean_draws"]})
            row[f"auc_mean_minus_{reference}"] = d
        out[name] = row
    return out
