"""Lossless early exit: self-speculative decoding as a row of the batched loop.

A lossless row (a row carrying the :class:`Lossless` strategy: ``Row(lossless=True)`` for short,
:func:`~greencode.decoding.generate.generate_lossless`, the endpoint's ``mode: "lossless"``) steps
in the same :class:`~greencode.decoding.generate.DecodeBatch` as every other row, through the same
layer step, exit checks and K/V propagation. The strategy owns the draft; it reaches the batch only
through :meth:`~greencode.decoding.generate.DecodeBatch.full_logits` (the verification pass over the
batch cache) and :meth:`~greencode.decoding.generate.DecodeBatch.mask_last` (a rejected draft's
positions taken back):

1. **Draft.** Each step feeds the row's last token and its controller exits where it says, as
   for a lossy row; the token chosen at the exit is *tentative*: nothing is handed on (streamed,
   tested for EOS or a stop string) until it is verified.
2. **Verify,** in the same step, once the draft has ``k_max`` tentative tokens, a tentative token is
   an EOS, the length is reached, or (``draft_threshold``) the last tentative token's max softmax
   probability at its exit layer is below the threshold. When one row verifies, every lossless row
   with a draft verifies with it: one multi-token step over the batch cache for all of them, each
   row's block of tokens fed since its last verification (:func:`block_logits`). A token fed with
   every layer from an exact state is final at once, with no verification (the never-exit loop).
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

from greencode.decoding.steps import (BlockSlot, block_mask, cache_device, layer_kv, record_logits, sampling_probs,
                                      truncate_logits)
from greencode.decoding.strategies import RowStrategy

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


class Lossless(RowStrategy):
    """The lossless row's strategy: draft with the row's controller, verify with the full model in
    the same step (see the module docstring). ``k_max``: tokens drafted at most before a
    verification; ``draft_threshold``: also verify after a drafted token less confident than this;
    ``verify``: ``reuse`` the draft's exact lower layers or recompute every layer (``full``).
    ``draft``: the tokens drafted since the last verification. A lossless row carries no other
    strategy (it emits the full model's tokens: nothing to teacher-force or observe)."""

    def __init__(self, k_max: int = 4, draft_threshold: Optional[float] = None, verify: str = "reuse"):
        self.k_max, self.draft_threshold, self.verify = k_max, draft_threshold, verify
        self.draft: Optional[Draft] = None

    def prepare(self, row, batch) -> None:
        """Check the settings, give the row its (empty) draft and its counters."""
        if self.k_max < 1:
            raise ValueError(f"k_max={self.k_max} must be >= 1")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify={self.verify!r}; choose one of {', '.join(VERIFY_MODES)}")
        if self.draft_threshold is not None and not 0.0 <= float(self.draft_threshold) <= 1.0:
            raise ValueError(f"draft_threshold={self.draft_threshold!r} must be in [0, 1] (a max softmax probability)")
        if len(row.strategies) > 1:
            raise ValueError("a lossless row emits the full model's tokens: it cannot be observed or teacher-forced")
        # the first token, chosen by the full model from the prompt at the join, is final at once
        self.draft = Draft(final=batch.model.final_layer, verified=1)
        row.keep_states = self.verify == "reuse"
        row.kept_states = [] if row.keep_states else None
        for key in LOSSLESS_COUNTERS:
            row.counters[key] = 0

    def ready(self, row, n: int) -> int:
        return min(n, self.draft.verified)  # a draft is handed on once verified

    @classmethod
    def after_step(cls, batch, st, members: list) -> None:
        """Record each row's new tentative token; when some row's draft ends here, every lossless
        row with a draft verifies, all in one multi-token step."""
        verifying = False
        for r, s in members:
            if s.drafted(st.rows[r], st.exit_at[r], st.row_logits[r], st.controllers[r].runs_all_layers):
                verifying = True
        if verifying:
            verify(batch, [(st.rows[r], r, s) for r, s in members if s.draft.exact])

    def finish(self, row, result) -> None:
        """The counters: the decode steps are the emitted tokens' (what the full model would have
        run), and the draft's acceptance."""
        c = row.counters
        c["decode_steps"] = max(len(row.tokens) - 1, 0)
        c["acceptance_rate"] = (c["accepted"] / c["drafted"]) if c["drafted"] else None
        c["mean_draft_length"] = (c["drafted"] / c["rounds"]) if c["rounds"] else None

    def drafted(self, row, exit_layer: int, logits: torch.Tensor, ran_all: bool) -> bool:
        """Record the token the row just chose at ``exit_layer`` from ``logits``; True when the
        draft ends here and must be verified now."""
        d = self.draft
        d.low = min(d.low, d.final if ran_all else exit_layer)
        d.exact.append(d.low)
        d.logits.append(logits)
        if d.low == d.final:  # every token since the last verification ran every layer: final as it stands
            _exact(row, d)
            return False
        if len(d.exact) >= self.k_max or row.tokens[-1] in row.eos or len(row.tokens) >= row.max_new_tokens:
            return True
        if self.draft_threshold is not None:
            confidence = float(torch.softmax(logits.reshape(-1).float(), dim=-1).max())
            if confidence < self.draft_threshold:
                row.counters["draft_threshold_stops"] += 1
                return True
        return False


@dataclass
class Block:
    """One row's part of a verification: its batch row, the tokens fed since its last
    verification (``fed``, at positions ``start..start+m-1``), their exact parts, kept states and
    the logits that chose the token after each."""

    r: int
    fed: list
    start: int
    exact: list
    states: Optional[list]
    chosen: list

    @property
    def join(self) -> int:  # the first layer any of its tokens runs (E only falls: the last token's)
        return self.exact[-1] + 1


@torch.inference_mode()
def block_logits(model, cache, pad: Optional[torch.Tensor], blocks: list) -> list:
    """The full model's logits ``[V]`` after every fed token of each :class:`Block`, verified
    together: one multi-token step over the batch cache for the rows of all blocks, each block
    padded on the left to the longest. Token ``i`` of a block runs the layers above its exact part
    (``exact[i]``) from its kept state there (layer 0: its embedding) and overwrites its propagated
    K/V with the full model's; padding positions and tokens not yet running write nothing. Returns
    per block (logits, layers run, LM heads run)."""
    adapter = model.adapter
    width = int(cache.get_seq_length())
    size = max(len(b.fed) for b in blocks)
    device = cache_device(cache)
    rows: list = []  # the blocks running, in the order of h's rows
    h = mask = lkw = index = None
    runs = [0] * len(blocks)
    for j, layer in enumerate(adapter.layers):
        joining = [k for k, b in enumerate(blocks) if b.join == j]
        if joining:
            fresh = torch.zeros((len(joining), size, model.hidden_size), dtype=model.dtype, device=device)
            h = fresh if h is None else torch.cat([h, fresh], dim=0)
            rows += joining
            batch_rows = [blocks[k].r for k in rows]
            every = batch_rows == list(range(len(batch_rows))) and len(batch_rows) == layer_kv(cache, 0)[0].shape[0]
            index = slice(None) if every else torch.tensor(batch_rows, device=device)  # all rows in order: views
            positions = torch.stack([torch.arange(blocks[k].start + len(blocks[k].fed) - size,
                                                  blocks[k].start + len(blocks[k].fed), device=device).clamp(min=0)
                                     for k in rows])
            lkw = adapter.layer_kwargs(h, positions)
            mask = torch.cat([block_mask(None if pad is None else pad[blocks[k].r], size, width, model.dtype, device)
                              for k in rows])
        if h is None:
            continue
        valid = torch.zeros((len(rows), size), dtype=torch.bool, device=device)
        for p, k in enumerate(rows):
            b, off = blocks[k], size - len(blocks[k].fed)
            for i, e in enumerate(b.exact):
                if e == j - 1:  # token i joins: its state after layer j - 1 (its embedding at layer 0)
                    h[p, off + i] = (adapter.embed(torch.tensor([[b.fed[i]]], device=device),
                                                   torch.tensor([[b.start + i]], device=device))[0, 0] if j == 0
                                     else b.states[i][j - 1].to(model.dtype))
                valid[p, off + i] = e < j
            runs[k] += int(sum(e < j for e in b.exact))
        out = layer(h, attention_mask=mask, past_key_values=BlockSlot(cache, j, index, valid), use_cache=True, **lkw)
        h = out[0] if isinstance(out, tuple) else out
    top = model.decode(h) if h is not None else None
    results = []
    for k, b in enumerate(blocks):
        m, p = len(b.fed), rows.index(k)
        first = next(i for i, e in enumerate(b.exact) if e < len(adapter.layers) - 1)
        logits = [b.chosen[i].reshape(-1) for i in range(first)] + [top[p, size - m + i] for i in range(first, m)]
        results.append((logits, runs[k], m - first))
    return results


def accept(row, draft: Draft, full: list) -> tuple[int, Optional[int]]:
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
    q = sampling_probs(torch.stack([lg.reshape(-1) for lg in draft.logits]), row.temperature, row.top_p, row.top_k)
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


def _exact(row, d: Draft) -> None:
    """Every token since the last verification ran every layer from an exact state: they are the
    full model's as they stand (no verification)."""
    c = row.counters
    c["rounds"] += 1
    c["drafted"] += len(d.exact)
    c["accepted"] += len(d.exact)
    c["exact_tokens"] += len(d.exact)
    d.reset(len(row.tokens))


def verify(batch, rows: list) -> None:
    """Verify the drafts of ``rows`` (``(row, its index in the batch, its Lossless)``) together
    (see the module docstring): keep each row's accepted tokens, put the full model's token in
    place of its first rejected one, and roll back the positions after it. The batch is reached
    through ``full_logits`` and ``mask_last`` only."""
    blocks, of_block = [], []
    for row, r, s in rows:
        d, c = s.draft, row.counters
        m = len(d.exact)
        if all(e == d.final for e in d.exact):  # no early exit since the last verification: all the full model's
            _exact(row, d)
            continue
        c["rounds"] += 1
        c["drafted"] += m
        blocks.append(Block(r, row.tokens[-1 - m:-1], row.pos - m, d.exact if s.verify == "reuse" else [-1] * m,
                            row.kept_states[-m:] if row.kept_states else None, d.logits))
        of_block.append((row, s))
    if not blocks:
        return
    for b, (row, s), (full, layers_run, heads) in zip(blocks, of_block, batch.full_logits(blocks)):
        d, c, m = s.draft, row.counters, len(b.fed)
        c["verified_tokens"] += m
        c["lm_head_calls"] += heads
        c["layers_run"] += layers_run
        n, replacement = accept(row, d, full)
        c["accepted"] += n
        keep = d.verified + n
        if row.logits_seen is not None or row.token_logprobs is not None:  # the full model's, not the draft's
            truncate_logits(row, d.verified)
            for i in range(n):
                record_logits(row, row.tokens[d.verified + i], full[i])
            if replacement is not None:
                record_logits(row, replacement, full[n])
        if replacement is not None:
            rolled = m - n - 1  # fed tokens after the rejected one: their positions are taken back
            del row.tokens[keep:], row.exit_layers[keep:]
            row.tokens.append(replacement)
            row.exit_layers.append(d.final)
            row.last_logits = full[n].reshape(1, 1, -1)
            if rolled:
                batch.mask_last(b.r, rolled)
                row.pos -= rolled
        for k in range(d.verified, len(row.exit_layers)):
            row.exit_layers[k] = d.final  # every emitted token is the full model's
        if row.kept_states is not None:
            row.kept_states.clear()
        d.reset(len(row.tokens))

