"""Early-exit-ready pretraining, LayerSkip-style, as small composable pieces.

* :func:`loss_scales` - how the early-exit loss is spread over the exit points (by name:
  ``one``, ``l``, ``sqrt_l``, ``inv_l``; normalised to sum 1).
* :class:`ExitCurriculum` - which exit points get a loss at a given step: ``none`` (all of
  them), ``rotational`` (every ``period``-th exit point, rotating with the step, LayerSkip's
  rotational curriculum) or ``gradual`` (deepest first, the shallower ones switched on over
  the first ``gradual_fraction`` of training).
* :class:`LayerDropout` - stochastic depth rising with depth (per sample: a dropped layer
  passes its input through; only the kept rows run the layer, so dropping saves compute).
* :func:`early_exit_loss` - ``CE_final + e_scale * sum_i s_i CE_i + distill * sum_i s_i
  KL(p_final || p_i)`` over the active exit points, every exit decoded through the model's
  own final norm and single LM head (no extra heads). The KL term is self-distillation: the
  exits also learn the final layer's distribution (the target is detached).

Layer indices are 0-based (index ``i`` = the output of the i-th decoder layer).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from greencode.training.lite import IGNORE_INDEX, shifted_targets

SCALE_TYPES = ("one", "l", "sqrt_l", "inv_l")
CURRICULA = ("none", "rotational", "gradual")
DROPOUT_SCALES = ("uniform", "linear", "exp")


def loss_scales(layers: Sequence[int], kind: str = "one") -> list[float]:
    """Relative weight of each exit point's loss, normalised to sum 1. ``l`` grows with the
    1-based depth (LayerSkip's default), ``inv_l`` favours the shallow exits."""
    if kind not in SCALE_TYPES:
        raise ValueError(f"unknown early-exit loss scale {kind!r}; known: {', '.join(SCALE_TYPES)}")
    if not layers:
        return []
    f = {"one": lambda d: 1.0, "l": lambda d: float(d), "sqrt_l": math.sqrt, "inv_l": lambda d: 1.0 / d}[kind]
    raw = [f(i + 1) for i in layers]
    total = sum(raw)
    return [r / total for r in raw]


class ExitCurriculum:
    """Which exit points (indices into ``exit_layers``) get a loss at ``step``."""

    def __init__(self, num_exits: int, kind: str = "none", period: int = 2, gradual_fraction: float = 0.5,
                 max_steps: int = 1):
        if kind not in CURRICULA:
            raise ValueError(f"unknown early-exit curriculum {kind!r}; known: {', '.join(CURRICULA)}")
        if period < 1:
            raise ValueError(f"curriculum period must be >= 1, got {period}")
        self.n, self.kind, self.period = num_exits, kind, period
        self.gradual_fraction, self.max_steps = gradual_fraction, max(1, max_steps)

    def active(self, step: int) -> list[int]:
        if self.kind == "none" or self.n == 0:
            return list(range(self.n))
        if self.kind == "rotational":
            # exits are numbered from the deepest, so the deepest exit is on at step 0
            phase = step % self.period
            return [i for i in range(self.n) if (self.n - 1 - i) % self.period == phase]
        # gradual: the deepest exit from step 0, one more (shallower) exit every few steps
        ramp = max(1.0, self.gradual_fraction * self.max_steps)
        on = min(self.n, 1 + int(step / ramp * self.n))
        return list(range(self.n - on, self.n))


def layer_dropout_probs(num_layers: int, p_max: float, scale: str = "linear") -> list[float]:
    """Per-layer drop probability rising from 0 (first layer) to ``p_max`` (last layer):
    ``linear`` in depth, ``exp`` (slow at first, LayerSkip's exponential), or ``uniform``."""
    if scale not in DROPOUT_SCALES:
        raise ValueError(f"unknown layer-dropout scale {scale!r}; known: {', '.join(DROPOUT_SCALES)}")
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"layer dropout p_max must be in [0, 1), got {p_max}")
    if num_layers <= 1 or p_max == 0.0:
        return [0.0 if scale != "uniform" else p_max] * num_layers
    out = []
    for i in range(num_layers):
        x = i / (num_layers - 1)
        out.append(p_max if scale == "uniform" else p_max * (x if scale == "linear" else (2.0 ** x - 1.0)))
    return out


_BATCHED_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


class LayerDropout:
    """Per-sample stochastic depth on a model's decoder layers while ``module.training``.

    ``install(layers)`` wraps each layer's ``forward``: each row of the batch skips layer
    ``i`` with probability ``probs[i]`` (its hidden state passes through unchanged), and only
    the kept rows run the layer. Forward hooks on the layer (the exit losses) still see the
    whole batch. ``remove()`` restores the layers. Seeded by ``seed`` so runs repeat.
    """

    def __init__(self, probs: Sequence[float], seed: int = 0):
        self.probs = [float(p) for p in probs]
        self._gen = torch.Generator().manual_seed(seed)
        self._orig: list[tuple[nn.Module, object]] = []

    def install(self, layers: Sequence[nn.Module]) -> "LayerDropout":
        if len(layers) != len(self.probs):
            raise ValueError(f"layer dropout has {len(self.probs)} probabilities for {len(layers)} layers")
        for layer, p in zip(layers, self.probs):
            if p <= 0:
                continue
            orig = layer.forward
            self._orig.append((layer, orig))
            layer.forward = self._wrap(layer, orig, p)
        return self

    def remove(self) -> None:
        for layer, _ in self._orig:
            if "forward" in layer.__dict__:
                del layer.forward
        self._orig.clear()

    def _wrap(self, layer: nn.Module, orig, p: float):
        def forward(hidden_states, *args, **kwargs):
            if not layer.training:
                return orig(hidden_states, *args, **kwargs)
            b = hidden_states.shape[0]
            keep = torch.rand(b, generator=self._gen) >= p
            if bool(keep.all()):
                return orig(hidden_states, *args, **kwargs)
            if not bool(keep.any()):
                return hidden_states
            idx = keep.nonzero().squeeze(1).to(hidden_states.device)
            sub = {k: _rows(v, idx, b) if k in _BATCHED_KWARGS else v for k, v in kwargs.items()}
            out = orig(hidden_states.index_select(0, idx), *args, **sub)
            h_kept = out[0] if isinstance(out, tuple) else out
            merged = hidden_states.index_copy(0, idx, h_kept.to(hidden_states.dtype))
            return (merged, *out[1:]) if isinstance(out, tuple) else merged
        return forward


def _rows(v, idx: torch.Tensor, batch: int):
    """The kept rows of a batched layer argument (tensors whose first dimension is the batch;
    broadcast ones, such as shared rotary tables of batch 1, stay as they are)."""
    if isinstance(v, torch.Tensor):
        return v.index_select(0, idx) if v.dim() > 0 and v.shape[0] == batch and batch > 1 else v
    if isinstance(v, tuple):
        return tuple(_rows(x, idx, batch) for x in v)
    return v


def _sampled_positions(targets: torch.Tensor, fraction: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Flat indices of the valid next-token positions that get an early-exit loss: all of
    them, or a random ``fraction`` (the same ones for every exit point of the step)."""
    valid = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    if fraction >= 1.0 or valid.numel() == 0:
        return valid
    k = max(1, int(round(valid.numel() * fraction)))
    pick = torch.randperm(valid.numel(), generator=generator)[:k].to(valid.device)
    return valid.index_select(0, pick.sort().values)


def _forward_with_exit_states(model, layers: Sequence[int], input_ids: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], forward_module: Optional[nn.Module]
                              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward pass of ``forward_module`` (default ``model.hf``) without cache; returns its
    logits and the hidden states output by each decoder layer in ``layers`` (forward hooks,
    removed again whatever happens)."""
    states: dict[int, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(_m, _a, out):
            states[idx] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [model.layers[i].register_forward_hook(make_hook(i)) for i in layers]
    try:
        out = (forward_module or model.hf)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, states


def _distill_target(logits: torch.Tensor, pos: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-distillation target at the sampled positions ``pos``: the final layer's detached
    probabilities at ``temperature`` and their mean negative entropy (the constant part of the KL)."""
    final_sel = logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, pos).detach().float()
    target_logp = F.log_softmax(final_sel / temperature, dim=-1)
    target_p = target_logp.exp()
    neg_entropy = (target_p * target_logp).sum(-1).mean()
    return target_p, neg_entropy


def _exit_term(model, state: torch.Tensor, pos: torch.Tensor, y: torch.Tensor, *, e_scale: float, distill: float,
               distill_temperature: float, target_p: Optional[torch.Tensor], neg_entropy: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One exit point's loss at the sampled positions ``pos``; returns ``(ce, term)``: its
    cross-entropy against ``y`` and ``e_scale * ce`` plus ``distill`` times its KL to the final
    layer's distribution (when ``target_p`` is given), before its exit weight."""
    h = state[:, :-1].reshape(-1, state.shape[-1]).index_select(0, pos)
    exit_logits = model.decode(h).float()
    # one log-softmax per exit serves both terms (at temperature 1): CE = -logp[y] and
    # KL(p_final || p_exit) = sum p_final log p_final - sum p_final logp
    logp = F.log_softmax(exit_logits, dim=-1)
    ce = F.nll_loss(logp, y)
    term = e_scale * ce
    if target_p is not None:
        logp_t = logp if distill_temperature == 1.0 else F.log_softmax(exit_logits / distill_temperature, dim=-1)
        kl = (neg_entropy - (target_p * logp_t).sum(-1).mean()) * distill_temperature ** 2
        term = term + distill * kl
    return ce, term


def early_exit_loss(model, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None, *, active: Sequence[int],
                    scales: Sequence[float], e_scale: float = 1.0, distill: float = 0.0,
                    distill_temperature: float = 1.0, token_fraction: float = 1.0,
                    generator: Optional[torch.Generator] = None, forward_module: Optional[nn.Module] = None
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The early-exit pretraining loss of an :class:`~greencode.models.EarlyExitModel`.

    ``active``: indices into ``model.exit_layers`` that get a loss this step; ``scales``:
    one weight per exit layer (:func:`loss_scales`). The active scales are renormalised to
    sum 1, so a rotational curriculum does not shrink the early-exit term. The final layer's
    loss covers every position; the exits' losses cover a random ``token_fraction`` of them
    (the same positions for every exit), since an exit's LM head costs about as much as 2-3
    decoder layers of a small model. Returns ``(total, per_layer)``: ``per_layer`` maps each
    active exit layer and the final layer to its mean cross-entropy (detached), for logging.
    """
    if not 0.0 < token_fraction <= 1.0:
        raise ValueError(f"token_fraction must be in (0, 1], got {token_fraction}")
    targets = shifted_targets(input_ids, labels, attention_mask)
    layers = [model.exit_layers[i] for i in active]
    logits, states = _forward_with_exit_states(model, layers, input_ids, attention_mask, forward_module)
    vocab = logits.shape[-1]
    final_ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    per_layer = {model.num_layers - 1: final_ce.detach()}
    total = final_ce
    pos = _sampled_positions(targets, token_fraction, generator) if layers else None
    if not layers or pos.numel() == 0:
        return total, per_layer
    y = targets.reshape(-1).index_select(0, pos)
    w = [scales[i] for i in active]
    w_sum = sum(w) or 1.0
    target_p = neg_entropy = None
    if distill > 0:
        # the final layer's distribution is a detached target: its probabilities and its negative entropy
        # (the constant part of the KL) are computed once per step, not once per exit
        target_p, neg_entropy = _distill_target(logits, pos, distill_temperature)
    for layer, wi in zip(layers, w):
        ce, term = _exit_term(model, states[layer], pos, y, e_scale=e_scale, distill=distill,
                              distill_temperature=distill_temperature, target_p=target_p, neg_entropy=neg_entropy)
        per_layer[layer] = ce.detach()
        total = total + (wi / w_sum) * term
    return total, per_layer
