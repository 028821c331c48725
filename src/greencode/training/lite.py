"""The LITE loss: a weighted sum of next-token losses at every exit point.

``loss = sum_i w_i * CE(lm_head(final_norm(h_i)), next tokens) / sum_i w_i`` over the exit
layers and the final layer, through the model's *own* final norm and single LM head (no
extra heads). Layer indices are 0-based.

The forward pass always runs through the module the trainer holds (``forward_module``:
the bare HF model, or its DDP / FSDP / DeepSpeed wrapper), so distributed gradient
synchronisation and parameter gathering work as usual. The exit hidden states are read
with forward hooks on the decoder layers, and each exit's loss is computed inside its
hook, i.e. while the forward pass is running and every parameter it needs is gathered.
The final layer's loss uses the logits of that same forward pass (HF already computes
``lm_head(final_norm(h_last))``), so the final LM head is not paid twice.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted_targets(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token targets [B, T-1] for positions 0..T-2 (padding -> ``IGNORE_INDEX``)."""
    targets = (input_ids if labels is None else labels).clone()
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return targets[:, 1:]


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits`` [B, T, V] (positions 0..T-1)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def check_weights(weights: Sequence[float], exit_points: Sequence[int]) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != len(exit_points):
        raise ValueError(f"LITE needs one weight per exit point {list(exit_points)} (exits + final layer): "
                         f"got {len(w)} weights {w}")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"LITE weights {w} must be non-negative with a positive sum")
    return w


def lite_loss(model, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
              attention_mask: Optional[torch.Tensor] = None, weights: Sequence[float] = (), *,
              forward_module: Optional[nn.Module] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LITE loss of an :class:`~greencode.models.EarlyExitModel` on one batch.

    ``labels`` default to ``input_ids`` (causal LM: the target at position t is token t+1;
    ``-100`` is ignored). ``weights``: one per exit point (``model.exit_points``, the final
    layer last). ``forward_module``: the module to run the forward pass through (the
    trainer's possibly wrapped model); default ``model.hf``.

    Returns ``(total, per_exit)``: the weighted mean ``sum w_i l_i / sum w_i`` and the list
    of per-exit mean cross-entropies ``l_i`` in the order of ``model.exit_points``
    (gradients flow through both).
    """
    w = check_weights(weights, model.exit_points)
    targets = shifted_targets(input_ids, labels, attention_mask)
    exit_losses: dict[int, torch.Tensor] = {}

    def make_hook(layer_idx: int):
        def hook(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            exit_losses[layer_idx] = _ce(model.decode(h), targets)
        return hook

    # an exit with weight 0 still gets its loss computed (for logging); it adds no gradient
    handles = [model.layers[i].register_forward_hook(make_hook(i)) for i in model.exit_layers]
    try:
        out = (forward_module or model.hf)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in model.exit_layers if i not in exit_losses]
    if missing:
        raise RuntimeError(f"the forward pass did not run exit layers {missing}; is the model wrapped in a way "
                           "that replaces its decoder layers?")
    logits = out.logits if hasattr(out, "logits") else out[0]
    per_exit = [exit_losses[i] for i in model.exit_layers] + [_ce(logits, targets)]
    total = sum(wi * li for wi, li in zip(w, per_exit)) / sum(w)
    return total, per_exit


@torch.no_grad()
def exit_token_stats(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per exit point, summed over the batch's next-token positions: correct predictions,
    agreement with the final layer's prediction and cross-entropy. Tensors of shape
    ``[len(exit_points)]`` plus ``tokens`` (a scalar count)."""
    targets = shifted_targets(input_ids, None, attention_mask)
    valid = targets != IGNORE_INDEX
    hs = model.exit_hidden_states(input_ids, attention_mask)
    preds, ce = [], []
    for h in hs:
        logits = model.decode(h)[:, :-1].float()
        preds.append(logits.argmax(-1))
        ce.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum"))
    final = preds[-1]
    return {
        "correct": torch.stack([((p == targets) & valid).sum() for p in preds]).double(),
        "agree": torch.stack([((p == final) & valid).sum() for p in preds]).double(),
        "ce_sum": torch.stack(ce).double(),
        "tokens": valid.sum().double(),
    }
