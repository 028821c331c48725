"""Layer-step primitives: the pieces every decoding strategy is built from.

The batched early-exit loop (:class:`~greencode.decoding.generate.DecodeBatch`), the bank's
observation, lossless drafting and verification (:mod:`greencode.decoding.speculative`) and the
compiled step (:mod:`greencode.decoding.compiled`) all use these, and none keeps a private copy:

* **the cache**: a new / copied / expanded cache, a layer's K/V (``layer_kv``), rows taken and
  left-padded (``rebuild_cache``), in-place growth (``growable``), cropping (``crop``);
* **running layers on some rows**: ``RowsCache`` (one new position for a subset of the batch,
  the other rows' K/V filled in), ``Slot`` (one position written into a static buffer: the
  compiled step), ``BlockSlot`` (blocks of positions of some rows: verification), ``block_mask``;
* **K/V propagation** for rows that exited: ``gather_kv``;
* **choosing a token**: ``sampling_probs`` / ``select_token`` (one processing for the loop and for
  speculative sampling), ``cut_at_stops``; ``check_request`` (the argument checks every entry
  point shares).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from greencode.errors import ConfigError

KV_STRATEGIES = ("propagate", "compute")


@dataclass(kw_only=True)
class Sampling:
    """How a token is chosen: greedy, or sampled with temperature, top-p, top-k and a seed. A
    decoding row and an endpoint request both carry these (keyword-only fields)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution ``[..., V]`` (float32) a token is sampled from, given its logits ``[..., V]``:
    temperature, then top-k, then top-p (the smallest prefix reaching ``top_p``), then softmax.
    The loop samples from it and speculative sampling accepts against it. ``temperature`` > 0."""
    logits = logits.float()
    # shifted so the largest logit is 0 first: a tiny temperature then sends the others to -inf, not the
    # largest to +inf (softmax is shift-invariant; +inf / +inf made NaN probabilities)
    # a temperature below 1e-6 samples the argmax anyway; as a float32 it could underflow to 0 (0 / 0 = NaN)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(float(temperature), 1e-6)
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


def select_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
                 generator: Optional[torch.Generator]) -> int:
    """Greedy (argmax), or one draw from :func:`sampling_probs` with ``generator``."""
    logits = logits.reshape(-1).float()
    if not do_sample or temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(sampling_probs(logits, temperature, top_p, top_k), 1, generator=generator))


def record_logits(row, token: int, lg: torch.Tensor) -> None:
    """What a row keeps of the logits that chose ``token``: the logits (``return_logits``), the
    token's log-probability and the top-n (``logprobs``)."""
    if row.logits_seen is not None:
        row.logits_seen.append(lg.reshape(-1).float().cpu())
    if row.token_logprobs is not None:
        lp = torch.log_softmax(lg.reshape(-1).float(), dim=-1)
        row.token_logprobs.append(float(lp[token]))
        if row.logprobs:
            top = torch.topk(lp, min(int(row.logprobs), lp.numel()))
            row.top_logprobs.append([(int(i), float(v)) for v, i in zip(top.values, top.indices)])


def truncate_logits(row, n: int) -> None:
    """Keep the logit records of the row's first ``n`` tokens."""
    for records in (row.logits_seen, row.token_logprobs, row.top_logprobs):
        if records is not None:
            del records[n:]


def cut_at_stops(text: str, stops: Optional[Sequence[str]]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((text.find(s) for s in stops or () if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def check_request(model, prompt_len: int, max_new_tokens, temperature: float, top_p: float, top_k: int,
                  kv_strategy: str = "propagate") -> None:
    """The argument checks every decoding entry point shares (a clear ValueError naming the fix)."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty; give at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    if limit and prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} positions; shorten the prompt from the left")
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0:
        raise ValueError(f"sampling parameters out of range: temperature={temperature} (>= 0), "
                         f"top_p={top_p} ([0, 1]), top_k={top_k} (>= 0)")
    if kv_strategy not in KV_STRATEGIES:
        raise ConfigError(f"kv_strategy={kv_strategy!r}; choose one of {', '.join(KV_STRATEGIES)}")


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.hf.config)
    except TypeError:  # pragma: no cover - transformers whose DynamicCache takes no config
        return DynamicCache()


def copy_cache(cache):
    return copy.deepcopy(cache)


def layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value tensors ``[rows, kv_heads, T, head_dim]`` a cache holds for one layer
    (transformers >= 4.56 ``cache.layers[i].keys``; older ``cache.key_cache[i]``)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "keys"):
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def expand_cache(cache, rows: int) -> None:
    """Repeat a one-row prefill cache for ``rows`` rows (every row continues the same prompt)."""
    if rows == 1:
        return
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(rows)
        return
    for i in range(len(cache)):  # pragma: no cover - transformers without batch_repeat_interleave
        k, v = layer_kv(cache, i)
        cache.key_cache[i], cache.value_cache[i] = k.repeat_interleave(rows, 0), v.repeat_interleave(rows, 0)


class _GrowInPlace:
    """The methods of :func:`grow_layer_class`'s ``DynamicLayer`` subclass (made on first use:
    transformers' cache module costs 0.5 s to import). Not a base class: a mixin base would change
    the subclass's layout, and ``growable`` swaps a live layer's class."""

    def reserve(self, add: int, static: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for ``add`` more positions: the (re)allocated buffers and the filled length.
        For a compiled step (``static``) buffers hold a power of two of positions (so it sees few
        shapes); an eager step's grow by multiples of 64 positions (a 512-token batch's K/V are not
        allocated, zeroed and copied at 1,024). Buffers start zeroed (a static-shape step attends
        over them, masked, so they must be finite)."""
        keys, values = self.keys, self.values
        n = keys.shape[-2]
        kb, vb = getattr(self, "_kbuf", None), getattr(self, "_vbuf", None)
        if (kb is None or n + add > kb.shape[-2] or kb.shape[:2] != keys.shape[:2]
                or (static and kb.shape[-2] & (kb.shape[-2] - 1))
                or keys.data_ptr() != kb.data_ptr() or keys.stride() != kb.stride()
                or values.data_ptr() != vb.data_ptr() or values.stride() != vb.stride()):
            # (re)allocate: the filled part copied once
            cap = 1 << max(6, (n + add - 1).bit_length()) if static else -(-(n + add) // 64) * 64
            kb, vb = self._hold(keys, values, cap)
        return kb, vb, n

    def seed(self, keys: torch.Tensor, values: torch.Tensor, room: int = 1) -> None:
        """Hold ``keys``/``values`` (this layer's whole K/V) in a buffer with room for ``room`` more
        positions, copied once (``DynamicLayer.update`` into an empty layer copies them, and the
        first step's growth copies them again)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.reserve(room)

    def _hold(self, keys: torch.Tensor, values: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed buffers of ``cap`` positions holding ``keys``/``values`` first; ``keys``/``values`` their views."""
        n = keys.shape[-2]
        kb = keys.new_zeros(*keys.shape[:2], cap, keys.shape[-1])
        vb = values.new_zeros(*values.shape[:2], cap, values.shape[-1])
        kb[:, :, :n], vb[:, :, :n] = keys, values
        self._kbuf, self._vbuf = kb, vb
        self.keys, self.values = kb[:, :, :n], vb[:, :, :n]
        return kb, vb

    def extend(self, length: int) -> None:
        """The first ``length`` buffer positions are filled (written in place by a compiled step)."""
        self.keys, self.values = self._kbuf[:, :, :length], self._vbuf[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        keys = self.keys if self.is_initialized else None
        if keys is None or keys.dim() != 4 or keys.numel() == 0:
            return self._plain_update(key_states, value_states, *args, **kwargs)
        add = key_states.shape[-2]
        kb, vb, n = self.reserve(add)
        kb[:, :, n:n + add] = key_states
        vb[:, :, n:n + add] = value_states
        self.extend(n + add)
        return self.keys, self.values


_GROW_LAYER = None


def grow_layer_class():
    """A ``DynamicLayer`` whose K/V grow in place: a buffer with spare positions (doubling when
    full) and ``keys``/``values`` as views of its filled part, so appending a position writes one
    column instead of copying the whole layer (``torch.cat``) on every step. None where this
    transformers has no ``DynamicLayer``."""
    global _GROW_LAYER
    if _GROW_LAYER is None:
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # pragma: no cover - transformers < 4.56
            _GROW_LAYER = False
        else:
            methods = {k: v for k, v in vars(_GrowInPlace).items() if callable(v)}
            _GROW_LAYER = type("GrowingLayer", (DynamicLayer,), {
                **methods, "_plain_update": DynamicLayer.update, "__module__": __name__,
                "__doc__": grow_layer_class.__doc__})
    return _GROW_LAYER or None


def growable(cache) -> None:
    """Make every plain ``DynamicLayer`` of ``cache`` grow in place (see :func:`grow_layer_class`)."""
    cls = grow_layer_class()
    layers = getattr(cache, "layers", None)
    if cls is None or layers is None:
        return
    base = cls.__bases__[0]  # transformers' DynamicLayer
    for layer in layers:
        if type(layer) is base:
            layer.__class__ = cls


def rebuild_cache(model, cache, rows: Optional[torch.Tensor] = None, first: int = 0, other=None,
                   pad_to: int = 0):
    """A new cache holding ``rows`` of ``cache`` from column ``first`` on, left-padded with zeros
    to ``pad_to`` columns, then (``other``) the rows of another cache stacked below, padded alike.
    Each layer lands in a buffer with room for the next position (:func:`grow_layer_class`)."""
    out = new_cache(model)
    growable(out)
    layers = getattr(out, "layers", None)
    for i in range(len(model.adapter.layers)):
        k, v = layer_kv(cache, i)
        if rows is not None:
            k, v = k[rows], v[rows]
        k, v = k[:, :, first:], v[:, :, first:]
        if other is not None:
            k2, v2 = layer_kv(other, i)
            width = max(k.shape[2], k2.shape[2])
            k, v = pad_left(k, width), pad_left(v, width)
            k = torch.cat([k, pad_left(k2, width)], dim=0)
            v = torch.cat([v, pad_left(v2, width)], dim=0)
        elif pad_to > k.shape[2]:
            k, v = pad_left(k, pad_to), pad_left(v, pad_to)
        if layers is not None and i < len(layers) and hasattr(layers[i], "seed"):
            layers[i].seed(k, v)
        else:
            out.update(k.contiguous(), v.contiguous(), i)
    return out


def pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the positions (dim 2 of K/V, dim 1 of a mask) up to ``width``."""
    dim = 2 if x.dim() == 4 else 1
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class RowsCache:
    """The batch cache as a layer running on some rows sees it: the layer's ``update`` appends
    the new position's K/V of its rows, every other row gets its own (``fill``: propagated from
    its exit state), and the layer attends over its rows' entries only."""

    def __init__(self, cache, rows: list[int], fill: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
        self.cache, self.fill = cache, fill
        self.index = torch.tensor(rows, dtype=torch.long)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        k_all, v_all = self.fill(layer_idx)
        index = self.index.to(k_all.device)
        k_all[index], v_all[index] = key_states.to(k_all.dtype), value_states.to(v_all.dtype)
        keys, values = self.cache.update(k_all, v_all, layer_idx, cache_kwargs)
        return keys[index], values[index]

    def __getattr__(self, name):  # anything else a layer may ask (seq length, flags): the real cache's
        return getattr(self.cache, name)


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and the attention mask (1 = token, 0 = padding) of ragged prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def left_pad_positions(mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions of a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def rows_kwargs(lkw: dict, rows: list[int]) -> dict:
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


def gather_kv(groups: list, layer: int, rows: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The new position's K/V of one layer for every row: each group's propagated K/V, and
    for a finished row (kept only for shape) its last entry again."""
    if len(groups) == 1 and len(groups[0][0]) == rows:
        return groups[0][2][layer - groups[0][1] - 1]
    keys, values = layer_kv(cache, layer)
    k_all, v_all = keys[:, :, -1:].clone(), values[:, :, -1:].clone()
    for rows_, at, kv in groups:
        k, v = kv[layer - at - 1]
        idx = torch.tensor(rows_, device=k_all.device)
        k_all[idx], v_all[idx] = k, v
    return k_all, v_all


def crop(cache, length: int) -> None:
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


class Slot:
    """The cache one layer sees in a compiled step: it writes the new position's K/V into the
    static buffers at ``column`` and hands back the whole buffers (attention masks what is not
    written yet)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor):
        self.keys, self.values, self.column = keys, values, column

    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        self.keys.index_copy_(2, self.column, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, self.column, value_states.to(self.values.dtype))
        return self.keys, self.values


class BlockSlot:
    """The cache one layer sees while blocks of some rows' last positions run (verification):
    ``rows`` each write their block's K/V into their last ``valid.shape[1]``
    columns of the batch cache where ``valid`` says (padding and tokens not running keep what the
    cache holds), and the layer attends over those rows' columns."""

    def __init__(self, cache, layer: int, rows, valid: torch.Tensor):
        self.keys, self.values = layer_kv(cache, layer)
        self.rows = rows  # an index tensor, or slice(None) for every row in order (views, no copy)
        self.valid = valid[:, None, :, None]

    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        first = self.keys.shape[2] - self.valid.shape[2]
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            old = store[self.rows, :, first:]
            store[self.rows, :, first:] = torch.where(self.valid, new.to(store.dtype), old)
        return self.keys[self.rows], self.values[self.rows]


def cache_device(cache) -> torch.device:
    return layer_kv(cache, 0)[0].device


def block_mask(pad_row: Optional[torch.Tensor], block: int, width: int, dtype, device) -> torch.Tensor:
    """The additive attention mask ``[1, 1, block, width]`` of a row's last ``block`` positions:
    each attends to the columns up to its own, except those ``pad_row`` masks (padding, and
    positions rolled back after a rejected draft)."""
    cols = torch.arange(width, device=device)
    own = torch.arange(width - block, width, device=device)[:, None]
    hidden = cols[None, :] > own
    if pad_row is not None:
        hidden = hidden | (pad_row < 0)[None, :]
    mask = torch.zeros((block, width), dtype=dtype, device=device).masked_fill(hidden, torch.finfo(dtype).min)
    return mask[None, None]
