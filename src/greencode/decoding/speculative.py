"""Lossless early exit: self-speculative decoding as a row of the batched loop.

A lossless row (``Row(lossless=True)``, :func:`~greencode.decoding.generate.generate_lossless`, the
endpoint's ``mode: "lossless"``) steps in the same :class:`~greencode.decoding.generate.DecodeBatch`
as every other row, through the same layer step, exit checks and K/V propagation:

1. **Draft.** Each step feeds the row's last token and its controller exits where it says, as
   for a lossy row; the token chosen at the exit is *tentative*: nothing is handed on (streamed,
   tested for EOS or a stop string) until it is verified.
2. **Verify,** in the same step, once the draft has ``k_max`` tentative tokens, a drafted token ran
   to the final layer (the controller was not confident anywhere), a tentative token is an EOS,
   the length is reached, or (``draft_threshold``) the last tentative token's max softmax
   probability at its exit layer is below the threshold. Verification is a multi-token step of
   this row alone over the batch cache: the full model's logits after each token fed since the
   last verification (:func:`block_logits`).
3. **Accept,** greedy: the longest prefix of tentative tokens equal to the full model's greedy
   tokens, then the full model's own token in place of the first that differs. Sampling:
   speculative sampling (Leviathan et al. 2023; Chen et al. 2023): tentative token ``x`` is kept
   with probability ``min(1, p(x) / q(x))``, where ``q`` is the processed distribution (temperature,
   top-k, top-p, as the loop samples) it was drawn from at its exit layer and ``p`` the full
   model's; at the first rejection the token is drawn from ``norm(max(0, p - q))``. The row's
   positions after a rejected token are rolled back: masked out of its attention (its cache
   columns stay until the row leaves the batch) and its next position reused.

So a greedy lossless row emits exactly the full model's greedy tokens and a sampled one has
exactly the full model's sampling distribution, whatever the controller and whatever rows step
beside it (tested against HF and with a chi-square test and a negative control).

**Reuse** (``verify="reuse"``, the default). A fed token's states are the full model's up to the
lowest exit of the steps that fed it and the tokens before it since the last verification: its
``E_i = min(e_0..e_i)``. Its K/V of layers ``0..E_i`` are exact and stay; layer ``j`` runs on the
block's suffix of tokens with ``E_i < j`` (a suffix, since ``E`` only falls), each joining from
its state at ``E_i`` kept by the draft, and overwrites their propagated K/V with exact ones.
Tokens exact through the final layer need no verification: the logits that chose their successor
were the full model's. LayerSkip's cache reuse is the case of one fixed exit layer.
``verify="full"`` recomputes every layer of the block (for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from greencode.decoding.steps import RowSlot, block_mask, sampling_probs

VERIFY_MODES = ("reuse", "full")
LOSSLESS_COUNTERS = ("rounds", "drafted", "accepted", "verified_tokens", "exact_tokens", "residual_samples",
                     "draft_threshold_stops")


@dataclass
class Draft:
    """A lossless row's tokens since its last verification: for each token fed since then, the
    highest layer through which its states are exact (``E_i``), and the logits that chose the
    tentative token after it. ``verified``: the row's tokens that are final."""

    final: int
    low: int = 0
    exact: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    verified: int = 0

    def __post_init__(self):
        self.low = self.final

    def reset(self, verified: int) -> None:
        self.exact.clear()
        self.logits.clear()
        self.low = self.final
        self.verified = verified


def start(row, model, observe: bool) -> None:
    """Check a lossless row's settings and give it its (empty) draft."""
    if row.k_max < 1:
        raise ValueError(f"k_max={row.k_max} must be >= 1")
    if row.verify not in VERIFY_MODES:
        raise ValueError(f"verify={row.verify!r}; choose one of {', '.join(VERIFY_MODES)}")
    if row.draft_threshold is not None and not 0.0 <= float(row.draft_threshold) <= 1.0:
        raise ValueError(f"draft_threshold={row.draft_threshold!r} must be in [0, 1] (a max softmax probability)")
    if observe or row.forced is not None or row.return_logits or row.logprobs is not None:
        raise ValueError("a lossless row returns the full model's tokens only: no observe, forced tokens, logits "
                         "or log probabilities")
    row.draft = Draft(final=model.final_layer)
    row.keep_states = row.verify == "reuse"
    row.kept_states = [] if row.keep_states else None
    for key in LOSSLESS_COUNTERS:
        row.counters[key] = 0


def drafted(row, exit_layer: int, logits: torch.Tensor, ran_all: bool) -> bool:
    """Record the token a lossless row just chose at ``exit_layer`` from ``logits``; True when the
    draft ends here and must be verified now."""
    d = row.draft
    d.low = min(d.low, d.final if ran_all else exit_layer)
    d.exact.append(d.low)
    d.logits.append(logits)
    if exit_layer == d.final or len(d.exact) >= row.k_max or row.tokens[-1] in row.eos \
            or len(row.tokens) >= row.max_new_tokens:
        return True
    if row.draft_threshold is not None:
        confidence = float(torch.softmax(logits.reshape(-1).float(), dim=-1).max())
        if confidence < row.draft_threshold:
            row.counters["draft_threshold_stops"] += 1
            return True
    return False


@torch.inference_mode()
def block_logits(model, cache, pad_row: Optional[torch.Tensor], r: int, fed: torch.Tensor, positions: torch.Tensor,
                 exact: list, states: Optional[list], chosen: list) -> tuple[list, int, int]:
    """The full model's logits ``[V]`` after each of the ``m`` tokens ``fed`` (``[1, m]``, at
    ``positions``) that batch row ``r`` fed last, the layers run and the LM heads run. The tokens' K/V of the
    layers above their exact part are overwritten with the full model's (see the module
    docstring); ``states[i][j]``: token ``i``'s state after layer ``j``; ``chosen[i]``: the
    logits that chose the token after token ``i`` (the full model's when ``exact[i]`` is final)."""
    m = fed.shape[1]
    adapter = model.adapter
    width = int(cache.get_seq_length())
    first, h, layers_run = m, None, 0  # the block's suffix being run: tokens first..m-1
    mask = lkw = None
    for j, layer in enumerate(adapter.layers):
        join = first
        while join > 0 and exact[join - 1] < j:  # tokens whose exact part ends below this layer join the suffix
            join -= 1
        if join < first:
            if j == 0:
                new = adapter.embed(fed[:, join:first], positions[:, join:first])
            else:
                new = torch.stack([states[i][j - 1] for i in range(join, first)])[None].to(model.dtype)
            h = new if h is None else torch.cat([new, h], dim=1)
            first = join
            # positions, rotary tables and the causal mask change only when tokens join the suffix
            lkw = adapter.layer_kwargs(h, positions[:, first:])
            mask = block_mask(pad_row, m - first, width, model.dtype, h.device)
        if h is None:
            continue
        out = layer(h, attention_mask=mask, past_key_values=RowSlot(cache, j, r, m - first), use_cache=True, **lkw)
        h = out[0] if isinstance(out, tuple) else out
        layers_run += m - first
    top = model.decode(h)[0] if h is not None else None
    logits = [chosen[i].reshape(-1) for i in range(first)] + [top[k] for k in range(m - first)]
    return logits, layers_run, m - first


def accept(row, full: list) -> tuple[int, Optional[int]]:
    """How many of the ``m`` tentative tokens the full model keeps, and the token it puts in
    place of the first it does not (None when it keeps them all)."""
    tentative = row.tokens[len(row.tokens) - len(full):]
    if not (row.do_sample and row.temperature > 0):
        preds = torch.stack(full).argmax(-1).tolist()
        n = 0
        while n < len(full) and tentative[n] == preds[n]:
            n += 1
        return n, (preds[n] if n < len(full) else None)
    p = sampling_probs(torch.stack(full), row.temperature, row.top_p, row.top_k)
    q = sampling_probs(torch.stack([lg.reshape(-1) for lg in row.draft.logits]), row.temperature, row.top_p, row.top_k)
    gen = row.generator
    for n, x in enumerate(tentative):
        u = float(torch.rand((), generator=gen, device=gen.device if gen is not None else p.device))
        if u * float(q[n, x]) < float(p[n, x]):  # keep with probability min(1, p/q)
            continue
        residual = (p[n] - q[n]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: never rejected in exact arithmetic
            residual = p[n]
        row.counters["residual_samples"] += 1
        return n, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(full), None


def verify(batch, r: int) -> None:
    """Verify batch row ``r``'s draft (see the module docstring): keep the accepted tokens, put the
    full model's token in place of the first rejected one, and roll back the positions after it."""
    row, model = batch.rows[r], batch.model
    d, c = row.draft, row.counters
    m = len(d.exact)
    c["rounds"] += 1
    c["drafted"] += m
    if all(e == d.final for e in d.exact):  # no early exit since the last verification: all the full model's
        c["accepted"] += m
        c["exact_tokens"] += m
        d.reset(len(row.tokens))
        return
    device = row.prompt.device
    fed = torch.tensor([row.tokens[-1 - m:-1]], dtype=torch.long, device=device)
    positions = torch.arange(row.pos - m, row.pos, device=device)[None]
    exact = d.exact if row.verify == "reuse" else [-1] * m
    pad_row = batch.pad[r] if batch.pad is not None else None
    full, layers_run, heads = block_logits(model, batch.cache, pad_row, r, fed, positions, exact,
                                           row.kept_states[-m:] if row.kept_states else None, d.logits)
    c["verified_tokens"] += m
    c["lm_head_calls"] += heads
    c["layers_run"] += layers_run
    n, replacement = accept(row, full)
    c["accepted"] += n
    keep = d.verified + n
    if replacement is not None:
        rolled = m - n - 1  # fed tokens after the rejected one: their positions are taken back
        del row.tokens[keep:], row.exit_layers[keep:]
        row.tokens.append(replacement)
        row.exit_layers.append(d.final)
        row.last_logits = full[n].reshape(1, 1, -1)
        if rolled:
            batch.mask_last(r, rolled)
            row.pos -= rolled
    for k in range(d.verified, len(row.exit_layers)):
        row.exit_layers[k] = d.final  # every emitted token is the full model's
    if row.kept_states is not None:
        row.kept_states.clear()
    d.reset(len(row.tokens))


def finish_counters(row) -> None:
    """A finished lossless row's counters: its decode steps are its emitted tokens' (what the
    full model would have run), and the draft's acceptance."""
    c = row.counters
    c["decode_steps"] = max(len(row.tokens) - 1, 0)
    c["acceptance_rate"] = (c["accepted"] / c["drafted"]) if c["drafted"] else None
    c["mean_draft_length"] = (c["drafted"] / c["rounds"]) if c["rounds"] else None
