"""The KV-cache-correct early-exit decoding loop (one loop for the evaluator, the
benchmark and the endpoint).

Prefill runs the prompt through all layers (HF's own forward, filling a ``DynamicCache``).
Each new token then runs layer by layer; at the exit points the controller asks for, it
decides to continue or exit. When a token exits at layer ``k``, each deeper layer ``j``
still gets this token's K/V so later tokens attend to a complete cache:

* ``propagate`` (default, the paper's state propagation): the exit hidden state goes through
  layer ``j``'s own input norm and K/V projections (rotary positions for Llama);
* ``compute``: the deeper layers run anyway (an exact cache that saves no compute; for
  comparing what propagation costs in accuracy).

One row is one completion request (how an editor calls it); a list of controllers gives one row
each over the same prompt, and a list of prompts a left-padded ragged batch (each row exiting where
its own controller says). ``observe=True`` records every exit point's state for the RL trajectory
bank; ``return_state`` / ``consume_prefill`` let the lossless mode continue one cache across rounds.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from greencode.config import ConfigError
from greencode.decoding.controllers import ExitController, NeverExit

KV_STRATEGIES = ("propagate", "compute")


@dataclass
class GenerationResult:
    tokens: list[int]
    exit_layers: list[int]  # 0-based layer that produced each token (the first: the prefill, full model)
    finish_reason: str  # length | eos | stop | cancelled
    counters: dict = field(default_factory=dict)
    text: Optional[str] = None
    prompt_tokens: int = 0
    logits: Optional[list] = None  # per-token logits [V] (float32, CPU) when return_logits=True
    # observe=True: for every decided token (tokens[1:]; token 0 comes from the prefill), the hidden
    # state at each early exit point [E, H] and each exit point's greedy prediction [E + 1] (the
    # last: the final layer's), both of the state this decoding reached (see generate)
    exit_states: Optional[list] = None
    exit_preds: Optional[list] = None
    # return_state=True (one row): the decoding's end state, from which it can be continued (see generate)
    state: Optional["Prefill"] = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)


def _select_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
                  generator: Optional[torch.Generator]) -> int:
    logits = logits.reshape(-1).float()
    if not do_sample or temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cumulative = probs.cumsum(-1)
        remove = cumulative - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _validate(model, input_ids, max_new_tokens, temperature, top_p, top_k, kv_strategy) -> torch.Tensor:
    if isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise ValueError(f"generate() decodes one sequence at a time; got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] < 1:
        raise ValueError("the prompt is empty; give at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} positions; shorten the prompt from the left")
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0:
        raise ValueError(f"sampling parameters out of range: temperature={temperature} (>= 0), "
                         f"top_p={top_p} ([0, 1]), top_k={top_k} (>= 0)")
    if kv_strategy not in KV_STRATEGIES:
        raise ConfigError(f"kv_strategy={kv_strategy!r}; choose one of {', '.join(KV_STRATEGIES)}")
    return input_ids.to(model.device)


@dataclass
class Prefill:
    """The full-model prefill of one prompt: its cache and the last position's logits.

    Every method of an evaluation starts from the same prefill; computing it once and
    handing a copy to each ``generate(..., prefill=...)`` call gives the same tokens as
    prefilling each time (the cache is copied, never shared)."""

    input_ids: torch.Tensor
    cache: object
    logits: torch.Tensor
    time_s: float = 0.0


@torch.inference_mode()
def prefill(model, input_ids: Union[torch.Tensor, Sequence[int]]) -> Prefill:
    """Run the prompt through all layers once (HF's forward, filling a ``DynamicCache``)."""
    from transformers import DynamicCache

    ids = _validate(model, input_ids, 1, 1.0, 1.0, 0, "propagate")
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.hf.config)
    out = model.hf.model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = model.adapter.lm_head(out.last_hidden_state[:, -1:])  # already through the final norm
    return Prefill(ids, cache, logits, time.perf_counter() - t0)


def _copy_cache(cache):
    import copy

    return copy.deepcopy(cache)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value tensors ``[rows, kv_heads, T, head_dim]`` a cache holds for one layer
    (transformers >= 4.56 ``cache.layers[i].keys``; older ``cache.key_cache[i]``)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "keys"):
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _expand_cache(cache, rows: int) -> None:
    """Repeat a one-row prefill cache for ``rows`` rows (every row continues the same prompt)."""
    if rows == 1:
        return
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(rows)
        return
    for i in range(len(cache)):  # pragma: no cover - transformers without batch_repeat_interleave
        k, v = _layer_kv(cache, i)
        cache.key_cache[i], cache.value_cache[i] = k.repeat_interleave(rows, 0), v.repeat_interleave(rows, 0)


def _new_counters() -> dict:
    return dict(layers_run=0, exit_checks=0, lm_head_calls=0, kv_propagated_layers=0, controller_time_s=0.0,
                decode_steps=0)


@torch.inference_mode()
def generate(model, input_ids: Union[torch.Tensor, Sequence[int]],
             controller: Union[ExitController, Sequence[ExitController], None] = None,
             max_new_tokens: int = 15, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: Optional[int] = None, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
             stop_strings: Optional[Sequence[str]] = None, tokenizer=None,
             kv_strategy: str = "propagate", return_logits: bool = False,
             on_token: Optional[Callable[[int, int], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None,
             prefilled: Optional[Prefill] = None,
             observe: bool = False, return_state: bool = False,
             consume_prefill: bool = False) -> Union[GenerationResult, list[GenerationResult]]:
    """Generate up to ``max_new_tokens`` tokens with early exits chosen by ``controller``.

    With :class:`NeverExit` (the default) and greedy decoding this produces exactly what HF
    ``generate(do_sample=False)`` produces with its KV cache.

    ``controller`` may be a list: one row per controller, all continuing the same prompt
    (one shared prefill, one batched layer step per token), and a list of results comes back.
    Each row exits where its own controller says; its deeper layers' K/V are its own
    (propagated from its exit state, or computed), so each row's tokens equal a run with that
    controller alone (greedy). A layer runs on every row while any row is still active (the
    rows that exited are carried along and their outputs discarded): the counters count each
    row's own work, which is what the compute ratio reads; the timers are the batch's.

    ``on_token(token_id, exit_layer)`` is called as each token is chosen (for streaming);
    ``should_stop()`` is polled before each new token and ends generation with
    ``finish_reason="cancelled"`` when it returns true (timeouts, disconnected clients).
    ``prefilled``: a :func:`prefill` of the same ``input_ids``, whose cache is copied instead of
    running the prompt again (``prefill_time_s`` then counts the copy only); with
    ``consume_prefill=True`` its cache is used and advanced in place, not copied (the caller gives
    the prefill up; decoding only appends positions, so cropping the cache back to the prefill's
    length restores it).

    ``observe=True`` records, for every decided token, the hidden state at every early exit
    point and every exit point's greedy prediction (``exit_states``, ``exit_preds``), the data
    of the RL trajectory bank. A row that exits keeps climbing in the shadow: its deeper states
    are the ones it would have reached had it continued (this token's K/V in the cache are its
    own until the layer has run; afterwards they are overwritten by the propagated K/V, exactly
    as without observing), so the tokens, exits and cache are those of the unobserved run and
    the states up to the exit are the ones its controller saw. The shadow layers and the
    recording's LM heads are not counted in the counters.

    ``return_state=True`` (one row) sets ``result.state``: a :class:`Prefill` of the prompt plus
    every generated token but the last, with this decoding's cache and the logits that chose the
    last token, so a later call with ``prefilled=result.state`` continues exactly from here.
    """
    from transformers import DynamicCache

    prompts = _prompt_list(input_ids)  # None: one prompt (every row continues it)
    many = isinstance(controller, (list, tuple)) or prompts is not None
    if isinstance(controller, (list, tuple)):
        controllers = list(controller)
    else:
        controllers = [controller or NeverExit()] * (len(prompts) if prompts is not None else 1)
    if not controllers:
        raise ValueError("controller=[] gives no rows to decode; pass at least one controller")
    if prompts is not None and len(prompts) != len(controllers):
        raise ValueError(f"{len(prompts)} prompts but {len(controllers)} controllers; give one controller for all "
                         "prompts or one per prompt")
    if len(controllers) > 1 and (on_token is not None or should_stop is not None or stop_strings):
        raise ValueError("on_token, should_stop and stop_strings are for one controller; decode the rows of a "
                         "controller list for accuracy and stream single-controller generations")
    if return_state and (len(controllers) > 1 or prompts is not None):
        raise ValueError("return_state is for one row (one prompt, one controller)")
    if prompts is not None and prefilled is not None:
        raise ValueError("prefilled= is the prefill of one prompt; a batch of prompts is prefilled together")
    R = len(controllers)
    if prompts is None:
        ids = _validate(model, input_ids, max_new_tokens, temperature, top_p, top_k, kv_strategy)
        lengths = [int(ids.shape[1])] * R
        mask = None
    else:
        for p in prompts:
            _validate(model, p, max_new_tokens, temperature, top_p, top_k, kv_strategy)
        ids, mask = _left_pad(prompts, model.device)
        lengths = [len(p) for p in prompts]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))

    seen_ids: set[int] = set()
    for r, ctrl in enumerate(controllers):  # a controller with per-row state gets one instance per row
        if getattr(ctrl, "per_row_state", False):
            if id(ctrl) in seen_ids:
                controllers[r] = copy.deepcopy(ctrl)
            seen_ids.add(id(controllers[r]))
    adapter = model.adapter
    layers = list(adapter.layers)
    final = model.final_layer
    checks = [c.check_layers(model) for c in controllers]
    exit_points = model.exit_points
    exit_set = frozenset(exit_points)
    for ctrl in controllers:
        ctrl.reset()
    counters = [_new_counters() for _ in range(R)]
    propagate = kv_strategy == "propagate"
    obs_states: Optional[list[list[torch.Tensor]]] = [[] for _ in range(R)] if observe else None
    obs_preds: Optional[list[list[torch.Tensor]]] = [[] for _ in range(R)] if observe else None

    t_start = time.perf_counter()
    if mask is not None:  # several prompts: left-padded, one batched prefill with per-row positions
        cache = DynamicCache(config=model.hf.config)
        out = model.hf.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                             past_key_values=cache, use_cache=True)
        logits = adapter.lm_head(out.last_hidden_state[:, -1:])
    elif prefilled is not None:
        if prefilled.input_ids.shape != ids.shape or not torch.equal(prefilled.input_ids.to(ids.device), ids):
            raise ValueError("prefilled= holds the prefill of another prompt; call prefill(model, input_ids) "
                             "with the same input_ids")
        cache, logits = (prefilled.cache if consume_prefill else _copy_cache(prefilled.cache)), prefilled.logits
    else:
        cache = DynamicCache(config=model.hf.config)
        out = model.hf.model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = adapter.lm_head(out.last_hidden_state[:, -1:])  # already through the final norm
    if prompts is None:
        _expand_cache(cache, R)
    sample = (do_sample, temperature, top_p, top_k, generator)
    tokens = [[_select_token(logits[r if logits.shape[0] > 1 else 0], *sample)] for r in range(R)]
    for c in counters:
        c["lm_head_calls"] += 1
    t_prefill = time.perf_counter()

    exit_layers = [[final] for _ in range(R)]
    first_row = [r if logits.shape[0] > 1 else 0 for r in range(R)]  # one shared prefill: row 0 for every row
    last_logits = [logits[k:k + 1] for k in first_row]
    all_logits = ([[logits[r if logits.shape[0] > 1 else 0].reshape(-1).float().cpu()] for r in range(R)]
                  if return_logits else None)
    pad_mask = None
    if mask is not None and not bool(mask.all()):  # additive: 0 where a row attends, min where it is padding
        pad_mask = torch.zeros(mask.shape, dtype=model.dtype, device=ids.device)
        pad_mask = pad_mask.masked_fill(mask == 0, torch.finfo(model.dtype).min)
    finish = ["length"] * R
    done = [False] * R
    text = None
    steps_done = 0

    def stopped(r: int) -> bool:
        nonlocal text
        token = tokens[r][-1]
        if on_token is not None:
            on_token(token, exit_layers[r][-1])
        if token in eos:
            finish[r] = "eos"
            return True
        if stop_strings:
            text = tokenizer.decode(tokens[r], skip_special_tokens=True)
            if any(s and s in text for s in stop_strings):
                finish[r] = "stop"
                return True
        if should_stop is not None and len(tokens[r]) < max_new_tokens and should_stop():
            finish[r] = "cancelled"
            return True
        return False

    def refresh_done() -> None:
        for r in range(R):
            if not done[r] and (stopped(r) or len(tokens[r]) >= max_new_tokens):
                done[r] = True

    refresh_done()
    while not all(done):
        live = [r for r in range(R) if not done[r]]
        x = torch.tensor([[tokens[r][-1]] for r in range(R)], device=ids.device)
        if prompts is None:
            position_ids = torch.full((R, 1), lengths[0] + steps_done, dtype=torch.long, device=ids.device)
        else:
            position_ids = torch.tensor([[n + steps_done] for n in lengths], dtype=torch.long, device=ids.device)
        h = adapter.embed(x, position_ids)
        lkw = adapter.layer_kwargs(h, position_ids)
        attn = None
        if pad_mask is not None:  # the new position is real for every row
            pad_mask = torch.cat([pad_mask, pad_mask.new_zeros((R, 1))], dim=1)
            attn = pad_mask[:, None, None, :]
        active = list(live)  # rows still climbing the layers this step
        exit_at: dict[int, int] = {}
        exit_h: dict[int, torch.Tensor] = {}
        row_logits: dict[int, Optional[torch.Tensor]] = {}
        # rows that exited together at one layer: (their indices, that layer, K/V of every deeper layer)
        groups: list[tuple[list[int], int, list]] = []
        oracle_preds = {r: [] for r in live if controllers[r].runs_all_layers}
        seen_h: list[torch.Tensor] = []  # observe: the states at the exit points, then the final one
        for i, layer in enumerate(layers):
            if not active and propagate and not observe:
                # every row has exited: its deeper layers get the K/V propagated from its exit state
                for j in range(i, len(layers)):
                    k, v = _gather_kv(groups, j, R, cache)
                    cache.update(k, v, j)
                    for rows_, _, _ in groups:
                        for r in rows_:
                            counters[r]["kv_propagated_layers"] += 1
                break
            h = layer(h, attention_mask=attn, past_key_values=cache, use_cache=True, **lkw)
            if isinstance(h, tuple):
                h = h[0]
            for r in active:
                counters[r]["layers_run"] += 1
            if groups:  # rows that exited below: their K/V at this layer come from their exit state
                keys, values = _layer_kv(cache, i)
                for rows_, at, kv in groups:
                    k, v = kv[i - at - 1]
                    if len(rows_) == 1:
                        keys[rows_[0]:rows_[0] + 1, :, -1:] = k
                        values[rows_[0]:rows_[0] + 1, :, -1:] = v
                    else:
                        idx = torch.tensor(rows_, device=keys.device)
                        keys[idx, :, -1:] = k
                        values[idx, :, -1:] = v
                    for r in rows_:
                        counters[r]["kv_propagated_layers"] += 1
            elif not propagate:
                for r in exit_at:  # compute: the rows that exited keep running the deeper layers
                    counters[r]["layers_run"] += 1
            if observe and (i in exit_set or i == final):
                seen_h.append(h.detach().clone())
            if i == final:
                break
            if oracle_preds and i in exit_set:  # the oracle records every exit point's prediction
                for r in oracle_preds:
                    oracle_preds[r].append(int(torch.argmax(model.decode(h[r:r + 1])[0, -1])))
                    counters[r]["lm_head_calls"] += 1
            asking = [r for r in active if i in checks[r] and not controllers[r].runs_all_layers]
            if not asking:
                continue
            t0 = time.perf_counter()
            normed_all = None
            exiting: list[int] = []
            by_ctrl: dict[int, list[int]] = {}  # rows sharing one controller decide together
            for r in asking:
                by_ctrl.setdefault(id(controllers[r]), []).append(r)
            for rows_ in by_ctrl.values():
                ctrl = controllers[rows_[0]]
                need = ctrl.needs_normed or ctrl.needs_logits
                if need and normed_all is None:
                    normed_all = model.final_norm(h)
                if len(rows_) == 1:
                    r = rows_[0]
                    normed = normed_all[r:r + 1] if need else None
                    lg = adapter.lm_head(normed) if ctrl.needs_logits else None
                    decisions = [ctrl.should_exit(i, h[r:r + 1], normed, lg)]
                    lgs = [lg]
                else:
                    normed = normed_all[rows_] if need else None
                    lg = adapter.lm_head(normed) if ctrl.needs_logits else None
                    decisions = ctrl.should_exit_rows(i, h[rows_], normed, lg)
                    lgs = [None if lg is None else lg[k:k + 1] for k in range(len(rows_))]
                for r, decision, lg_r in zip(rows_, decisions, lgs):
                    counters[r]["lm_head_calls"] += lg_r is not None
                    counters[r]["exit_checks"] += 1
                    if decision:
                        exit_at[r], row_logits[r] = i, lg_r
                        active.remove(r)
                        if R > 1 or not propagate or observe:  # the batch (or compute, or the shadow) moves h on
                            exit_h[r] = h[r:r + 1].clone()
                        exiting.append(r)
            if exiting and propagate:  # one fused projection for every row leaving here
                if len(exiting) == R:
                    kv = adapter.propagate(i + 1, h, lkw)
                else:
                    kv = adapter.propagate(i + 1, h[exiting], _rows_kwargs(lkw, exiting))
                groups.append((exiting, i, kv))
            elapsed = time.perf_counter() - t0
            for r in asking:  # one row: its own time; several: the batch's time, shared
                counters[r]["controller_time_s"] += elapsed / len(asking)
        # the rows that ran to the top: one LM head for all of them
        top = [r for r in live if r not in exit_at]
        if top:
            top_logits = model.decode(h[top] if R > 1 else h)
            for k, r in enumerate(top):
                row_logits[r] = top_logits[k:k + 1]
                counters[r]["lm_head_calls"] += 1
                exit_at[r] = final
                if oracle_preds.get(r):  # l_opt: the first exit point agreeing with the final layer
                    final_pred = int(torch.argmax(row_logits[r][0, -1]))
                    exit_at[r] = next((exit_points[j] for j, p in enumerate(oracle_preds[r]) if p == final_pred),
                                      final)
        for r in live:
            lg = row_logits.get(r)
            if lg is None:
                lg = model.decode(exit_h.get(r, h[r:r + 1]))
                counters[r]["lm_head_calls"] += 1
            tokens[r].append(_select_token(lg, *sample))
            last_logits[r] = lg
            if all_logits is not None:
                all_logits[r].append(lg.reshape(-1).float().cpu())
            exit_layers[r].append(exit_at[r])
            counters[r]["decode_steps"] += 1
        if observe:
            stacked = torch.stack(seen_h, dim=1)[:, :, -1]  # [R, E + 1, H]
            preds = model.decode(stacked).argmax(-1)  # [R, E + 1]
            for r in live:
                obs_states[r].append(stacked[r, :-1].float().cpu())
                obs_preds[r].append(preds[r].cpu())
        steps_done += 1
        refresh_done()

    t_end = time.perf_counter()
    results = []
    for r in range(R):
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(tokens[r], skip_special_tokens=True)
            if stop_strings:
                cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
        c = counters[r]
        c.update(prefill_time_s=t_prefill - t_start, decode_time_s=t_end - t_prefill, total_time_s=t_end - t_start,
                 new_tokens=len(tokens[r]))
        if R > 1:
            c["batch_rows"] = R
        state = None
        if return_state:
            fed = torch.tensor([tokens[r][:-1]], dtype=torch.long, device=ids.device)
            state = Prefill(torch.cat([ids, fed], dim=1), cache, last_logits[r].reshape(1, 1, -1))
        results.append(GenerationResult(tokens=tokens[r], exit_layers=exit_layers[r], finish_reason=finish[r],
                                        state=state,
                                        counters=c, text=text, prompt_tokens=lengths[r],
                                        logits=all_logits[r] if all_logits is not None else None,
                                        exit_states=obs_states[r] if observe else None,
                                        exit_preds=obs_preds[r] if observe else None))
    return results if many else results[0]


def _prompt_list(input_ids) -> Optional[list[list[int]]]:
    """Several prompts (a list of token lists, or a 2-D tensor with more than one row) as
    lists; None for one prompt."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] > 1:
            return [row.tolist() for row in input_ids]
        return None
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, torch.Tensor)):
        return [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in input_ids]
    return None


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and the attention mask (1 = token, 0 = padding) of ragged prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions of a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _rows_kwargs(lkw: dict, rows: list[int]) -> dict:
    """Some rows of the layer keyword arguments (tensors and tuples of tensors indexed)."""
    out = {}
    for k, v in lkw.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[rows]
        elif isinstance(v, tuple):
            out[k] = tuple(t[rows] if isinstance(t, torch.Tensor) else t for t in v)
        else:
            out[k] = v
    return out


def _gather_kv(groups: list, layer: int, rows: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The new position's K/V of one layer for every row: each group's propagated K/V, and
    for a finished row (kept only for shape) its last entry again."""
    if len(groups) == 1 and len(groups[0][0]) == rows:
        return groups[0][2][layer - groups[0][1] - 1]
    keys, values = _layer_kv(cache, layer)
    k_all, v_all = keys[:, :, -1:].clone(), values[:, :, -1:].clone()
    for rows_, at, kv in groups:
        k, v = kv[layer - at - 1]
        idx = torch.tensor(rows_, device=k_all.device)
        k_all[idx], v_all[idx] = k, v
    return k_all, v_all


def compute_cost(model, results: Sequence[GenerationResult], controller: Optional[ExitController] = None) -> dict:
    """Hardware-independent cost of the decode steps (the prefill is the same for every
    method and excluded), as multiply-accumulates from the model's cost model: layers run,
    K/V propagation, LM-head calls and the controller's own work, over what the full model
    does for the same steps (every layer + one LM head per token). Attention-score work,
    which grows with the context, is left out of both."""
    cm = model.cost_model()
    steps = sum(r.counters["decode_steps"] for r in results)
    done = sum(r.counters["layers_run"] * cm["layer_macs"] + r.counters["kv_propagated_layers"] * cm["kv_macs"]
               + (r.counters["lm_head_calls"] - 1) * cm["lm_head_macs"]  # minus the prefill's head
               for r in results)
    ctrl = controller.macs_per_check if controller is not None else 0
    done += sum(r.counters["exit_checks"] for r in results) * ctrl
    full = steps * (model.num_layers * cm["layer_macs"] + cm["lm_head_macs"])
    layers_run = sum(r.counters["layers_run"] for r in results)
    return {"compute_ratio": (done / full) if full else None,
            "layers_skipped_share": (1 - layers_run / (steps * model.num_layers)) if steps else None,
            "decode_steps": steps, "macs_done": done, "macs_full": full}
