"""Exit controllers: per token and per exit point, continue or exit.

The decoding loop asks a controller only at the layers it returns from
:meth:`ExitController.check_layers`. A controller that needs logits (confidence, entropy)
sets ``needs_logits`` so the loop pays for the LM head only when asked; one that needs the
normed hidden state (the RL policy on ``normed`` observations) sets ``needs_normed``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from greencode.config import ConfigError


def _check_unit(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 or math.isnan(value):
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def policy_observation(model, h: torch.Tensor, mode: str) -> torch.Tensor:
    """THE preprocessing of a hidden state into an RL observation, shared by the trajectory
    bank (training) and :class:`PolicyExit` (inference): ``raw`` is the residual stream
    as the layer outputs it; ``normed`` goes through the model's own final norm (OPT: and
    ``project_out``), the same transform the LM head sees. Returned as float32."""
    if mode == "normed":
        return model.final_norm(h).float()
    if mode == "raw":
        return h.float()
    raise ConfigError(f"rl.observation={mode!r}; use 'raw' or 'normed'")


class ExitController:
    """Base class. Subclasses override :meth:`should_exit` (and maybe the flags)."""

    name = "base"
    needs_logits = False
    needs_normed = False
    runs_all_layers = False  # oracle: run every layer, then choose the exit (analysis only)
    macs_per_check = 0  # multiply-accumulates of one decision (for the compute ratio)

    def reset(self) -> None:
        """Called at the start of every generation."""

    def check_layers(self, model) -> frozenset[int]:
        return frozenset(model.exit_layers)

    def should_exit(self, layer: int, hidden: torch.Tensor, normed: Optional[torch.Tensor],
                    logits: Optional[torch.Tensor]) -> bool:
        raise NotImplementedError

    def should_exit_rows(self, layer: int, hidden: torch.Tensor, normed: Optional[torch.Tensor],
                         logits: Optional[torch.Tensor]) -> list[bool]:
        """The decision for several rows at once (``[n, 1, H]`` states, ``[n, 1, V]`` logits):
        the same answer as :meth:`should_exit` row by row (which is what this default does;
        controllers override it with one vectorised computation)."""
        return [self.should_exit(layer, hidden[r:r + 1], None if normed is None else normed[r:r + 1],
                                 None if logits is None else logits[r:r + 1]) for r in range(hidden.shape[0])]

    def describe(self) -> dict:
        return {"controller": self.name}


class NeverExit(ExitController):
    """The full model: every token runs every layer."""

    name = "never"

    def check_layers(self, model) -> frozenset[int]:
        return frozenset()

    def should_exit(self, layer, hidden, normed, logits) -> bool:  # pragma: no cover - never asked
        return False


class FixedExit(ExitController):
    """Every token exits at one fixed layer (any layer below the final one)."""

    name = "fixed"

    def __init__(self, layer: int):
        self.layer = int(layer)

    def check_layers(self, model) -> frozenset[int]:
        if not 0 <= self.layer < model.final_layer:
            raise ConfigError(f"fixed exit layer {self.layer} is out of range [0, {model.final_layer - 1}] for a "
                              f"{model.num_layers}-layer model (0-based; the final layer is the full model)")
        return frozenset({self.layer})

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        return True

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        return [True] * hidden.shape[0]

    def describe(self) -> dict:
        return {"controller": self.name, "layer": self.layer}


class ConfidenceExit(ExitController):
    """Exit when the intermediate prediction's max softmax probability >= threshold."""

    name = "confidence"
    needs_logits = True

    def __init__(self, threshold: float):
        self.threshold = _check_unit("confidence threshold", threshold)

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        return bool(torch.softmax(logits[0, -1].float(), dim=-1).max() >= self.threshold)

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        return (torch.softmax(logits[:, -1].float(), dim=-1).amax(-1) >= self.threshold).tolist()

    def describe(self) -> dict:
        return {"controller": self.name, "threshold": self.threshold}


class EntropyExit(ExitController):
    """Exit when the entropy (nats) of the intermediate prediction <= threshold."""

    name = "entropy"
    needs_logits = True

    def __init__(self, threshold: float):
        if not isinstance(threshold, (int, float)) or threshold < 0 or math.isnan(threshold):
            raise ConfigError(f"entropy threshold={threshold!r} must be a number >= 0 (nats)")
        self.threshold = float(threshold)

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        entropy = -(logp.exp() * logp).sum()
        return bool(entropy <= self.threshold)

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        return ((-(logp.exp() * logp).sum(-1)) <= self.threshold).tolist()

    def describe(self) -> dict:
        return {"controller": self.name, "threshold": self.threshold}


class OracleExit(ExitController):
    """The first exit point whose prediction equals the final layer's (l_opt). It runs
    every layer to know that, so it saves no compute: an upper bound for analysis."""

    name = "oracle"
    runs_all_layers = True

    def should_exit(self, layer, hidden, normed, logits) -> bool:  # pragma: no cover - loop special-cases it
        return False


_FAST_ACTIVATIONS = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu, nn.Sigmoid: torch.sigmoid}


class PolicyExit(ExitController):
    """An exported RL policy over the hidden state: exit when P(exit) >= threshold, where
    P = softmax(policy(obs) / temperature)[exit]. Action 0 = continue, 1 = exit."""

    name = "policy"

    def __init__(self, policy: nn.Module, threshold: float, temperature: float = 1.0, observation: str = "normed",
                 ignore_decision: bool = False):
        self.policy = policy.eval()
        self.threshold = _check_unit("policy threshold", threshold)
        if not temperature > 0:
            raise ConfigError(f"policy temperature={temperature!r} must be > 0")
        self.temperature = float(temperature)
        if observation not in ("raw", "normed"):
            raise ConfigError(f"policy observation={observation!r}; use 'raw' or 'normed'")
        self.observation = observation
        self.needs_normed = observation == "normed"
        # evaluate the policy but never exit: the A/B run that isolates the policy's cost
        self.ignore_decision = ignore_decision
        self.macs_per_check = sum(m.weight.numel() for m in policy.modules() if isinstance(m, nn.Linear))
        self._param = next(policy.parameters(), None)
        self._fast = None  # (norm kind, eps, [(W, b, activation)], w_diff, b_diff) once fused

    def check_layers(self, model) -> frozenset[int]:
        hidden = getattr(self.policy, "hidden_size", None)
        if hidden is not None and int(hidden) != model.hidden_size:
            raise ConfigError(f"the policy expects hidden size {hidden} but the model has {model.hidden_size}; "
                              "train the agent on this model's trajectory bank")
        exits = getattr(self.policy, "exit_layers", None)
        if exits is not None and list(exits) and list(exits) != list(model.exit_layers):
            raise ConfigError(f"the policy was trained for exit layers {list(exits)} but the model has "
                              f"{model.exit_layers}; train the agent for these exits or load the matching model")
        self._fuse(model)
        return frozenset(model.exit_layers)

    @torch.no_grad()
    def _fuse(self, model) -> None:
        """The per-check fast path: for an MLP policy (``policy_net`` of Linear/activation
        layers + a 2-way ``action_net``), fold the model's final norm into the first layer and
        compare the exit-minus-continue logit instead of running a softmax. Same decision as
        :meth:`exit_probability` >= threshold (tested); other policies use the general path."""
        if type(self).should_exit is not PolicyExit.should_exit:
            return  # a subclass that decides differently keeps the general path
        net, head = getattr(self.policy, "policy_net", None), getattr(self.policy, "action_net", None)
        if not isinstance(net, nn.Sequential) or not isinstance(head, nn.Linear) or head.out_features != 2:
            return
        layers: list = []
        for mod in net:
            if isinstance(mod, nn.Linear):
                layers.append([mod.weight.float(), mod.bias.float() if mod.bias is not None else None, None])
            elif layers and layers[-1][2] is None and not list(mod.parameters()):
                # plain functions for the common activations: no module-call overhead per check
                layers[-1][2] = _FAST_ACTIVATIONS.get(type(mod), mod)
            else:
                return
        if not layers:
            return
        kind, eps = "none", 0.0
        if self.observation == "normed":
            kind, eps, scale, bias, proj = model.adapter.final_norm_parts()
            w1, b1 = layers[0][0], layers[0][1]
            b1 = torch.zeros(w1.shape[0], device=w1.device) if b1 is None else b1
            m = w1 @ proj.float() if proj is not None else w1
            if bias is not None:
                b1 = b1 + m @ bias.float()
            layers[0][:2] = [m * scale.float() if scale is not None else m, b1]
        w_diff = (head.weight[1] - head.weight[0]).float()
        b_diff = float(head.bias[1] - head.bias[0]) if head.bias is not None else 0.0
        self._fast = (kind, eps, [tuple(layer) for layer in layers], w_diff, b_diff)
        self.needs_normed = False  # the fold needs only the raw hidden state

    def exit_probability(self, obs: torch.Tensor) -> torch.Tensor:
        if self._param is not None and (obs.device != self._param.device or obs.dtype != self._param.dtype):
            obs = obs.to(device=self._param.device, dtype=self._param.dtype)
        logits = self.policy(obs.reshape(-1, obs.shape[-1]))
        return torch.softmax(logits.float() / self.temperature, dim=-1)[..., 1]

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        if self._fast is not None:
            decision = self._fast_probability(hidden) >= self.threshold
        else:
            obs = (normed if self.observation == "normed" else hidden).float()
            decision = bool(self.exit_probability(obs)[-1] >= self.threshold)
        return decision and not self.ignore_decision

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        if self._fast is None or type(self).should_exit is not PolicyExit.should_exit:
            return super().should_exit_rows(layer, hidden, normed, logits)
        if self.ignore_decision:
            return [False] * hidden.shape[0]
        kind, eps, layers, w_diff, b_diff = self._fast
        x = hidden[:, -1].float()  # [n, H]
        if kind == "rms":
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)
        elif kind == "layer":
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
        for w, b, act in layers:
            x = torch.nn.functional.linear(x, w, b)
            if act is not None:
                x = act(x)
        z = ((x @ w_diff).double() + b_diff) / self.temperature
        return (torch.sigmoid(z) >= self.threshold).tolist()

    def _fast_probability(self, hidden: torch.Tensor) -> float:
        kind, eps, layers, w_diff, b_diff = self._fast
        x = hidden[0, -1].float()
        if kind == "rms":
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)
        elif kind == "layer":
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
        for w, b, act in layers:
            x = torch.mv(w, x) if b is None else torch.addmv(b, w, x)
            if act is not None:
                x = act(x)
        z = (float(torch.dot(w_diff, x)) + b_diff) / self.temperature  # logit(exit) - logit(continue)
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def describe(self) -> dict:
        return {"controller": self.name, "threshold": self.threshold, "temperature": self.temperature,
                "observation": self.observation, "ignore_decision": self.ignore_decision}
