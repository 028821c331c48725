"""Exit controllers: per token and per exit point, continue or exit.

The decoding loop asks a controller only at the layers it returns from
:meth:`ExitController.check_layers`. A controller that needs logits (confidence, entropy)
sets ``needs_logits`` so the loop pays for the LM head only when asked; one that needs the
normed hidden state (the RL policy on ``normed`` observations) sets ``needs_normed``.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from greencode.decoding.signals import (CheapSignals, check_candidates, exit_signals, host_cosine, host_norm,
                                        host_norm_rows, parse_source, policy_observation)
from greencode.errors import ConfigError


def _check_unit(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 or math.isnan(value):
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


# optional observation features beyond the hidden state (rl.observation_features), appended in
# this order after the preprocessed hidden state:
#   exit_index   one-hot of the exit point (E values)
#   cosine_prev  cosine between this exit point's raw hidden state and the previous exit point's
#                (0 at the first exit point, which has none)
#   prev_exit    the previous token's exit point / E (1 = the final layer; the prefill's token counts
#                as the final layer)
#   cand_*       the cheap candidate features of greencode.decoding.signals (its FEATURES names and
#                meaning, one value each): cand_max_prob, cand_margin, cand_neg_entropy, cand_top1_logit,
#                cand_top1_stable, over the k candidates of rl.candidate_source (rl.candidate_k)
CANDIDATE_FEATURES = ("cand_max_prob", "cand_margin", "cand_neg_entropy", "cand_top1_logit", "cand_top1_stable")
OBSERVATION_FEATURES = ("exit_index", "cosine_prev", "prev_exit") + CANDIDATE_FEATURES
# the candidate sources an observation (and the cheap-confidence controller) can use online today (low_rank
# with its rank: low_rank:R): the others
# (prev_token, bigram, context) need the input token's logits or ids, which no controller is handed yet
ONLINE_CANDIDATE_SOURCES = ("first_full", "low_rank")


def feature_size(features, n_exit_points: int) -> int:
    """Number of values the ``features`` add to the observation."""
    size = 0
    for f in features:
        if f not in OBSERVATION_FEATURES:
            raise ConfigError(f"observation feature {f!r}; known: {', '.join(OBSERVATION_FEATURES)}")
        size += n_exit_points if f == "exit_index" else 1
    return size


def uses_candidates(features) -> bool:
    """Whether ``features`` include cheap candidate features (they need a candidate source and k)."""
    return any(f in CANDIDATE_FEATURES for f in features)


def check_online_candidates(source: str, k: int, where: str = "candidates") -> None:
    """A ConfigError naming ``where`` unless ``source`` / ``k`` can be computed inside the decoding loop."""
    try:
        check_candidates(k, source)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if parse_source(source)[0] not in ONLINE_CANDIDATE_SOURCES:
        raise ConfigError(f"{where}: candidate source {source!r} is measured offline only (results/<name>/signals); "
                          f"online (controllers, observations) use one of {', '.join(ONLINE_CANDIDATE_SOURCES)}")


def recorded_candidates(policy) -> Optional[dict]:
    """The candidate source an exported policy (or classifier) was trained with, ``{"source", "k"}`` from its
    ``candidates`` attribute or metadata; None when it records none."""
    rec = getattr(policy, "candidates", None) or (getattr(policy, "metadata", None) or {}).get("candidates")
    return {"source": str(rec["source"]), "k": int(rec["k"])} if rec else None


def observation_features(features, k: torch.Tensor, n_exit_points: int, cos_prev: torch.Tensor,
                         prev_exit: torch.Tensor, cand: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The extra features [..., F] (float32) for exit-point indices ``k`` [...], the cosine to the
    previous exit point's state [...], the previous token's exit point index [...] (E = final) and the
    cheap candidate features ``cand`` [..., len(CANDIDATE_FEATURES)] (the first columns of
    :func:`greencode.decoding.signals.signal_step`'s features; needed when a ``cand_*`` feature is asked)."""
    parts = []
    for f in features:
        if f == "exit_index":
            parts.append(torch.nn.functional.one_hot(k.long(), n_exit_points).float())
        elif f == "cosine_prev":
            parts.append(cos_prev.float().unsqueeze(-1))
        elif f == "prev_exit":
            parts.append((prev_exit.float() / n_exit_points).unsqueeze(-1))
        elif f in CANDIDATE_FEATURES:
            if cand is None:
                raise ValueError(f"observation feature {f!r} needs the candidate features (cand=...)")
            parts.append(cand[..., CANDIDATE_FEATURES.index(f)].float().unsqueeze(-1))
    if not parts:
        return torch.zeros(tuple(k.shape) + (0,))
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def candidate_observation(model, states: torch.Tensor, source: str = "first_full", k: int = 4) -> torch.Tensor:
    """The cheap candidate features [n, E, len(CANDIDATE_FEATURES)] (float32, CPU) of ``n`` tokens from their
    raw states at every early exit point [n, E, H], as :class:`PolicyExit` computes them online check by check
    (:class:`~greencode.decoding.signals.CheapSignals`; ``first_full``: the full head at the first exit point)."""
    check_online_candidates(source, k)
    states = states.to(model.device)
    e = states.shape[1]
    normed = [policy_observation(model, states[:, j], "normed") for j in range(e)]
    full = model.decode(states[:, 0].to(model.dtype)) if source == "first_full" else None
    prev = torch.zeros(states.shape[0], dtype=torch.long, device=states.device)  # prev_exit: not a candidate feature
    feats = exit_signals(model, normed, k=k, source=source, prev_exit=prev, full_logits_first=full)  # [E, n, F]
    return feats[..., :len(CANDIDATE_FEATURES)].permute(1, 0, 2).float().cpu()


def recorded_features(model, states: torch.Tensor, prev_exit: torch.Tensor, features, *,
                      source: str = "first_full", k: int = 4) -> torch.Tensor:
    """THE extra observation features a trajectory bank records [n, E, F] (float32, CPU), for ``n`` tokens'
    raw states at every early exit point [n, E, H] and each token's previous token's exit point [n] (E =
    the final layer): what :class:`PolicyExit` computes online at each check for the same state and history
    (both bank sources, :func:`greencode.rl.build.record_batch` and :func:`greencode.rl.simulate.record_simulation`,
    call this)."""
    n, e = states.shape[0], states.shape[1]
    raw = states.float().cpu()
    cos = torch.zeros(n, e)
    if e > 1:
        cos[:, 1:] = torch.nn.functional.cosine_similarity(raw[:, 1:], raw[:, :-1], dim=-1)
    cand = candidate_observation(model, states, source, k) if uses_candidates(features) else None
    return observation_features(features, torch.arange(e).expand(n, e), e, cos,
                                prev_exit.long().cpu()[:, None].expand(n, e), cand)


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

    def logits_at(self, layer: int) -> bool:
        """Whether the check at ``layer`` needs the LM head's logits (the loop runs the head then and
        counts it as an LM-head call; a token exiting there is chosen from those logits, never a second
        head). Default: ``needs_logits`` at every check; a controller that needs the head at some checks
        only (the cheap signals' ``first_full`` source: the first exit point) says so here."""
        return self.needs_logits

    def check_macs(self, layer: int) -> int:
        """Multiply-accumulates of the check at ``layer`` beyond the LM head the loop runs for it (which
        the loop counts itself): what the loop adds to ``counters["controller_macs"]`` and so to the
        compute ratio. Default: ``macs_per_check`` at every check."""
        return int(self.macs_per_check)

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

    def decide_rows(self, layer: int, ctrls: Sequence["ExitController"], hidden: torch.Tensor,
                    normed: Optional[torch.Tensor], logits: Optional[torch.Tensor]) -> list[bool]:
        """The decision for several rows that each hold their own copy of this controller
        (``per_row_state``; ``ctrls[k]`` is row ``k``'s, made by :meth:`row_copy`; ``self`` is one of them):
        the same answer as each copy's :meth:`should_exit` on its row, and each copy's state advanced as
        that would. This default asks them one by one; a controller overrides it with one computation."""
        return [c.should_exit(layer, hidden[k:k + 1], None if normed is None else normed[k:k + 1],
                              None if logits is None else logits[k:k + 1]) for k, c in enumerate(ctrls)]

    def row_copy(self) -> "ExitController":
        """Another row's own instance (``per_row_state``). The copies of one controller share a batch
        group, so the loop decides their rows together (:meth:`decide_rows`)."""
        group = self.__dict__.setdefault("_batch_group", object())
        new = copy.deepcopy(self)
        new._batch_group = group
        return new

    def batch_group(self) -> object:
        """What the loop groups rows by to decide them together: the instance, or the group its
        per-row copies share."""
        return self.__dict__.get("_batch_group", self)

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


class SaturationExit(ExitController):
    """Hidden-state saturation (CALM): exit when the cosine similarity between this exit
    point's hidden state and the previous exit point's is >= threshold (parameter-free; the
    state stopped changing). The first exit point compares with the layer just below it (when
    the first exit point is layer 0 there is none, and no token exits there). Keeps one state
    per row between the checks of a token, so each row of a batch needs its own instance
    (generate copies a shared one)."""

    name = "saturation"
    per_row_state = True

    def __init__(self, threshold: float):
        if not isinstance(threshold, (int, float)) or not -1.0 <= float(threshold) <= 1.0 or math.isnan(threshold):
            raise ConfigError(f"saturation threshold={threshold!r} must be a cosine in [-1, 1]")
        self.threshold = float(threshold)
        self._prev: Optional[torch.Tensor] = None
        self._last_layer = -1
        self._below = -1  # the layer compared with at the first exit point

    def reset(self) -> None:
        self._prev, self._last_layer = None, -1

    def check_layers(self, model) -> frozenset[int]:
        first = min(model.exit_layers)
        self._below = first - 1
        self.macs_per_check = 3 * model.hidden_size  # one dot product and two norms
        return frozenset(model.exit_layers) | ({first - 1} if first >= 1 else frozenset())

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        x = hidden[:, -1].float()
        if layer <= self._last_layer:  # a new token starts: nothing to compare with yet
            self._prev = None
        prev, self._prev, self._last_layer = self._prev, x, layer
        if layer == self._below or prev is None or prev.shape != x.shape:
            return [False] * x.shape[0]
        return (torch.nn.functional.cosine_similarity(x, prev, dim=-1) >= self.threshold).tolist()

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        return self.should_exit_rows(layer, hidden, normed, logits)[0]

    def describe(self) -> dict:
        return {"controller": self.name, "threshold": self.threshold}


class RandomExit(ExitController):
    """Exit at each checked exit point with probability ``rate`` (seeded, reproducible): the
    behaviour that puts the trajectory bank on the states early-exit decoding reaches (earlier
    tokens exited, deeper layers holding propagated K/V) before any policy exists."""

    name = "random"

    def __init__(self, rate: float, seed: int = 0):
        self.rate = _check_unit("random exit rate", rate)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        return bool(torch.rand((), generator=self._gen) < self.rate)

    def describe(self) -> dict:
        return {"controller": self.name, "rate": self.rate, "seed": self.seed}


class OracleExit(ExitController):
    """The first exit point whose prediction equals the final layer's (l_opt). It runs
    every layer to know that, so it saves no compute: an upper bound for analysis."""

    name = "oracle"
    runs_all_layers = True  # the loop gives its row an OracleExits strategy (greencode.decoding.strategies)

    def check_layers(self, model) -> frozenset[int]:
        return frozenset()  # never asked: it runs every layer and the strategy records the exit after

    def should_exit(self, layer, hidden, normed, logits) -> bool:  # pragma: no cover - never asked
        return False


_FAST_ACTIVATIONS = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu, nn.Sigmoid: torch.sigmoid}
# the same activations on the host (PolicyExit's NumPy path for rows on a CPU)
_HOST_ACTIVATIONS = {torch.tanh: np.tanh, torch.relu: lambda v: np.maximum(v, np.float32(0)),
                     torch.sigmoid: lambda v: np.float32(1) / (np.float32(1) + np.exp(-v))}


class PolicyExit(ExitController):
    """An exported RL policy over the hidden state: exit when P(exit) >= threshold, where
    P = softmax(policy(obs) / temperature)[exit]. Action 0 = continue, 1 = exit. The
    supervised exit classifier (CALM's learned classifier, :mod:`greencode.rl.classifier`)
    has the same shape and runs through this controller too (``name="classifier"``)."""

    name = "policy"
    host_path = True  # rows on a CPU: the NumPy path (False: the tensor path always, for the tests' comparison)

    def __init__(self, policy: nn.Module, threshold: float, temperature: float = 1.0, observation: str = "normed",
                 ignore_decision: bool = False, name: Optional[str] = None):
        if name is not None:
            self.name = name
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
        self._host = None  # the same as NumPy arrays (+ the feature weights, one-hots): rows on a CPU
        # observation features beyond the hidden state (rl.observation_features): they need the
        # previous exit point's state and the previous token's exit, kept per row
        self.features = list(getattr(policy, "features", None) or [])
        self.per_row_state = bool(self.features)
        self._w_feat = None  # the first layer's columns for the features (fast path)
        self._exit_index = {}
        self._n_exits = 0
        # the cheap candidate features (cand_*): their source and k, as the bank recorded them
        self.candidates: Optional[dict] = None
        self._signals = None  # CheapSignals, once the model is known (check_layers)
        self._cand_macs: dict = {}
        self._first_layer = None
        if uses_candidates(self.features):
            rec = recorded_candidates(policy)
            if not rec:
                raise ConfigError(f"the policy observes candidate features {self.features} but records no candidate "
                                  "source (metadata 'candidates': {source, k}); re-export it with scripts/train_agent.py")
            self.candidates = rec
            check_online_candidates(self.candidates["source"], self.candidates["k"], "the policy's candidates")
        self.reset()

    @classmethod
    def of(cls, policy: nn.Module, threshold: float, temperature: float = 1.0, **kwargs) -> "PolicyExit":
        """The one way the evaluator, the benchmark, the bank, the GPU check and the endpoint build
        a policy's controller: the observation is the one the policy was trained on (an exported
        policy records it; ``normed`` when a module does not say)."""
        return cls(policy, threshold, temperature, observation=getattr(policy, "observation", "normed"), **kwargs)

    def reset(self) -> None:
        self._prev_h = None  # the previous exit point's raw state in this token
        self._last_layer = -1
        self._prev_exit = None  # exit point index of the previous token (None: the prefill's = final)
        self._exited = None  # exit point index this token exited at, if it did
        if self._signals is not None:
            self._signals.state = None

    def _open_check(self, layer: int, x: torch.Tensor) -> tuple[int, Optional[torch.Tensor], int]:
        """Start the check at ``layer`` of the state ``x`` [H]: a new token records where the previous one
        exited (or the final layer), the candidate set opens at the first exit point. Returns the exit-point
        index, the previous exit point's state in this token (None at the first) and the previous token's exit."""
        if layer <= self._last_layer:  # a new token: the previous one exited where it said, or at the final
            self._prev_exit = self._exited if self._exited is not None else self._n_exits
            self._prev_h, self._exited = None, None
        k = self._exit_index[layer]
        prev_h, self._prev_h, self._last_layer = self._prev_h, x, layer
        if self._signals is not None and k == 0:  # every token's first check: its candidate set opens
            self._signals.start(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return k, prev_h, self._n_exits if self._prev_exit is None else self._prev_exit

    def _features(self, layer: int, x: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The feature vector [F] for the state ``x`` [H] (float32) at ``layer`` (``logits`` [V]: the full
        head's there, when :meth:`logits_at` asked for them); advances the state."""
        k, prev_h, prev_exit = self._open_check(layer, x)
        cos = (torch.nn.functional.cosine_similarity(x, prev_h, dim=-1)
               if prev_h is not None and "cosine_prev" in self.features else torch.zeros(()))  # read only then
        cand = None
        if self._signals is not None:
            cand = self._signals.check(k, x[None], None if logits is None else logits.reshape(1, -1))
            cand = cand[0, :len(CANDIDATE_FEATURES)].cpu()
        return observation_features(self.features, torch.tensor(k), self._n_exits, cos.cpu(),
                                    torch.tensor(prev_exit), cand).to(x.device)

    def logits_at(self, layer: int) -> bool:
        # the first_full candidates: the full head at the first exit point (reused when the token exits there)
        return self._signals is not None and self._signals.source == "first_full" and layer == self._first_layer

    def check_macs(self, layer: int) -> int:
        """The policy MLP's MACs, plus the candidate features' (norm, candidate logits, candidate softmax and
        entropy; the ``first_full`` full head at the first exit point is the loop's LM-head call)."""
        return int(self.macs_per_check) + self._cand_macs.get(layer, 0)

    def check_layers(self, model) -> frozenset[int]:
        hidden = getattr(self.policy, "state_size", getattr(self.policy, "hidden_size", None))
        if hidden is not None and int(hidden) != model.hidden_size:
            raise ConfigError(f"the policy expects hidden size {hidden} but the model has {model.hidden_size}; "
                              "train the agent on this model's trajectory bank")
        exits = getattr(self.policy, "exit_layers", None)
        if exits is not None and list(exits) and list(exits) != list(model.exit_layers):
            raise ConfigError(f"the policy was trained for exit layers {list(exits)} but the model has "
                              f"{model.exit_layers}; train the agent for these exits or load the matching model")
        self._n_exits = len(model.exit_layers)
        self._exit_index = {layer: k for k, layer in enumerate(model.exit_layers)}
        self._first_layer = min(model.exit_layers)
        if self.candidates is not None:
            self._signals = CheapSignals(model, self.candidates["k"], self.candidates["source"], saturation=False,
                                         host=self.host_path)
            self._cand_macs = {layer: sum(v for n, v in self._signals.macs_parts(k).items() if n != "full_head")
                               for layer, k in self._exit_index.items()}
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
        n_feat = feature_size(self.features, len(model.exit_layers))
        if n_feat:  # the feature columns stay apart; the norm folds into the state's columns only
            w1 = layers[0][0]
            layers[0][0], self._w_feat = w1[:, :w1.shape[1] - n_feat], w1[:, w1.shape[1] - n_feat:]
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
        self._host = self._host_mlp() if self.host_path else None

    def _host_mlp(self) -> Optional[tuple]:
        """The fused MLP as NumPy arrays for the checks of rows on a CPU (one row, or a batch's group), where
        a check's few dozen tensor calls cost more than the layers it could skip (:class:`~greencode.decoding.
        signals.HostCheck` says why); None where it does not apply (a GPU, bf16 weights, an activation without
        a host twin, candidate features without a host path): the tensor path stays."""
        kind, eps, layers, w_diff, b_diff = self._fast
        tensors = [w_diff] + [t for w, b, _ in layers for t in (w, b) if t is not None]
        if self._w_feat is not None:
            tensors.append(self._w_feat)
        if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
            return None
        if any(act is not None and act not in _HOST_ACTIVATIONS for _, _, act in layers):
            return None
        if self._signals is not None and self._signals.host is None:
            return None
        def arr(t):
            return None if t is None else t.detach().numpy()

        host = [(arr(w), arr(b), None if act is None else _HOST_ACTIVATIONS[act]) for w, b, act in layers]
        onehots = [[float(i == j) for i in range(self._n_exits)] for j in range(self._n_exits)]
        return kind, eps, host, arr(w_diff), b_diff, arr(self._w_feat), onehots

    def exit_probability(self, obs: torch.Tensor) -> torch.Tensor:
        if self._param is not None and (obs.device != self._param.device or obs.dtype != self._param.dtype):
            obs = obs.to(device=self._param.device, dtype=self._param.dtype)
        logits = self.policy(obs.reshape(-1, obs.shape[-1]))
        return torch.softmax(logits.float() / self.temperature, dim=-1)[..., 1]

    def _host_features(self, layer: int, x_t: torch.Tensor, logits: Optional[torch.Tensor]) -> np.ndarray:
        """:meth:`_features` on the host: the feature vector [F] (float32 array) of the raw state ``x_t`` [H]
        (``logits`` [V]: the full head's, when :meth:`logits_at` asked); advances the state."""
        k, prev_h, prev_exit = self._open_check(layer, x_t)
        cand = self._signals.check_values(x_t, logits) if self._signals is not None else None
        parts: list = []
        for f in self.features:
            if f == "exit_index":
                parts += self._host[-1][k]
            elif f == "cosine_prev":
                parts.append(0.0 if prev_h is None else host_cosine(x_t.numpy(), prev_h.numpy()))
            elif f == "prev_exit":
                parts.append(prev_exit / self._n_exits)
            else:
                parts.append(cand[CANDIDATE_FEATURES.index(f)])
        return np.array(parts, dtype=np.float32)

    def _should_exit_host(self, layer: int, hidden: torch.Tensor, logits: Optional[torch.Tensor]) -> bool:
        """:meth:`should_exit` of one row on the host: the features and the fused MLP in NumPy (same decision up
        to float rounding; tested against the tensor path)."""
        x_t = hidden[0, -1].float()
        feats = self._host_features(layer, x_t, None if logits is None else logits[0, -1]) if self.features else None
        decision = self._host_probability(x_t.numpy(), feats) >= self.threshold and not self.ignore_decision
        if decision and self.features:
            self._exited = self._exit_index[layer]
        return decision

    def _host_probability(self, x: np.ndarray, feats: Optional[np.ndarray]) -> float:
        """P(exit) of the raw state ``x`` [H] and the features [F] through the fused MLP on the host."""
        kind, eps, layers, w_diff, b_diff, w_feat, _ = self._host
        x, r = host_norm(kind, eps, x)
        r = np.float32(r)
        for j, (w, b, act) in enumerate(layers):
            x = w @ x
            if j == 0:
                x = x * r  # the norm's scalar after the product: a 64-wide multiply instead of the state's
                if feats is not None and w_feat is not None:
                    x = x + w_feat @ feats
            if b is not None:
                x = x + b
            if act is not None:
                x = act(x)
        z = (float(np.dot(w_diff, x)) + b_diff) / self.temperature
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        if self._host is not None and hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            return self._should_exit_host(layer, hidden, logits)
        feats = (self._features(layer, hidden[0, -1].float(), None if logits is None else logits[0, -1])
                 if self.features else None)
        if self._fast is not None:
            decision = self._fast_probability(hidden, feats) >= self.threshold
        else:
            obs = (normed if self.observation == "normed" else hidden).float()[0, -1]
            if feats is not None:
                obs = torch.cat([obs, feats])
            decision = bool(self.exit_probability(obs[None])[-1] >= self.threshold)
        decision = decision and not self.ignore_decision
        if decision and self.features:
            self._exited = self._exit_index[layer]
        return decision

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        if self._fast is None or type(self).should_exit is not PolicyExit.should_exit or self.features:
            return super().should_exit_rows(layer, hidden, normed, logits)
        if self.ignore_decision:
            return [False] * hidden.shape[0]
        if self._host is not None and hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            return (self._host_probability_rows(hidden[:, -1].numpy(), None) >= self.threshold).tolist()
        return (self._fast_probability_rows(hidden[:, -1].float(), None) >= self.threshold).tolist()

    def decide_rows(self, layer, ctrls, hidden, normed, logits) -> list[bool]:
        """Rows with observation features (each its own copy): their features and the fused MLP for all of
        them at once, each copy's state advanced as :meth:`should_exit` would (tested equal to it)."""
        if self._fast is None or type(self).should_exit is not PolicyExit.should_exit or not self.features:
            return super().decide_rows(layer, ctrls, hidden, normed, logits)
        if self._host is not None and hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            return self._decide_rows_host(layer, ctrls, hidden, logits)
        x = hidden[:, -1].float()  # [n, H]
        k, prev_h, prev_exit = zip(*(c._open_check(layer, x[j]) for j, c in enumerate(ctrls)))
        k = k[0]
        cand = None
        if self._signals is not None:
            lg = None if logits is None else logits[:, -1]
            cand = self._signals.check_rows(k, [c._signals for c in ctrls], x, lg)
            if cand is None:  # the rows' candidate sets are not at the same stage: each copy's own check
                cand = torch.cat([c._signals.check(k, x[j:j + 1], None if lg is None else lg[j:j + 1])
                                  for j, c in enumerate(ctrls)])
            cand = cand[:, :len(CANDIDATE_FEATURES)].cpu()
        cos = torch.zeros(len(ctrls))
        if "cosine_prev" in self.features:
            have = [j for j, p in enumerate(prev_h) if p is not None]
            if have:
                cos[have] = torch.nn.functional.cosine_similarity(x[have], torch.stack([prev_h[j] for j in have]),
                                                                  dim=-1).cpu()
        feats = observation_features(self.features, torch.full((len(ctrls),), k), self._n_exits, cos,
                                     torch.tensor(prev_exit), cand).to(x.device)
        return self._rows_decided(ctrls, self._fast_probability_rows(x, feats), k)

    def _rows_decided(self, ctrls, p, k: int) -> list[bool]:
        """The rows' decisions from their P(exit) ``p`` [n] (a tensor or an array) at exit point ``k``, recorded
        in each copy that exits (its next token's ``prev_exit``)."""
        decisions = [bool(v) and not self.ignore_decision for v in (p >= self.threshold).tolist()]
        for c, d in zip(ctrls, decisions):
            if d:
                c._exited = k
        return decisions

    def _decide_rows_host(self, layer, ctrls, hidden, logits) -> list[bool]:
        """:meth:`decide_rows` on the host (a CPU float32 model): the rows' features as one array (the candidate
        check of all of them at once, :meth:`~greencode.decoding.signals.CheapSignals.check_values_rows`) and the
        fused MLP over them in NumPy; each copy's state advanced as :meth:`should_exit` would (tested equal)."""
        x_t = hidden[:, -1]
        x = x_t.numpy()  # [n, H]
        opened = [c._open_check(layer, x_t[j]) for j, c in enumerate(ctrls)]
        k = opened[0][0]
        cand = None
        if self._signals is not None:
            lg = None if logits is None else logits[:, -1]
            cand = self._signals.check_values_rows([c._signals for c in ctrls], x_t, lg)
            if cand is None:  # the rows' candidate sets are not at the same stage: each copy's own check
                cand = np.array([c._signals.check_values(x_t[j], None if lg is None else lg[j])
                                 for j, c in enumerate(ctrls)])
        cols: list = []
        for f in self.features:
            if f == "exit_index":
                cols += [np.full(len(ctrls), v) for v in self._host[-1][k]]
            elif f == "cosine_prev":
                cols.append(np.array([0.0 if prev_h is None else host_cosine(x[j], prev_h.numpy())
                                      for j, (_, prev_h, _) in enumerate(opened)]))
            elif f == "prev_exit":
                cols.append(np.array([prev_exit / self._n_exits for _, _, prev_exit in opened]))
            else:
                cols.append(cand[:, CANDIDATE_FEATURES.index(f)])
        feats = np.stack(cols, axis=1).astype(np.float32)
        return self._rows_decided(ctrls, self._host_probability_rows(x, feats), k)

    def _host_probability_rows(self, x: np.ndarray, feats: Optional[np.ndarray]) -> np.ndarray:
        """:meth:`_host_probability` of raw states ``x`` [n, H] (float32) and features [n, F]: P(exit) [n]."""
        kind, eps, layers, w_diff, b_diff, w_feat, _ = self._host
        h, r = host_norm_rows(kind, eps, x)
        for j, (w, b, act) in enumerate(layers):
            h = h @ w.T
            if j == 0:
                h = h * r.astype(np.float32)[:, None]  # the norm's scalar after the product, as one row's
                if feats is not None and w_feat is not None:
                    h = h + feats @ w_feat.T
            if b is not None:
                h = h + b
            if act is not None:
                h = act(h)
        z = (h.astype(np.float64) @ w_diff.astype(np.float64) + b_diff) / self.temperature
        return 1.0 / (1.0 + np.exp(-np.clip(z, -700.0, None)))

    def _fast_probability_rows(self, x: torch.Tensor, feats: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`_fast_probability` for the raw states ``x`` [n, H] (float32) and features [n, F]: P(exit) [n]."""
        kind, eps, layers, w_diff, b_diff = self._fast
        if kind == "rms":
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)
        elif kind == "layer":
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
        for j, (w, b, act) in enumerate(layers):
            x = torch.nn.functional.linear(x, w, b)
            if j == 0 and feats is not None and self._w_feat is not None:
                x = x + torch.nn.functional.linear(feats, self._w_feat)
            if act is not None:
                x = act(x)
        z = ((x @ w_diff).double() + b_diff) / self.temperature
        return torch.sigmoid(z)

    def _fast_probability(self, hidden: torch.Tensor, feats: Optional[torch.Tensor] = None) -> float:
        kind, eps, layers, w_diff, b_diff = self._fast
        x = hidden[0, -1].float()
        # the norm of one vector as a dot product and a scalar: a fraction of the cost of the norm kernels'
        # dispatch on a 256-wide vector (the check runs several times per token)
        if kind == "rms":
            x = x * (1.0 / math.sqrt(float(torch.dot(x, x)) / x.shape[0] + eps))
        elif kind == "layer":
            x = x - x.mean()
            x = x * (1.0 / math.sqrt(float(torch.dot(x, x)) / x.shape[0] + eps))
        for j, (w, b, act) in enumerate(layers):
            x = torch.mv(w, x) if b is None else torch.addmv(b, w, x)
            if j == 0 and feats is not None and self._w_feat is not None:
                x = x + torch.mv(self._w_feat, feats)
            if act is not None:
                x = act(x)
        z = (float(torch.dot(w_diff, x)) + b_diff) / self.temperature  # logit(exit) - logit(continue)
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def describe(self) -> dict:
        out = {"controller": self.name, "threshold": self.threshold, "temperature": self.temperature,
               "observation": self.observation, "features": self.features, "ignore_decision": self.ignore_decision}
        if self.candidates is not None:
            out["candidates"] = dict(self.candidates)
        return out


class CheapConfidenceExit(ExitController):
    """Cheap confidence: exit when the softmax over ``k`` candidate tokens' logits is confident enough
    (its max, or its margin top-1 - top-2, >= threshold), at a fraction of the full head's cost.

    The candidates come from a stated source (:mod:`greencode.decoding.signals`); ``first_full``: the
    full LM head at the first exit point gives the token's top-``k`` (the score there is the softmax over
    those ``k`` logits), and every later exit point computes only those ``k`` logits (``k x hidden``
    MACs), re-ranked. That first head is the loop's LM-head call: when the token exits at the first exit
    point, those logits choose it (no second head); otherwise it was paid for the decision. The rest of a
    check (the state's norm, the ``k`` logits, the candidate softmax) is :meth:`check_macs`.

    ``score``: ``max_prob`` (default: the higher pooled AUC of the two on the default, 0.802 vs 0.798 for
    the margin, and one threshold acts on all exit points pooled; ``results/default/signals/auc.md``) or
    ``margin``. Keeps the token's candidates between its checks, so each row has its own instance."""

    name = "cheap_confidence"
    per_row_state = True
    host_path = True  # rows on a CPU: their candidate check on the host (signals.HostCheck)
    SCORES = ("max_prob", "margin")

    def __init__(self, threshold: float, *, source: str = "first_full", k: int = 4, score: str = "max_prob"):
        self.threshold = _check_unit("cheap_confidence threshold", threshold)
        check_online_candidates(source, k, "cheap_confidence")
        if score not in self.SCORES:
            raise ConfigError(f"cheap_confidence score={score!r}; use one of {', '.join(self.SCORES)}")
        self.source, self.k, self.score = source, int(k), score
        self._col = 0 if score == "max_prob" else 1  # the column of signals.FEATURES (cand_max_prob, cand_margin)
        self._signals = None
        self._index: dict = {}
        self._macs: dict = {}
        self._first = None
        self._last_layer = -1

    def reset(self) -> None:
        self._last_layer = -1
        if self._signals is not None:
            self._signals.state = None

    def check_layers(self, model) -> frozenset[int]:
        if self._signals is None or self._signals.model is not model:
            self._signals = CheapSignals(model, self.k, self.source, saturation=False, host=self.host_path)
        self._index = {layer: j for j, layer in enumerate(model.exit_layers)}
        self._first = min(model.exit_layers)
        # the full head (first_full, first exit point) is counted by the loop as an LM-head call
        self._macs = {layer: sum(v for n, v in self._signals.macs_parts(j).items() if n != "full_head")
                      for layer, j in self._index.items()}
        later = [m for layer, m in self._macs.items() if layer != self._first]
        self.macs_per_check = later[0] if later else self._macs[self._first]
        return frozenset(model.exit_layers)

    def logits_at(self, layer: int) -> bool:
        return self.source == "first_full" and layer == self._first

    def check_macs(self, layer: int) -> int:
        return int(self._macs.get(layer, self.macs_per_check))

    def scores(self, layer: int, hidden: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
        """The score [1] of one row's check at ``layer`` (raw state ``hidden`` [1, 1, H]); advances its state."""
        j = self._open_check(layer)
        feats = self._signals.check(j, hidden[:, -1], None if logits is None else logits[:, -1])
        return feats[:, self._col]

    def _open_check(self, layer: int) -> int:
        """Start the check at ``layer``: a new token's candidate set opens at the first exit point. Returns the
        exit-point index."""
        j = self._index[layer]
        if j == 0 or layer <= self._last_layer:
            self._signals.start(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        self._last_layer = layer
        return j

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        return bool(self.scores(layer, hidden, logits)[0] >= self.threshold)

    def decide_rows(self, layer, ctrls, hidden, normed, logits) -> list[bool]:
        """Several rows' checks (each its own copy) in one computation, each copy's candidates advanced
        as :meth:`scores` would."""
        if type(self).scores is not CheapConfidenceExit.scores or type(self).should_exit is not CheapConfidenceExit.should_exit:
            return super().decide_rows(layer, ctrls, hidden, normed, logits)
        j = [c._open_check(layer) for c in ctrls][0]
        feats = self._signals.check_rows(j, [c._signals for c in ctrls], hidden[:, -1],
                                         None if logits is None else logits[:, -1])
        if feats is None:  # not at the same stage: one by one (started above as scores() would; not advanced)
            return [bool(c._signals.check(j, hidden[k:k + 1, -1], None if logits is None else logits[k:k + 1, -1])
                         [0, self._col] >= self.threshold) for k, c in enumerate(ctrls)]
        return (feats[:, self._col] >= self.threshold).tolist()

    def __deepcopy__(self, memo):
        """A row's own instance: same settings and model (shared, never copied), no state."""
        new = type(self)(self.threshold, source=self.source, k=self.k, score=self.score)
        new._signals = None if self._signals is None else copy.copy(self._signals)
        if new._signals is not None:
            new._signals.state = None
        new._index, new._macs, new._first = dict(self._index), dict(self._macs), self._first
        new.macs_per_check = self.macs_per_check
        return new

    def describe(self) -> dict:
        return {"controller": self.name, "threshold": self.threshold, "source": self.source, "k": self.k,
                "score": self.score}
