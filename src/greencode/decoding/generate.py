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

Batch size 1 (one completion request), which is how an editor calls it.
"""

from __future__ import annotations

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


@torch.inference_mode()
def generate(model, input_ids: Union[torch.Tensor, Sequence[int]], controller: Optional[ExitController] = None,
             max_new_tokens: int = 15, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: Optional[int] = None, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
             stop_strings: Optional[Sequence[str]] = None, tokenizer=None,
             kv_strategy: str = "propagate", return_logits: bool = False,
             on_token: Optional[Callable[[int, int], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None,
             prefilled: Optional[Prefill] = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens with early exits chosen by ``controller``.

    With :class:`NeverExit` (the default) and greedy decoding this produces exactly what HF
    ``generate(do_sample=False)`` produces with its KV cache.

    ``on_token(token_id, exit_layer)`` is called as each token is chosen (for streaming);
    ``should_stop()`` is polled before each new token and ends generation with
    ``finish_reason="cancelled"`` when it returns true (timeouts, disconnected clients).
    ``prefilled``: a :func:`prefill` of the same ``input_ids``, whose cache is copied instead of
    running the prompt again (``prefill_time_s`` then counts the copy only).
    """
    from transformers import DynamicCache

    controller = controller or NeverExit()
    ids = _validate(model, input_ids, max_new_tokens, temperature, top_p, top_k, kv_strategy)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))

    adapter = model.adapter
    layers = list(adapter.layers)
    final = model.final_layer
    check = controller.check_layers(model)
    exit_points = model.exit_points
    controller.reset()
    c = dict(layers_run=0, exit_checks=0, lm_head_calls=0, kv_propagated_layers=0, controller_time_s=0.0,
             decode_steps=0)

    t_start = time.perf_counter()
    if prefilled is not None:
        if prefilled.input_ids.shape != ids.shape or not torch.equal(prefilled.input_ids.to(ids.device), ids):
            raise ValueError("prefilled= holds the prefill of another prompt; call prefill(model, input_ids) "
                             "with the same input_ids")
        cache, logits = _copy_cache(prefilled.cache), prefilled.logits
    else:
        cache = DynamicCache(config=model.hf.config)
        out = model.hf.model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = adapter.lm_head(out.last_hidden_state[:, -1:])  # already through the final norm
    c["lm_head_calls"] += 1
    token = _select_token(logits, do_sample, temperature, top_p, top_k, generator)
    t_prefill = time.perf_counter()

    tokens, exit_layers = [token], [final]
    all_logits = [logits.reshape(-1).float().cpu()] if return_logits else None
    finish = "length"
    text = None
    pos = ids.shape[1]
    sample = (do_sample, temperature, top_p, top_k, generator)

    def stopped() -> bool:
        nonlocal finish, text
        if on_token is not None:
            on_token(token, exit_layers[-1])
        if token in eos:
            finish = "eos"
            return True
        if stop_strings:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s and s in text for s in stop_strings):
                finish = "stop"
                return True
        if should_stop is not None and len(tokens) < max_new_tokens and should_stop():
            finish = "cancelled"
            return True
        return False

    while not stopped() and len(tokens) < max_new_tokens:
        x = torch.tensor([[token]], device=ids.device)
        position_ids = torch.tensor([[pos]], device=ids.device)
        h = adapter.embed(x, position_ids)
        lkw = adapter.layer_kwargs(h, position_ids)
        exit_at = None
        logits = None
        oracle_preds: list[int] = []
        for i, layer in enumerate(layers):
            h = layer(h, attention_mask=None, past_key_values=cache, use_cache=True, **lkw)
            if isinstance(h, tuple):
                h = h[0]
            c["layers_run"] += 1
            if controller.runs_all_layers and i in exit_points and i != final:
                oracle_preds.append(int(torch.argmax(model.decode(h)[0, -1])))
                c["lm_head_calls"] += 1
            elif i in check:
                t0 = time.perf_counter()
                need_norm = controller.needs_normed or controller.needs_logits
                normed = model.final_norm(h) if need_norm else None
                lg = adapter.lm_head(normed) if controller.needs_logits else None
                c["lm_head_calls"] += lg is not None
                decision = controller.should_exit(i, h, normed, lg)
                c["controller_time_s"] += time.perf_counter() - t0
                c["exit_checks"] += 1
                if decision:
                    exit_at, logits = i, lg
                    break
        if exit_at is None:
            logits = model.decode(h)
            c["lm_head_calls"] += 1
            exit_at = final
            if oracle_preds:  # l_opt: the first exit point agreeing with the final layer
                final_pred = int(torch.argmax(logits[0, -1]))
                exit_at = next((exit_points[j] for j, p in enumerate(oracle_preds) if p == final_pred), final)
        else:
            if logits is None:
                logits = model.decode(h)
                c["lm_head_calls"] += 1
            if kv_strategy == "propagate":
                for j, (k, v) in enumerate(adapter.propagate(exit_at + 1, h, lkw), start=exit_at + 1):
                    cache.update(k, v, j)
                    c["kv_propagated_layers"] += 1
            else:  # compute: run the deeper layers for an exact cache, discard their output
                hc = h
                for j in range(exit_at + 1, len(layers)):
                    hc = layers[j](hc, attention_mask=None, past_key_values=cache, use_cache=True, **lkw)
                    hc = hc[0] if isinstance(hc, tuple) else hc
                    c["layers_run"] += 1
        token = _select_token(logits, *sample)
        if all_logits is not None:
            all_logits.append(logits.reshape(-1).float().cpu())
        tokens.append(token)
        exit_layers.append(exit_at)
        c["decode_steps"] += 1
        pos += 1

    t_end = time.perf_counter()
    if tokenizer is not None:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if stop_strings:
            cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
    c.update(prefill_time_s=t_prefill - t_start, decode_time_s=t_end - t_prefill, total_time_s=t_end - t_start,
             new_tokens=len(tokens))
    return GenerationResult(tokens=tokens, exit_layers=exit_layers, finish_reason=finish, counters=c, text=text,
                            prompt_tokens=int(ids.shape[1]), logits=all_logits)


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
