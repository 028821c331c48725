"""Lossless early exit: self-speculative decoding with the exit controller as the drafter.

Each round continues from an exact state (a cache holding the full model's K/V of every
accepted token, and the full model's logits at the last one; one cache, advanced and cropped in
place, never copied):

1. **Draft** with :func:`greencode.decoding.generate` itself (the one decoding loop): the first
   token comes from the exact logits; each further token exits where the controller says
   (RL policy, fixed layer, confidence). Drafting stops after ``k_max`` tokens, or as soon as a
   drafted token ran to the final layer (the controller was not confident anywhere), since
   the next one would need the exact state anyway.
2. **Verify** all drafted tokens in one forward pass of the full model from the exact state.
3. **Accept** the longest drafted prefix that equals the full model's greedy tokens, then the
   full model's own next token; the verified cache is cropped to the accepted tokens (the
   K/V of rejected tokens are rolled back).

So the output is exactly the full model's greedy output (tested), whatever the controller.
A round in which no drafted token exited early needs no verification: every token was chosen by
the full model, step by step, from an exact cache (what the never-exit loop does), so it is
accepted as drafted and the next round continues from the draft's own state (``exact_tokens``).
Otherwise verification recomputes every layer of the drafted tokens; reusing the draft's exact
lower layers (only the layers above the lowest exit are needed) is not built yet, and neither is
speculative sampling. Greedy only.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from greencode.decoding.controllers import ExitController
from greencode.decoding.generate import GenerationResult, Prefill, generate, prefill


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


@torch.inference_mode()
def generate_lossless(model, input_ids: Union[torch.Tensor, Sequence[int]], controller: ExitController,
                      max_new_tokens: int = 15, *, k_max: int = 6,
                      eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                      kv_strategy: str = "propagate") -> GenerationResult:
    """Greedy generation whose tokens equal the full model's, drafted with early exits.

    ``counters`` add ``rounds``, ``drafted`` (tokens proposed after each round's exact
    first token), ``accepted`` (of those), ``verified_tokens`` (rows of the verification
    passes) and the draft loop's own ``layers_run`` / ``kv_propagated_layers`` /
    ``lm_head_calls`` / ``exit_checks``, so a cost model can count drafting, verification and
    the work spent on rejected tokens."""
    if k_max < 1:
        raise ValueError(f"k_max={k_max} must be >= 1")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    t0 = time.perf_counter()
    state = prefill(model, input_ids)
    prompt_len = int(state.input_ids.shape[1])
    t_prefill = time.perf_counter()
    seq = state.input_ids
    final = model.final_layer
    tokens: list[int] = []
    exit_layers: list[int] = []
    c = dict(rounds=0, drafted=0, accepted=0, verified_tokens=0, exact_tokens=0, layers_run=0,
             kv_propagated_layers=0, lm_head_calls=1, exit_checks=0, decode_steps=0)
    finish = "length"
    while len(tokens) < max_new_tokens:
        budget = min(k_max, max_new_tokens - len(tokens))
        seen: list[int] = []

        def stop_when_not_confident() -> bool:  # seen[0] is the exact first token, not a draft
            return len(seen) > 1 and seen[-1] == final  # the last drafted token ran every layer

        # the draft advances the exact cache in place (it only appends positions): no copy per round
        start = int(seq.shape[1])
        draft = generate(model, seq, controller, budget, kv_strategy=kv_strategy, prefilled=state,
                         on_token=lambda _t, layer: seen.append(layer), should_stop=stop_when_not_confident,
                         return_state=True, consume_prefill=True)
        for k in ("layers_run", "kv_propagated_layers", "exit_checks"):
            c[k] += draft.counters[k]
        c["lm_head_calls"] += draft.counters["lm_head_calls"] - 1  # its first token reuses the exact logits
        d = draft.tokens  # d[0] is exact (the full model's argmax of the state's logits)
        c["rounds"] += 1
        c["drafted"] += len(d) - 1
        if len(d) > 1 and all(layer == final for layer in draft.exit_layers[1:]):
            # no early exit in this round: every token is the full model's, computed from an exact cache.
            # The last one is not fed yet: the next round starts from the draft's own state and chooses
            # it again from the same logits as its exact first token
            c["accepted"] += len(d) - 1
            c["exact_tokens"] += len(d) - 1
            stop_at = next((i for i, t in enumerate(d) if t in eos), None)
            if stop_at is not None or len(tokens) + len(d) >= max_new_tokens:
                take = d if stop_at is None else d[:stop_at + 1]
                finish = "eos" if stop_at is not None else finish
                take = take[:max_new_tokens - len(tokens)]
                tokens += take
                exit_layers += [final] * len(take)
                break
            tokens += d[:-1]
            exit_layers += [final] * (len(d) - 1)
            state, seq = draft.state, draft.state.input_ids
            continue
        # verify: the full model on the drafted block, from the exact cache (the draft's positions cropped off)
        cache = state.cache
        _crop(cache, start)
        block = torch.tensor([d], dtype=torch.long, device=seq.device)
        out = model.hf.model(input_ids=block, past_key_values=cache, use_cache=True)
        logits = model.adapter.lm_head(out.last_hidden_state)  # [1, len(d), V]
        c["verified_tokens"] += len(d)
        c["lm_head_calls"] += len(d)
        c["layers_run"] += len(d) * model.num_layers
        full_pred = logits[0].argmax(-1).tolist()  # full_pred[i]: the full model's token after d[i]
        n = 1
        while n < len(d) and d[n] == full_pred[n - 1]:
            n += 1
        c["accepted"] += n - 1
        take = d[:n]
        stop_at = next((i for i, t in enumerate(take) if t in eos), None)
        if stop_at is not None:
            take = take[:stop_at + 1]
            finish = "eos"
        take = take[:max_new_tokens - len(tokens)]
        tokens += take
        exit_layers += [final] * len(take)  # every emitted token is the full model's
        if finish == "eos" or len(tokens) >= max_new_tokens:
            break
        # the exact state after the accepted tokens: crop the verified cache, keep the logits there
        _crop(cache, seq.shape[1] + n)
        seq = torch.cat([seq, block[:, :n]], dim=1)
        state = Prefill(seq, cache, logits[:, n - 1:n])
    c["decode_steps"] = max(len(tokens) - 1, 0)
    t_end = time.perf_counter()
    c.update(prefill_time_s=t_prefill - t0, decode_time_s=t_end - t_prefill, total_time_s=t_end - t0,
             new_tokens=len(tokens), acceptance_rate=(c["accepted"] / c["drafted"]) if c["drafted"] else None,
             mean_draft_length=(c["drafted"] / c["rounds"]) if c["rounds"] else None)
    return GenerationResult(tokens=tokens, exit_layers=exit_layers, finish_reason=finish, counters=c,
                            prompt_tokens=prompt_len)
