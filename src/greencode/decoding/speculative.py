"""Lossless early exit: self-speculative decoding with the exit controller as the drafter.

Each round continues from an exact state (a cache holding the full model's K/V of every
accepted token, and the full model's logits at the last one; one cache, advanced and cropped in
place, never copied):

1. **Draft** with :func:`greencode.decoding.generate` itself (the one decoding loop): the first
   token comes from the exact logits; each further token exits where the controller says
   (RL policy, fixed layer, confidence). Drafting stops after ``k_max`` tokens, at EOS, as soon
   as a drafted token ran to the final layer (the controller was not confident anywhere: the
   next one would need the exact state anyway), or, with ``draft_threshold``, as soon as a
   drafted token's max softmax probability at its exit layer is below that threshold (the draft
   length is chosen as it goes).
2. **Verify** all drafted tokens in one forward pass of the full model from the exact state.
3. **Accept**, greedy: the longest drafted prefix that equals the full model's greedy tokens,
   then the full model's own next token. Sampling (``do_sample``): speculative sampling (Leviathan
   et al. 2023; Chen et al. 2023): drafted token ``x`` is accepted with probability
   ``min(1, p(x) / q(x))``, where ``q`` is the processed distribution (temperature, top-k, top-p,
   exactly as the loop samples) the draft sampled it from at its exit layer and ``p`` the full
   model's processed distribution there; at the first rejection the next token is drawn from
   ``norm(max(0, p - q))``, and when every drafted token is accepted the next one is drawn from
   ``p``. The verified cache is cropped to the accepted tokens (the K/V of rejected tokens are
   rolled back).

So the greedy output is exactly the full model's greedy output, and the sampled output has
exactly the full model's sampling distribution (tested with a chi-square test and a negative
control), whatever the controller. With a ``seed`` the sampled output is reproducible: one
``torch.Generator`` seeded from it draws the acceptance tests, the residual samples and each
round's draft seed. A token that was sampled is never sampled again (a token chosen but not yet
fed at the end of a round is carried into the next round as that round's first token), so no
draw is discarded depending on its value.

A round in which no drafted token exited early needs no verification: every token was chosen by
the full model, step by step, from an exact cache (what the never-exit loop does), so it is
accepted as drafted and the next round continues from the draft's own state (``exact_tokens``).

Otherwise (``verify="reuse"``, the default) verification reuses what the draft computed exactly.
A fed draft token's states are the full model's up to the lowest exit of the drafted tokens up
to and including it (deeper, it attended to propagated K/V): its ``E_i = min(e_0..e_i)``. So its
K/V of layers ``0..E_i`` stay in the cache, and only the layers above are run, from its state at
``E_i`` (kept by the draft, ``keep_states``): layer ``j`` runs on the block's suffix of tokens
with ``E_i < j`` (a suffix, since ``E`` only falls), writing their exact K/V over the propagated
ones, and the last drafted token (never fed) runs every layer. LayerSkip's cache reuse is the
case of one fixed exit layer. ``verify="full"`` recomputes every layer of the block from the
exact cache before it (the first implementation; for comparison).

``eos_token_id``, ``stop_strings`` / ``tokenizer``, ``on_token`` and ``should_stop`` follow
:func:`~greencode.decoding.generate`'s semantics on the emitted (accepted) tokens; ``should_stop``
is polled between rounds.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import torch

from greencode.decoding.compiled import _Slot
from greencode.decoding.controllers import ExitController
from greencode.decoding.generate import GenerationResult, Prefill, _growable, generate, prefill

VERIFY_MODES = ("reuse", "full")


def _crop(cache, length: int) -> None:
    """Keep the first ``length`` positions. ``crop`` with a negative count (tokens to remove)
    means the same in every transformers version that has it."""
    remove = int(cache.get_seq_length()) - length
    if remove <= 0:
        return
    if hasattr(cache, "crop"):
        cache.crop(-remove)
        return
    for i in range(len(cache)):  # pragma: no cover - transformers without DynamicCache.crop
        cache.key_cache[i] = cache.key_cache[i][:, :, :length]
        cache.value_cache[i] = cache.value_cache[i][:, :, :length]


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution ``[..., V]`` (float32) the decoding loop samples a token from, given its
    logits ``[..., V]``: temperature, then top-k, then top-p (the smallest prefix reaching
    ``top_p``), then softmax; the same processing as the loop's token selection (tested: the same
    generator state gives the same token). ``temperature`` must be > 0 (0 is greedy)."""
    logits = logits.float() / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cumulative = probs.cumsum(-1)
        remove = cumulative - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def _forced_logits(token: int, vocab: int, device) -> torch.Tensor:
    """Logits ``[1, 1, V]`` from which greedy and sampled selection (any temperature, top-k,
    top-p) both choose ``token``: the next round's first token is one already chosen."""
    out = torch.full((1, 1, vocab), float("-inf"), device=device)
    out[0, 0, token] = 0.0
    return out


class _DraftConfidence(ExitController):
    """Wraps the drafting controller and records the max softmax probability of the
    distribution at the layer where the token exited (for ``draft_threshold``). The decisions
    are the wrapped controller's. When the wrapped controller gets no logits (the policy, a
    fixed layer), the LM head runs once more at the exit (counted in ``extra_heads``)."""

    def __init__(self, inner: ExitController, model):
        self.inner = inner
        self.model = model
        self.name = getattr(inner, "name", "draft")
        self.confidence: Optional[float] = None
        self.extra_heads = 0

    # the loop reads these flags as it goes (PolicyExit changes needs_normed when it fuses)
    needs_logits = property(lambda self: self.inner.needs_logits)
    needs_normed = property(lambda self: self.inner.needs_normed)
    runs_all_layers = property(lambda self: self.inner.runs_all_layers)
    macs_per_check = property(lambda self: self.inner.macs_per_check)
    per_row_state = property(lambda self: getattr(self.inner, "per_row_state", False))

    def reset(self) -> None:
        self.inner.reset()
        self.confidence = None

    def check_layers(self, model) -> frozenset[int]:
        return self.inner.check_layers(model)

    def take(self) -> Optional[float]:
        value, self.confidence = self.confidence, None
        return value

    def _record(self, hidden, normed, logits) -> None:
        if logits is None:
            logits = self.model.adapter.lm_head(normed) if normed is not None else self.model.decode(hidden)
            self.extra_heads += 1
        self.confidence = float(torch.softmax(logits[0, -1].float(), dim=-1).max())

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        decision = bool(self.inner.should_exit(layer, hidden, normed, logits))
        if decision:
            self._record(hidden, normed, logits)
        return decision

    def should_exit_rows(self, layer, hidden, normed, logits) -> list[bool]:
        decisions = list(self.inner.should_exit_rows(layer, hidden, normed, logits))
        for r, decision in enumerate(decisions):  # the draft is one row
            if decision:
                self._record(hidden[r:r + 1], None if normed is None else normed[r:r + 1],
                             None if logits is None else logits[r:r + 1])
        return decisions

    def describe(self) -> dict:
        return self.inner.describe()


@torch.inference_mode()
def _verify_reusing(model, cache, start: int, d: Sequence[int], draft: GenerationResult):
    """The full model's logits after each token of the block ``d`` (``[1, len(d), V]``), reusing the
    draft's exact lower layers (see the module docstring). ``cache`` holds the exact positions
    before ``start`` and the draft's fed tokens ``d[:-1]`` (exact K/V up to each token's ``E_i``,
    propagated above); on return it holds the full model's K/V of every block token at every
    layer. Returns (logits, layers run, LM heads run)."""
    n = len(d)
    final = model.final_layer
    adapter, layers = model.adapter, model.adapter.layers
    exact = []  # E_i: the highest layer through which fed token i's states are the full model's
    low = final
    for i in range(n - 1):
        low = min(low, draft.exit_layers[i + 1])
        exact.append(low)
    exact.append(-1)  # the last token was never fed: every layer
    device = cache.layers[0].keys.device if hasattr(cache, "layers") else draft.state.logits.device
    total = start + n
    if int(cache.get_seq_length()) != total - 1:
        raise RuntimeError(f"the draft's cache holds {int(cache.get_seq_length())} positions, expected {total - 1}")
    _growable(cache)
    first = n - 1  # the block's suffix being run: tokens first..n-1
    last = torch.tensor([[d[-1]]], dtype=torch.long, device=device)
    h = adapter.embed(last, torch.tensor([[total - 1]], device=device))
    min_ = torch.finfo(model.dtype).min
    layers_run = 0
    for j, layer in enumerate(layers):
        join = first
        while join > 0 and exact[join - 1] < j:  # tokens whose exact part ends below this layer join the suffix
            join -= 1
        if join < first or j == 0:
            if join < first:
                states = torch.stack([draft.kept_states[i][j - 1] for i in range(join, first)])[None].to(h.dtype)
                h = torch.cat([states, h], dim=1)
                first = join
            # positions, rotary tables and the causal mask change only when tokens join the suffix
            q = n - first
            positions = torch.arange(start + first, total, device=device)[None]
            lkw = adapter.layer_kwargs(h, positions)
            mask = torch.full((1, 1, q, total), min_, dtype=model.dtype, device=device)
            mask[0, 0] = mask[0, 0].triu(start + first + 1)  # each query sees the columns up to its own
        kb, vb, _ = cache.layers[j].reserve(1)
        slot = _Slot(kb[:, :, :total], vb[:, :, :total], positions[0])
        out = layer(h, attention_mask=mask, past_key_values=slot, use_cache=True, **lkw)
        h = out[0] if isinstance(out, tuple) else out
        cache.layers[j].extend(total)
        layers_run += q
    top = model.decode(h)  # the suffix's logits at the final layer
    if first == 0:
        return top, layers_run, n
    # tokens exact through the final layer: the logits that chose the next drafted token were the full model's
    before = torch.stack([draft.logits[i + 1].to(top.device, top.dtype) if draft.logits is not None else
                          _forced_logits(d[i + 1], top.shape[-1], top.device)[0, 0].to(top.dtype)
                          for i in range(first)])[None]
    return torch.cat([before, top], dim=1), layers_run, n - first


def _prompt_length(input_ids) -> int:
    if isinstance(input_ids, torch.Tensor):
        return int(input_ids.shape[-1])
    return len(input_ids)


@torch.inference_mode()
def generate_lossless(model, input_ids: Union[torch.Tensor, Sequence[int]], controller: ExitController,
                      max_new_tokens: int = 15, *, k_max: int = 6, draft_threshold: Optional[float] = None,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      seed: Optional[int] = None,
                      eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                      stop_strings: Optional[Sequence[str]] = None, tokenizer=None,
                      kv_strategy: str = "propagate",
                      on_token: Optional[Callable[[int, int], None]] = None,
                      should_stop: Optional[Callable[[], bool]] = None, verify: str = "reuse") -> GenerationResult:
    """Generation whose output is the full model's (greedy: the same tokens; sampling: the same
    distribution), drafted with early exits.

    ``k_max``: tokens drafted at most per round (after the round's first token, which is the full
    model's). ``draft_threshold``: drafting also stops after a drafted token whose max softmax
    probability at its exit layer is below it (None: only ``k_max``, EOS and a token that ran
    every layer stop it). ``do_sample`` / ``temperature`` / ``top_p`` / ``top_k`` / ``seed``: as in
    :func:`~greencode.decoding.generate`, with speculative-sampling acceptance. ``on_token(token_id,
    exit_layer)`` is called for each emitted token in order (every emitted token is the full
    model's, so ``exit_layer`` is the final layer); ``should_stop()`` is polled between rounds and
    ends generation with ``finish_reason="cancelled"``; ``stop_strings`` (with ``tokenizer``) end
    it with ``"stop"`` and cut ``text`` there, as in ``generate``. ``verify``: ``reuse`` (the draft's
    exact lower layers are kept, only the layers above each token's exact part run) or ``full``.

    ``counters`` add ``rounds``, ``drafted`` (tokens proposed after each round's exact
    first token), ``accepted`` (of those), ``verified_tokens`` (rows of the verification
    passes), ``residual_samples`` (sampling: rejections resampled from ``max(0, p - q)``),
    ``draft_threshold_stops`` (rounds whose draft the threshold ended), ``draft_confidence_heads``
    (LM heads run only to measure that confidence, included in ``lm_head_calls``) and the draft
    loop's own ``layers_run`` / ``kv_propagated_layers`` / ``lm_head_calls`` / ``exit_checks``, so a
    cost model can count drafting, verification and the work spent on rejected tokens."""
    if k_max < 1:
        raise ValueError(f"k_max={k_max} must be >= 1")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}; choose one of {', '.join(VERIFY_MODES)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if draft_threshold is not None and not 0.0 <= float(draft_threshold) <= 1.0:
        raise ValueError(f"draft_threshold={draft_threshold!r} must be in [0, 1] (a max softmax probability)")
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0:
        raise ValueError(f"sampling parameters out of range: temperature={temperature} (>= 0), "
                         f"top_p={top_p} ([0, 1]), top_k={top_k} (>= 0)")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    n_prompt = _prompt_length(input_ids)
    if limit and n_prompt + max_new_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} positions; shorten the prompt from the left")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    sampling = bool(do_sample) and temperature > 0
    rng = torch.Generator().manual_seed(int(seed)) if sampling and seed is not None else None  # None: torch's global
    drafter = _DraftConfidence(controller, model) if draft_threshold is not None else controller

    t0 = time.perf_counter()
    state = prefill(model, input_ids)
    prompt_len = int(state.input_ids.shape[1])
    t_prefill = time.perf_counter()
    seq = state.input_ids
    final = model.final_layer
    vocab = int(state.logits.shape[-1])
    tokens: list[int] = []
    exit_layers: list[int] = []
    c = dict(rounds=0, drafted=0, accepted=0, verified_tokens=0, exact_tokens=0, layers_run=0,
             kv_propagated_layers=0, lm_head_calls=1, exit_checks=0, decode_steps=0, residual_samples=0,
             draft_threshold_stops=0, draft_confidence_heads=0)
    finish = "length"

    def emit(toks: Sequence[int]) -> bool:
        """Append accepted tokens one by one, as ``generate`` would; True when generation ends."""
        nonlocal finish
        for t in toks:
            tokens.append(int(t))
            exit_layers.append(final)  # every emitted token is the full model's
            if on_token is not None:
                on_token(int(t), final)
            if t in eos:
                finish = "eos"
                return True
            if stop_strings:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if any(s and s in text for s in stop_strings):
                    finish = "stop"
                    return True
            if len(tokens) >= max_new_tokens:
                return True
        return False

    def round_seed() -> Optional[int]:
        if not sampling or rng is None:
            return None  # greedy, or sampling from torch's global generator
        return int(torch.randint(0, 2 ** 62, (1,), generator=rng))

    while True:
        budget = min(k_max + 1, max_new_tokens - len(tokens))  # the exact first token, then up to k_max drafted
        seen: list[int] = []
        confs: list[Optional[float]] = []

        def on_draft_token(_t: int, layer: int) -> None:
            seen.append(layer)
            confs.append(drafter.take() if draft_threshold is not None else None)

        def stop_drafting() -> bool:  # seen[0] is the exact first token, not a draft
            if len(seen) <= 1:
                return False
            if seen[-1] == final:  # the last drafted token ran every layer
                return True
            if draft_threshold is not None and confs[-1] is not None and confs[-1] < draft_threshold:
                c["draft_threshold_stops"] += 1
                return True
            return False

        # the draft advances the exact cache in place (it only appends positions): no copy per round
        start = int(seq.shape[1])
        draft = generate(model, seq, drafter, budget, do_sample=sampling, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=round_seed(), eos_token_id=eos_token_id, kv_strategy=kv_strategy,
                         prefilled=state, on_token=on_draft_token, should_stop=stop_drafting,
                         return_state=True, consume_prefill=True, return_logits=sampling,
                         keep_states=verify == "reuse")
        for k in ("layers_run", "kv_propagated_layers", "exit_checks"):
            c[k] += draft.counters[k]
        c["lm_head_calls"] += draft.counters["lm_head_calls"] - 1  # its first token reuses the exact logits
        d = draft.tokens  # d[0] is exact (chosen from the state's logits: the full model's)
        c["rounds"] += 1
        c["drafted"] += len(d) - 1
        if len(d) == 1 and (d[0] in eos or len(tokens) + 1 >= max_new_tokens):
            emit(d)  # nothing drafted, and this token ends the generation: nothing to verify
            break
        if len(d) > 1 and all(layer == final for layer in draft.exit_layers[1:]):
            # no early exit in this round: every token is the full model's, computed from an exact cache
            c["accepted"] += len(d) - 1
            c["exact_tokens"] += len(d) - 1
            if emit(d[:-1]):
                break
            if d[-1] in eos or len(tokens) + 1 >= max_new_tokens:
                emit(d[-1:])
                break
            # the last token is chosen but not fed yet: the next round starts from the draft's own state,
            # with this token as its first (greedy: the same logits choose it again; sampling: carried as is)
            state = draft.state
            if sampling:
                state = Prefill(state.input_ids, state.cache, _forced_logits(d[-1], vocab, state.logits.device))
            seq = state.input_ids
        else:
            cache = state.cache
            block = torch.tensor([d], dtype=torch.long, device=seq.device)
            if verify == "reuse":
                logits, layers_run, heads = _verify_reusing(model, cache, start, d, draft)
            else:  # the full model on the drafted block, from the exact cache (the draft's positions cropped off)
                _crop(cache, start)
                out = model.hf.model(input_ids=block, past_key_values=cache, use_cache=True)
                logits = model.adapter.lm_head(out.last_hidden_state)  # [1, len(d), V]: after d[i] comes row i
                layers_run, heads = len(d) * model.num_layers, len(d)
            c["verified_tokens"] += len(d)
            c["lm_head_calls"] += heads
            c["layers_run"] += layers_run
            forced = None  # the next round's first token, when a rejection already chose it
            n = 1
            if sampling:
                p = sampling_probs(logits[0, :len(d) - 1].float().cpu(), temperature, top_p, top_k)
                q = sampling_probs(torch.stack([draft.logits[i] for i in range(1, len(d))]), temperature, top_p,
                                   top_k)
                while n < len(d):
                    x = d[n]
                    u = float(torch.rand((), generator=rng))
                    if u * float(q[n - 1, x]) < float(p[n - 1, x]):  # accept with probability min(1, p/q)
                        n += 1
                        continue
                    residual = (p[n - 1] - q[n - 1]).clamp(min=0)
                    if float(residual.sum()) <= 0:  # p == q up to rounding: never rejected in exact arithmetic
                        residual = p[n - 1]
                    forced = int(torch.multinomial(residual / residual.sum(), 1, generator=rng))
                    c["residual_samples"] += 1
                    break
            else:
                full_pred = logits[0].argmax(-1).tolist()  # full_pred[i]: the full model's token after d[i]
                while n < len(d) and d[n] == full_pred[n - 1]:
                    n += 1
            c["accepted"] += n - 1
            if emit(d[:n]):
                break
            # the exact state after the accepted tokens: crop the verified cache, keep the logits there
            _crop(cache, start + n)
            seq = torch.cat([seq, block[:, :n]], dim=1)
            next_logits = logits[:, n - 1:n] if forced is None else _forced_logits(forced, vocab, logits.device)
            state = Prefill(seq, cache, next_logits)
        if should_stop is not None and should_stop():
            finish = "cancelled"
            break
    c["lm_head_calls"] += getattr(drafter, "extra_heads", 0)
    c["draft_confidence_heads"] = getattr(drafter, "extra_heads", 0)
    c["decode_steps"] = max(len(tokens) - 1, 0)
    t_end = time.perf_counter()
    c.update(prefill_time_s=t_prefill - t0, decode_time_s=t_end - t_prefill, total_time_s=t_end - t0,
             new_tokens=len(tokens), acceptance_rate=(c["accepted"] / c["drafted"]) if c["drafted"] else None,
             mean_draft_length=(c["drafted"] / c["rounds"]) if c["rounds"] else None)
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if stop_strings:
            cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
    return GenerationResult(tokens=tokens, exit_layers=exit_layers, finish_reason=finish, counters=c, text=text,
                            prompt_tokens=prompt_len)
