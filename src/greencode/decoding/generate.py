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

Rows are decoded together by a :class:`DecodeBatch` (one cache, left-padded, per-row positions):
each row exits where its own controller says, and a layer runs only on the rows still climbing, so
an exit saves work in a batch too. Rows finish independently and leave the cache; new rows can
join between steps (the endpoint's continuous batching). :func:`generate` is one such batch: one
row (how an editor calls it), one row per controller over the same prompt, or a list of prompts.
What differs between rows is a row strategy the row carries (:mod:`greencode.decoding.strategies`:
teacher-forced, observed; ``observe=True`` records every exit point's state for the RL trajectory
bank), hooked into the one step. A lossless row
(``Row(lossless=True)``, :func:`generate_lossless`) drafts through the same step and is verified by the
full model within it (:mod:`greencode.decoding.speculative`), beside lossy rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from greencode.decoding import speculative
from greencode.decoding.compiled import MODEL_DEFAULT, default_layer_step
from greencode.decoding.controllers import ExitController, NeverExit
from greencode.decoding.steps import (KV_STRATEGIES, RowsCache, Sampling, Slot, check_request, copy_cache,
                                      cut_at_stops, expand_cache, gather_kv, growable, layer_kv, left_pad,
                                      left_pad_positions, new_cache, rebuild_cache, record_logits, rows_kwargs,
                                      select_token, truncate_logits)
from greencode.decoding.strategies import KeptStates, Observed, OracleExits, RowStrategy, TeacherForced
from greencode.errors import ConfigError
from greencode.utils import numpy_blas_threads


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
    # logprobs=n: each chosen token's log-probability, and (n > 0) the top-n (id, log-probability) pairs
    token_logprobs: Optional[list] = None
    top_logprobs: Optional[list] = None
    # keep_states=True: for every decided token (tokens[1:]), the hidden state [H] of the token fed in that
    # step at each early exit point it ran through, {0-based layer: state} (what lossless verification reuses)
    kept_states: Optional[list] = None
    # forced_tokens=...: the token the row itself chose at each position while fed the forced ones
    own_tokens: Optional[list] = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)


def _validate(model, input_ids, max_new_tokens, temperature, top_p, top_k, kv_strategy) -> torch.Tensor:
    if isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise ValueError(f"generate() decodes one sequence at a time; got a batch of {input_ids.shape[0]}")
    check_request(model, int(input_ids.shape[1]), max_new_tokens, temperature, top_p, top_k, kv_strategy)
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
    ids = _validate(model, input_ids, 1, 1.0, 1.0, 0, "propagate")
    t0 = time.perf_counter()
    cache = new_cache(model)
    out = model.hf.model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = model.adapter.lm_head(out.last_hidden_state[:, -1:])  # already through the final norm
    return Prefill(ids, cache, logits, time.perf_counter() - t0)


@torch.inference_mode()
def prefill_chunk(model, input_ids: torch.Tensor, upto: int, state: Optional[Prefill] = None) -> Prefill:
    """Chunked prefill: ``input_ids[:, :upto]`` prefilled, continuing ``state`` (the prefill of a
    shorter prefix of the same prompt, its cache advanced in place). The last chunk gives the same
    logits and cache as :func:`prefill` of the whole prompt (tested), so a long prompt can join a
    batch a step's budget at a time while the rows already there keep decoding."""
    ids = _validate(model, input_ids, 1, 1.0, 1.0, 0, "propagate")
    t0 = time.perf_counter()
    cache = new_cache(model) if state is None else state.cache
    done = int(cache.get_seq_length())
    if not done < upto <= ids.shape[1]:
        raise ValueError(f"prefill_chunk: {done} tokens are prefilled; upto={upto} must be above that and at most "
                         f"the prompt's {ids.shape[1]}")
    out = model.hf.model(input_ids=ids[:, done:upto], past_key_values=cache, use_cache=True)
    logits = model.adapter.lm_head(out.last_hidden_state[:, -1:])
    return Prefill(ids[:, :upto], cache, logits, (state.time_s if state is not None else 0.0) + time.perf_counter() - t0)


def _new_counters() -> dict:
    return dict(layers_run=0, exit_checks=0, lm_head_calls=0, kv_propagated_layers=0, controller_time_s=0.0,
                decode_steps=0, controller_macs=0)


@dataclass
class Row(Sampling):
    """One sequence being decoded: its controller, sampling and stopping rules, and what it
    produced so far. :class:`DecodeBatch` steps many rows together; ``handle`` is the caller's."""

    controller: ExitController
    max_new_tokens: int
    eos: frozenset = frozenset()
    stop_strings: Optional[Sequence[str]] = None
    on_token: Optional[Callable[[int, int], None]] = None  # (token id, exit layer), as each token is chosen
    should_stop: Optional[Callable[[], bool]] = None  # polled before each new token: true ends it "cancelled"
    return_logits: bool = False
    logprobs: Optional[int] = None  # record each chosen token's log-probability (and the top-n when n > 0)
    keep_states: bool = False  # record the fed token's state at every exit point it runs through, per step
    # what this row does differently (greencode.decoding.strategies: TeacherForced, Observed), each with its own fields
    strategies: list = field(default_factory=list)
    # lossless: tokens are drafted with early exits (this row's controller) and verified by the full model
    # in the same batch, so the row emits exactly the full model's output; shorthand for
    # strategies=[speculative.Lossless(k_max, draft_threshold, verify)] (the strategy holds the draft)
    lossless: bool = False
    k_max: int = 4  # lossless: tokens drafted at most before a verification
    draft_threshold: Optional[float] = None  # lossless: also verify after a draft token less confident than this
    verify: str = "reuse"  # lossless: reuse the draft's exact lower layers, or recompute every layer ("full")
    handle: Any = None
    # filled while decoding
    prompt: Optional[torch.Tensor] = None
    pos: int = 0  # position of the token fed next
    tokens: list = field(default_factory=list)
    exit_layers: list = field(default_factory=list)
    counters: dict = field(default_factory=_new_counters)
    logits_seen: Optional[list] = None
    token_logprobs: Optional[list] = None
    top_logprobs: Optional[list] = None
    kept_states: Optional[list] = None
    emitted: int = 0  # tokens handed on (on_token, stop tests); a lossless row's draft waits for verification
    last_logits: Optional[torch.Tensor] = None
    finish: str = "length"
    done: bool = False
    text: Optional[str] = None
    generator: Optional[torch.Generator] = None
    checks: frozenset = frozenset()
    t_added: float = 0.0
    t_prefilled: float = 0.0
    t_done: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[-1])


@dataclass
class _Step:
    """One step's bookkeeping: the running rows' states and which rows still climb, decide, exited."""

    rows: list
    h: torch.Tensor  # the running rows' hidden states [len(run), 1, H]
    lkw: dict  # layer keyword arguments of every row
    attn: Optional[torch.Tensor]  # every row's additive mask (None: no padding)
    run: list  # rows whose layers run (all of them, or in propagate mode those still climbing)
    where: dict  # a running row -> its position in h (kept in step with run)
    run_kw: dict
    run_attn: Optional[torch.Tensor]
    active: list  # rows still deciding
    exit_at: dict = field(default_factory=dict)
    exit_h: dict = field(default_factory=dict)
    row_logits: dict = field(default_factory=dict)
    # rows that exited together at one layer: (their indices, that layer, K/V of every deeper layer)
    groups: list = field(default_factory=list)
    seen_h: list = field(default_factory=list)  # reads_states: the states at the exit points, then the final one

    def __post_init__(self):
        self.counters = [r.counters for r in self.rows]
        self.controllers = [r.controller for r in self.rows]
        strategies = [s for r in self.rows for s in r.strategies]
        self.kinds: dict = {}  # each kind of strategy -> its rows [(row index, strategy)], for its batched hooks
        for r, row in enumerate(self.rows):
            for s in row.strategies:
                self.kinds.setdefault(type(s), []).append((r, s))
        self.carry = any(s.carries_exited for s in strategies)  # no row leaves the layer loop when it exits
        self.record = any(s.reads_states for s in strategies)  # keep the states at the exit points (seen_h)


class DecodeBatch:
    """Rows decoded together, one token per row per :meth:`step`, over one cache.

    Rows join with :meth:`add` (their prompts prefilled by the full model, then aligned with the
    rows already there by left padding) and leave when finished (EOS, stop string, length,
    cancelled): :meth:`step` returns them and drops them from the cache. Each row exits where
    its own controller says. With ``propagate`` a layer runs only on the rows still climbing:
    a row that exited skips every deeper layer, whose K/V for it are propagated from its exit
    state (its own, per row), so an exit saves work in a batch too. ``compute`` and ``observe``
    carry exited rows through every layer (exact K/V; the shadow climb of the trajectory bank).
    While fewer than ``skip_share`` of the rows have exited, they are carried along too (their
    layer outputs discarded, their K/V replaced by the propagated ones): running a layer on a
    subset copies the subset's cache rows, which costs more than a few rows' layers (measured on
    the CPU default: always regrouping was 5-10% slower at low exit rates). The counters count
    each row's own work either way.
    Every row's tokens equal a batch of one with the same controller (greedy; sampling with a
    seed draws from the row's own generator), tested for every controller.
    """

    def __init__(self, model, *, kv_strategy: str = "propagate", observe: bool = False, tokenizer=None,
                 skip_share: float = 0.5, layer_step=MODEL_DEFAULT):
        if kv_strategy not in KV_STRATEGIES:
            raise ConfigError(f"kv_strategy={kv_strategy!r}; choose one of {', '.join(KV_STRATEGIES)}")
        self.model = model
        self.skip_share = skip_share
        self.tokenizer = tokenizer
        self.propagate = kv_strategy == "propagate"
        self.observe = observe
        self.rows: list[Row] = []
        self.cache = None
        self.pad: Optional[torch.Tensor] = None  # additive [rows, T]: 0 where a row attends, min on padding
        self.layers = list(model.adapter.layers)
        self.final = model.final_layer
        self.exit_points = model.exit_points
        self.exit_set = frozenset(self.exit_points)
        # the layer step where every row runs a layer: a CompiledSteps (greencode.decoding.compiled) or None (eager);
        # MODEL_DEFAULT: the one decoding.compile chose for this model (use_compiled_steps)
        self.compiled = default_layer_step(model) if layer_step is MODEL_DEFAULT else layer_step
        if self.compiled is not None:
            # a layer run on a subset of rows is eager: rows that exited are carried along until all have
            self.skip_share = float("inf")

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ joining
    def _prepare(self, row: Row, in_use: set) -> None:
        row.t_added = time.perf_counter()
        if row.lossless and not any(isinstance(s, speculative.Lossless) for s in row.strategies):
            row.strategies = [speculative.Lossless(row.k_max, row.draft_threshold, row.verify), *row.strategies]
        row.lossless = any(isinstance(s, speculative.Lossless) for s in row.strategies)
        if self.observe and not any(isinstance(s, Observed) for s in row.strategies):
            row.strategies = [*row.strategies, Observed()]
        if row.controller.runs_all_layers and not any(isinstance(s, OracleExits) for s in row.strategies):
            row.strategies = [*row.strategies, OracleExits()]
        for s in list(row.strategies):
            if not isinstance(s, RowStrategy):
                raise TypeError(f"Row.strategies holds {type(s).__name__}; give RowStrategy instances")
            if id(s) in in_use:
                raise ValueError(f"a {type(s).__name__} holds one row's state; give each row its own")
            in_use.add(id(s))
            s.prepare(row, self)
        if row.keep_states and not any(isinstance(s, KeptStates) for s in row.strategies):  # (a lossless row's too)
            kept = KeptStates()
            row.strategies = [*row.strategies, kept]
            kept.prepare(row, self)
        if getattr(row.controller, "per_row_state", False):  # per-row state: one instance per row
            if id(row.controller) in in_use:
                row.controller = row.controller.row_copy()  # decided with the others of its group
            in_use.add(id(row.controller))
        row.controller.reset()
        row.checks = row.controller.check_layers(self.model)
        row.eos = frozenset(row.eos)
        if row.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text")
        if row.do_sample and row.seed is not None:
            row.generator = torch.Generator(device=self.model.device).manual_seed(int(row.seed))
        if row.return_logits:
            row.logits_seen = []
        if row.logprobs is not None:
            row.token_logprobs, row.top_logprobs = [], []

    @torch.inference_mode()
    def add(self, rows: Sequence[Row], prompts: Union[Sequence[Sequence[int]], torch.Tensor],
            prefilled: Optional[Prefill] = None) -> list[Row]:
        """Prefill ``rows`` and let them join. ``prompts``: one token list per row, or one prompt
        (a ``[1, T]`` tensor) that every row continues (one prefill, repeated per row).
        ``prefilled``: that one prompt's :func:`prefill` (its cache copied). Returns the rows
        already finished by their first token (not kept)."""
        rows = list(rows)
        if not rows:
            return []
        in_use = {id(r.controller) for r in self.rows} | {id(s) for r in self.rows for s in r.strategies}
        for row in rows:
            self._prepare(row, in_use)
        model, adapter = self.model, self.model.adapter
        shared = isinstance(prompts, torch.Tensor)
        if shared:
            ids = prompts
            if prefilled is not None:
                if prefilled.input_ids.shape != ids.shape or not torch.equal(prefilled.input_ids.to(ids.device), ids):
                    raise ValueError("prefilled= holds the prefill of another prompt; call prefill(model, input_ids) "
                                     "with the same input_ids")
                cache = copy_cache(prefilled.cache)
                logits = prefilled.logits
            else:
                cache = new_cache(model)
                out = model.hf.model(input_ids=ids, past_key_values=cache, use_cache=True)
                logits = adapter.lm_head(out.last_hidden_state[:, -1:])  # already through the final norm
            expand_cache(cache, len(rows))
            pad = None
            for row in rows:
                row.prompt, row.pos = ids, int(ids.shape[1])
            first_logits = [logits[0:1]] * len(rows)
        else:
            cache, pad, first_logits = self._prefill_prompts(rows, prompts)
        now = time.perf_counter()
        for row, lg in zip(rows, first_logits):
            row.t_prefilled = now
            row.counters["lm_head_calls"] += 1
            self._choose(row, lg, self.final)
        self._join(cache, pad, len(rows))
        self.rows.extend(rows)
        finished = [row for row in rows if self._finished(row)]
        self._drop(finished)
        return finished

    def _prefill_prompts(self, rows: list, prompts) -> tuple:
        """One prompt per row, left-padded into one prefill (each distinct prompt once): the cache (a row per
        row), the additive padding mask (None without padding) and each row's first logits."""
        model = self.model
        if len(prompts) != len(rows):
            raise ValueError(f"{len(prompts)} prompts for {len(rows)} rows")
        unique = list(dict.fromkeys(tuple(int(t) for t in p) for p in prompts))  # each prompt prefilled once
        of_row = [unique.index(tuple(int(t) for t in p)) for p in prompts]
        ids, mask = left_pad([list(p) for p in unique], model.device)
        cache = new_cache(model)
        pad = None
        if len(unique) == 1:
            out = model.hf.model(input_ids=ids, past_key_values=cache, use_cache=True)
        else:
            out = model.hf.model(input_ids=ids, attention_mask=mask, position_ids=left_pad_positions(mask),
                                 past_key_values=cache, use_cache=True)
            if not bool(mask.all()):
                pad = torch.zeros(mask.shape, dtype=model.dtype, device=ids.device)
                pad = pad.masked_fill(mask == 0, torch.finfo(model.dtype).min)
        logits = model.adapter.lm_head(out.last_hidden_state[:, -1:])
        if of_row != list(range(len(unique))):  # repeated prompts: one row of the cache each
            index = torch.tensor(of_row, device=ids.device)
            cache = rebuild_cache(model, cache, index)
            pad = None if pad is None else pad[index]
        for k, row in enumerate(rows):
            row.prompt = torch.tensor([list(prompts[k])], dtype=torch.long, device=ids.device)
            row.pos = len(prompts[k])
        return cache, pad, [logits[u:u + 1] for u in of_row]

    def _join(self, cache, pad: Optional[torch.Tensor], n: int) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.pad = cache, pad
            return
        model = self.model
        t_old, t_new = int(self.cache.get_seq_length()), int(cache.get_seq_length())
        width = max(t_old, t_new)
        min_ = torch.finfo(model.dtype).min
        old = self.pad if self.pad is not None else torch.zeros((len(self.rows), t_old), dtype=model.dtype,
                                                                device=model.device)
        new = pad if pad is not None else torch.zeros((n, t_new), dtype=model.dtype, device=model.device)

        def widen(m):
            if m.shape[1] >= width:
                return m
            return torch.cat([m.new_full((m.shape[0], width - m.shape[1]), min_), m], dim=1)

        self.pad = torch.cat([widen(old), widen(new)], dim=0)
        self.cache = rebuild_cache(model, self.cache, other=cache)
        if not bool((self.pad < 0).any()):
            self.pad = None

    def _drop(self, finished: Sequence[Row]) -> None:
        """Remove finished rows (and columns that are padding for every row left) from the cache."""
        if not finished:
            return
        keep = [k for k, r in enumerate(self.rows) if not r.done]
        self.rows = [self.rows[k] for k in keep]
        if not self.rows:  # the last rows keep the cache
            return
        first = 0
        pad = self.pad[keep] if self.pad is not None else None
        if pad is not None:
            real = (pad == 0).any(dim=0)
            first = int(real.nonzero()[0]) if bool(real.any()) else 0
            pad = pad[:, first:]
            if not bool((pad < 0).any()):
                pad = None
        self.cache = rebuild_cache(self.model, self.cache, torch.tensor(keep, device=self.model.device), first)
        self.pad = pad

    # ------------------------------------------------------------------ one token
    def _choose(self, row: Row, lg: torch.Tensor, exit_layer: int) -> None:
        token = select_token(lg, row.do_sample, row.temperature, row.top_p, row.top_k, row.generator)
        for s in row.strategies:
            token = s.chosen(row, token)
        row.tokens.append(token)
        row.exit_layers.append(exit_layer)
        row.last_logits = lg
        record_logits(row, token, lg)

    def _finished(self, row: Row) -> bool:
        """Hand on the row's new tokens (a lossless row's once verified), each tested for an end in
        turn: EOS, a stop string, the length; then cancellation. An ended row drops the tokens after
        its end (a lossless row: its unverified draft)."""
        ready = len(row.tokens)
        for s in row.strategies:
            ready = s.ready(row, ready)
        while row.emitted < ready:
            k = row.emitted
            row.emitted += 1
            token = row.tokens[k]
            if row.on_token is not None:
                row.on_token(token, row.exit_layers[k])
            if token in row.eos:
                return self._end(row, "eos")
            if row.stop_strings and any(s and s in self.tokenizer.decode(row.tokens[:k + 1], skip_special_tokens=True)
                                        for s in row.stop_strings):
                return self._end(row, "stop")
            if k + 1 >= row.max_new_tokens:
                return self._end(row, "length")
        if row.should_stop is not None and row.should_stop():
            return self._end(row, "cancelled")
        return False

    @staticmethod
    def _end(row: Row, reason: str) -> bool:
        row.finish, row.done, row.t_done = reason, True, time.perf_counter()
        del row.tokens[row.emitted:], row.exit_layers[row.emitted:]
        truncate_logits(row, row.emitted)
        return True

    def full_logits(self, blocks: list) -> list:
        """The full model's logits after every fed token of each :class:`~greencode.decoding.speculative.Block`
        (rows of this batch), verified together over this batch's cache (what a lossless row's
        verification asks of the batch)."""
        return speculative.block_logits(self.model, self.cache, self.pad, blocks)

    def mask_last(self, r: int, n: int) -> None:
        """Take back row ``r``'s last ``n`` positions (a rejected draft): its attention masks them
        from now on (the columns stay until the batch drops leading padding)."""
        if self.pad is None:
            self.pad = torch.zeros((len(self.rows), int(self.cache.get_seq_length())), dtype=self.model.dtype,
                                   device=self.model.device)
        self.pad[r, -n:] = torch.finfo(self.model.dtype).min

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One new token for every row; returns the rows that finished with it. The layers run
        segment by segment (eager: one layer; compiled: up to the next decision point); after each,
        what is read there is read (:meth:`_look`) and the rows whose controllers check there decide
        (:meth:`_decide`); then every row's token is chosen (a lossless row's drafts verified).
        NumPy's BLAS runs on one thread meanwhile (the host checks' small products; :func:`numpy_blas_threads`)."""
        if not self.rows:
            return []
        with numpy_blas_threads(1):
            return self._step()

    def _step(self) -> list[Row]:
        growable(self.cache)  # appending this step's position writes in place
        st = self._begin()
        static = self._static_step(len(st.rows)) if self.compiled is not None and self.compiled.active else None
        stops = self._segment_stops(st) if static is not None else None
        start = 0
        while start < len(self.layers):
            if not st.run:  # every row has exited: its deeper layers get the K/V propagated from its exit state
                self._propagate_rest(st, start)
                break
            end = self._run_segment(st, start, static, stops)
            self._after_segment(st, range(start, end + 1))
            start = end + 1
            if self._look(st, end):
                break
            self._decide(st, end)
        self._top_logits(st)
        self._choose_tokens(st)
        for kind, members in st.kinds.items():
            kind.after_step(self, st, members)
        finished = [row for row in st.rows if self._finished(row)]
        self._drop(finished)
        return finished

    def _begin(self) -> "_Step":
        """This step's input: every row's last token embedded at its position; every row runs and decides."""
        rows, adapter = self.rows, self.model.adapter
        n = len(rows)
        device = rows[0].prompt.device
        x = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        position_ids = torch.tensor([[r.pos] for r in rows], dtype=torch.long, device=device)
        h = adapter.embed(x, position_ids)
        lkw = adapter.layer_kwargs(h, position_ids)
        attn = None
        if self.pad is not None:  # the new position is real for every row
            self.pad = torch.cat([self.pad, self.pad.new_zeros((n, 1))], dim=1)
            attn = self.pad[:, None, None, :]
        st = _Step(rows=rows, h=h, lkw=lkw, attn=attn, run=list(range(n)), where={r: r for r in range(n)},
                   run_kw=lkw, run_attn=attn, active=list(range(n)))
        return st

    def _segment_stops(self, st: "_Step") -> list[int]:
        """Where a compiled segment must end: every layer where some row's controller checks, where
        observe, kept states or the oracle read the state, and the final layer."""
        need = {self.final}
        for row in st.rows:
            every = any(s.reads_every_exit_point for s in row.strategies)
            need |= set(self.exit_points) if every else row.checks
        return sorted(need)

    def _propagate_rest(self, st: "_Step", start: int) -> None:
        for j in range(start, len(self.layers)):
            k, v = gather_kv(st.groups, j, len(st.rows), self.cache)
            self.cache.update(k, v, j)
            for rows_, _, _ in st.groups:
                for r in rows_:
                    st.counters[r]["kv_propagated_layers"] += 1

    def _run_segment(self, st: "_Step", start: int, static, stops) -> int:
        """Run the running rows through layers ``start``..(returned): compiled, every row up to the
        next stop; eager, one layer (on a subset of rows through :class:`RowsCache`)."""
        layers, cache = self.layers, self.cache
        if static is not None:  # every row runs it (compiled steps carry rows that exited)
            end = next(b for b in stops if b >= start)
            buf_k, buf_v, column, static_mask, length = static
            st.h = self.compiled(layers[start:end + 1], st.h, static_mask,
                                 [Slot(buf_k[j], buf_v[j], column) for j in range(start, end + 1)], st.run_kw)
            for j in range(start, end + 1):
                cache.layers[j].extend(length)
            return end
        n = len(st.rows)
        kv = cache if len(st.run) == n else RowsCache(cache, st.run, lambda j: gather_kv(st.groups, j, n, cache))
        out = layers[start](st.h, attention_mask=st.run_attn, past_key_values=kv, use_cache=True, **st.run_kw)
        st.h = out[0] if isinstance(out, tuple) else out
        return start

    def _after_segment(self, st: "_Step", span: range) -> None:
        """Count the layers just run; rows carried through them after their exit (observe's shadow
        climb, or too few rows exited to regroup) wrote their own K/V: the propagated ones replace
        them (a row attends over its own cache row only, so replacing them after a segment is the same)."""
        counters = st.counters
        for r in st.active:
            counters[r]["layers_run"] += len(span)
        if st.groups:
            carried = [(rows_, at, kv) for rows_, at, kv in st.groups if rows_[0] in st.where]
            for j in span if carried else ():
                keys, values = layer_kv(self.cache, j)
                for rows_, at, kv in carried:
                    k, v = kv[j - at - 1]
                    idx = torch.tensor(rows_, device=keys.device)
                    keys[idx, :, -1:] = k
                    values[idx, :, -1:] = v
            for rows_, _, _ in st.groups:
                for r in rows_:
                    counters[r]["kv_propagated_layers"] += len(span)
        elif not self.propagate:
            for r in st.exit_at:  # compute: the rows that exited keep running the deeper layers
                counters[r]["layers_run"] += len(span)

    def _look(self, st: "_Step", i: int) -> bool:
        """What is read at layer ``i`` before any decision: the observed states (a strategy that
        ``reads_states``), then each strategy kind's :meth:`~RowStrategy.at_exit_point` at an exit point.
        True at the final layer."""
        if st.record and (i in self.exit_set or i == self.final):
            st.seen_h.append(st.h.detach().clone())
        if i == self.final:
            return True
        if i in self.exit_set:
            for kind, members in st.kinds.items():
                kind.at_exit_point(self, st, i, members)
        return False

    def _decide(self, st: "_Step", i: int) -> None:
        """The exit checks at layer ``i``. The rows that exit get their deeper layers' K/V (one fused
        projection) and leave the layer loop once ``skip_share`` of the batch has (below that they are
        carried along: running a layer on a subset of rows copies their cache rows)."""
        asking = [r for r in st.active if i in st.rows[r].checks]
        if not asking:
            return
        t0 = time.perf_counter()
        exiting = self._exit_checks(st, i, asking)
        if exiting and self.propagate:  # one fused projection for every row leaving here
            pos = [st.where[r] for r in exiting]
            if len(pos) == len(st.run):
                kv = self.model.adapter.propagate(i + 1, st.h, st.run_kw)
            else:
                kv = self.model.adapter.propagate(i + 1, st.h[pos], rows_kwargs(st.run_kw, pos))
            st.groups.append((exiting, i, kv))
        gone = sum(r in st.exit_at for r in st.run) if exiting and self.propagate and not st.carry else 0
        if gone and (gone == len(st.run) or gone >= self.skip_share * len(st.rows)):
            keep = [k for k, r in enumerate(st.run) if r not in st.exit_at]
            st.run = [st.run[k] for k in keep]
            st.where = {r: k for k, r in enumerate(st.run)}
            if st.run:
                st.h = st.h[keep]
                st.run_kw = rows_kwargs(st.lkw, st.run)
                st.run_attn = None if st.attn is None else st.attn[st.run]
        elapsed = time.perf_counter() - t0
        for r in asking:  # one row: its own time; several: the batch's time, shared
            st.counters[r]["controller_time_s"] += elapsed / len(asking)

    def _exit_checks(self, st: "_Step", i: int, asking: list[int]) -> list[int]:
        """Ask each row's controller at layer ``i`` (rows sharing one controller decide together);
        returns the rows that exit."""
        model, adapter, counters = self.model, self.model.adapter, st.counters
        normed_all = None
        exiting: list[int] = []
        by_ctrl: dict[int, list[int]] = {}
        for r in asking:  # one controller, or the per-row copies of one (their batch group)
            by_ctrl.setdefault(id(st.controllers[r].batch_group()), []).append(r)
        for rows_ in by_ctrl.values():
            ctrl = st.controllers[rows_[0]]
            head = ctrl.logits_at(i)  # the LM head at this check (counted below, reused if the row exits)
            need = ctrl.needs_normed or head
            if need and normed_all is None:
                normed_all = model.final_norm(st.h)
            pos = [st.where[r] for r in rows_]
            if len(rows_) == 1:
                p = pos[0]
                normed = normed_all[p:p + 1] if need else None
                lg = adapter.lm_head(normed) if head else None
                decisions, lgs = [ctrl.should_exit(i, st.h[p:p + 1], normed, lg)], [lg]
            else:
                normed = normed_all[pos] if need else None
                lg = adapter.lm_head(normed) if head else None
                ctrls = [st.controllers[r] for r in rows_]
                decisions = (ctrl.should_exit_rows(i, st.h[pos], normed, lg) if all(c is ctrl for c in ctrls)
                             else ctrl.decide_rows(i, ctrls, st.h[pos], normed, lg))
                lgs = [None if lg is None else lg[k:k + 1] for k in range(len(rows_))]
            macs = ctrl.check_macs(i)
            for r, p, decision, lg_r in zip(rows_, pos, decisions, lgs):
                counters[r]["lm_head_calls"] += lg_r is not None
                counters[r]["exit_checks"] += 1
                counters[r]["controller_macs"] += macs
                if decision:
                    st.exit_at[r], st.row_logits[r] = i, lg_r
                    st.active.remove(r)
                    st.exit_h[r] = st.h[p:p + 1].clone()
                    exiting.append(r)
        return exiting

    def _top_logits(self, st: "_Step") -> None:
        """The rows that ran to the top: one LM head for all of them; then their strategies'
        :meth:`~RowStrategy.at_top` (the oracle's exit: the first exit point agreeing with the final layer)."""
        top = [r for r in range(len(st.rows)) if r not in st.exit_at]
        if not top:
            return
        pos = [st.where[r] for r in top]
        top_logits = self.model.decode(st.h if len(pos) == st.h.shape[0] else st.h[pos])
        for k, r in enumerate(top):
            st.row_logits[r] = top_logits[k:k + 1]
            st.counters[r]["lm_head_calls"] += 1
            st.exit_at[r] = self.final
            for s in st.rows[r].strategies:
                s.at_top(st.rows[r], st, r)

    def _choose_tokens(self, st: "_Step") -> None:
        """Every row's token from the logits where it exited (kept in ``st.row_logits``); the rows that
        exited without them get one LM head call together."""
        need = [r for r in range(len(st.rows)) if st.row_logits.get(r) is None]
        if need:
            logits = self.model.decode(torch.cat([st.exit_h[r] for r in need]))
            for k, r in enumerate(need):
                st.row_logits[r] = logits[k:k + 1]
                st.counters[r]["lm_head_calls"] += 1
        for r, row in enumerate(st.rows):
            lg = st.row_logits[r]
            self._choose(row, lg, st.exit_at[r])
            st.counters[r]["decode_steps"] += 1
            row.pos += 1

    def _static_step(self, rows: int):
        """The compiled step's view of this step: every layer's K/V buffer (room for the new
        position), the new position's column, the mask over the whole buffer and the new length."""
        layers = getattr(self.cache, "layers", None)
        if not layers or not all(hasattr(lay, "reserve") for lay in layers):
            return None  # a cache this transformers does not let grow in place: eager
        bufs = [lay.reserve(1, static=True) for lay in layers]
        n = bufs[0][2]
        caps = {b[0].shape[2] for b in bufs}
        if len(caps) != 1 or any(b[2] != n for b in bufs):
            return None
        for kb, vb, _ in bufs:
            self.compiled.prepare(kb, vb)
        device, dtype = bufs[0][0].device, self.model.dtype
        mask = torch.full((rows, 1, 1, caps.pop()), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask[:, 0, 0, :n + 1] = 0 if self.pad is None else self.pad
        column = torch.tensor([n], dtype=torch.long, device=device)
        return [b[0] for b in bufs], [b[1] for b in bufs], column, mask, n + 1

    def result(self, row: Row) -> GenerationResult:
        """A finished row as a :class:`GenerationResult` (text cut at the first stop string)."""
        text = None
        if self.tokenizer is not None:
            text = cut_at_stops(self.tokenizer.decode(row.tokens, skip_special_tokens=True), row.stop_strings)
        c = row.counters
        res = GenerationResult(tokens=row.tokens, exit_layers=row.exit_layers, finish_reason=row.finish,
                               counters=c, text=text, prompt_tokens=row.prompt_tokens, logits=row.logits_seen,
                               token_logprobs=row.token_logprobs, top_logprobs=row.top_logprobs)
        for s in row.strategies:
            s.finish(row, res)
        end = row.t_done or time.perf_counter()
        c.update(prefill_time_s=row.t_prefilled - row.t_added, decode_time_s=end - row.t_prefilled,
                 total_time_s=end - row.t_added, new_tokens=len(row.tokens))
        return res


@torch.inference_mode()
def generate(model, input_ids: Union[torch.Tensor, Sequence[int]],
             controller: Union[ExitController, Sequence[ExitController], None] = None,
             max_new_tokens: int = 15, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: Optional[int] = None, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
             stop_strings: Optional[Sequence[str]] = None, tokenizer=None,
             kv_strategy: str = "propagate", return_logits: bool = False, logprobs: Optional[int] = None,
             on_token: Optional[Callable[[int, int], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None,
             prefilled: Optional[Prefill] = None, observe: bool = False,
             forced_tokens: Optional[Sequence[Sequence[int]]] = None,
             layer_step=MODEL_DEFAULT) -> Union[GenerationResult, list[GenerationResult]]:
    """Generate up to ``max_new_tokens`` tokens with early exits chosen by ``controller``.

    With :class:`NeverExit` (the default) and greedy decoding this produces exactly what HF
    ``generate(do_sample=False)`` produces with its KV cache.

    ``controller`` may be a list (one row each, all continuing the prompt, one shared prefill) and
    ``input_ids`` a list of prompts (one row each, left-padded); a list of results comes back. The rows
    decode together in a :class:`DecodeBatch`, each exiting where its own controller says, each row's
    tokens equal to a run alone (greedy), its counters its own work (what the compute ratio reads), its
    timers the batch's wall time while it was in it; with a ``seed`` each row samples from its own generator.

    ``on_token(token_id, exit_layer)`` is called as each token is chosen (streaming, one row);
    ``should_stop()``, polled before each token, ends it ``"cancelled"`` when true. ``logprobs``: each
    chosen token's log-probability (``result.token_logprobs``) and, when > 0, the top-n pairs.
    ``prefilled``: a :func:`prefill` of the same ``input_ids`` (its cache copied, not recomputed).

    ``observe=True`` records every decided token's state at every early exit point and every exit
    point's greedy prediction (``exit_states``, ``exit_preds``: the trajectory bank's data; the row climbs
    on in the shadow past its exit, uncounted, its tokens, exits and cache unchanged:
    :class:`~greencode.decoding.strategies.Observed`). ``forced_tokens`` (one list per row) teacher-forces
    each row, ``result.own_tokens`` holding what it chose at each position (token consistency:
    :class:`~greencode.decoding.strategies.TeacherForced`). ``layer_step``: a
    :class:`~greencode.decoding.compiled.CompiledSteps`, None (eager), or by default the one
    ``decoding.compile`` chose for the model.
    """
    prompts = _prompt_list(input_ids)  # None: one prompt (every row continues it)
    many = isinstance(controller, (list, tuple)) or prompts is not None
    if isinstance(controller, (list, tuple)):
        controllers = list(controller)
    else:
        controllers = [controller or NeverExit()] * (len(prompts) if prompts is not None else 1)
    ids = _check_generate(model, input_ids, prompts, controllers, max_new_tokens, temperature, top_p, top_k,
                          kv_strategy, on_token is not None or should_stop is not None, prefilled, stop_strings,
                          tokenizer, forced_tokens)
    eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    rows = [Row(controller=c, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                top_p=top_p, top_k=top_k, seed=seed, eos=eos, stop_strings=stop_strings, on_token=on_token,
                should_stop=should_stop, return_logits=return_logits, logprobs=logprobs,
                strategies=[] if forced_tokens is None else [TeacherForced(forced_tokens[k])])
            for k, c in enumerate(controllers)]
    batch = DecodeBatch(model, kv_strategy=kv_strategy, observe=observe, tokenizer=tokenizer, layer_step=layer_step)
    batch.add(rows, ids if prompts is None else prompts, prefilled=prefilled)
    while batch.rows:
        batch.step()
    results = [batch.result(row) for row in rows]
    if len(rows) > 1:
        for res in results:
            res.counters["batch_rows"] = len(rows)
    return results if many else results[0]


def _check_generate(model, input_ids, prompts, controllers, max_new_tokens, temperature, top_p, top_k, kv_strategy,
                    callbacks: bool, prefilled, stop_strings, tokenizer, forced_tokens) -> Optional[torch.Tensor]:
    """:func:`generate`'s argument checks (ValueError naming the fix); the one prompt's ids, or None for a
    list of prompts."""
    if not controllers:
        raise ValueError("controller=[] gives no rows to decode; pass at least one controller")
    if prompts is not None and len(prompts) != len(controllers):
        raise ValueError(f"{len(prompts)} prompts but {len(controllers)} controllers; give one controller for all "
                         "prompts or one per prompt")
    if len(controllers) > 1 and callbacks:
        raise ValueError("on_token and should_stop are for one row; stream single-row generations (or step a "
                         "DecodeBatch with one callback per row)")
    if prompts is not None and prefilled is not None:
        raise ValueError("prefilled= is the prefill of one prompt; a batch of prompts is prefilled together")
    ids = None
    if prompts is None:
        ids = _validate(model, input_ids, max_new_tokens, temperature, top_p, top_k, kv_strategy)
    else:
        for p in prompts:
            _validate(model, p, max_new_tokens, temperature, top_p, top_k, kv_strategy)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if forced_tokens is not None and len(forced_tokens) != len(controllers):
        raise ValueError(f"forced_tokens has {len(forced_tokens)} lists for {len(controllers)} rows; give one per row")
    return ids


@torch.inference_mode()
def generate_lossless(model, input_ids: Union[torch.Tensor, Sequence[int]], controller: ExitController,
                      max_new_tokens: int = 15, *, k_max: int = 6, draft_threshold: Optional[float] = None,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      seed: Optional[int] = None, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                      stop_strings: Optional[Sequence[str]] = None, tokenizer=None, kv_strategy: str = "propagate",
                      on_token: Optional[Callable[[int, int], None]] = None,
                      should_stop: Optional[Callable[[], bool]] = None, verify: str = "reuse",
                      layer_step=MODEL_DEFAULT) -> GenerationResult:
    """Generation whose output is the full model's (greedy: the same tokens; sampling: the same
    distribution), drafted with early exits by ``controller``: one lossless row of a
    :class:`DecodeBatch` (see :mod:`greencode.decoding.speculative`).

    ``k_max``: tokens drafted at most before a verification. ``draft_threshold``: also verify
    after a drafted token whose max softmax probability at its exit layer is below it.
    ``verify``: ``reuse`` (the draft's exact lower layers are kept) or ``full``. The other
    arguments are :func:`generate`'s; ``on_token`` sees each token once it is verified (its exit
    layer: the final one), ``should_stop`` is polled every step.

    ``counters`` add ``rounds`` (verifications), ``drafted`` (tentative tokens), ``accepted`` (of
    those), ``verified_tokens`` (tokens the verification ran layers for), ``exact_tokens``
    (accepted without verification: no exit since the last one), ``residual_samples``,
    ``draft_threshold_stops``, ``acceptance_rate`` and ``mean_draft_length``; ``layers_run``,
    ``kv_propagated_layers``, ``lm_head_calls`` and ``exit_checks`` count drafting and
    verification, the work spent on rejected tokens included."""
    ids = _validate(model, input_ids, max_new_tokens, temperature, top_p, top_k, kv_strategy)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    row = Row(controller=controller, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
              top_p=top_p, top_k=top_k, seed=seed, eos=eos, stop_strings=stop_strings, on_token=on_token,
              should_stop=should_stop, lossless=True, k_max=k_max, draft_threshold=draft_threshold, verify=verify)
    batch = DecodeBatch(model, kv_strategy=kv_strategy, tokenizer=tokenizer, layer_step=layer_step)
    batch.add([row], ids)
    while batch.rows:
        batch.step()
    return batch.result(row)


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


def compute_cost(model, results: Sequence[GenerationResult], controller: Optional[ExitController] = None) -> dict:
    """Hardware-independent cost of the decode steps (the prefill is the same for every
    method and excluded), as multiply-accumulates from the model's cost model: layers run,
    K/V propagation, LM-head calls and the controller's own work, over what the full model
    does for the same steps (every layer + one LM head per token). Attention-score work,
    which grows with the context, is left out of both. The controller's work is what the loop
    counted at each check (``counters["controller_macs"]``: :meth:`ExitController.check_macs`, which
    may differ from one exit point to the next); a result without that counter is charged
    ``controller.macs_per_check`` per exit check."""
    cm = model.cost_model()
    steps = sum(r.counters["decode_steps"] for r in results)
    done = sum(r.counters["layers_run"] * cm["layer_macs"] + r.counters["kv_propagated_layers"] * cm["kv_macs"]
               + (r.counters["lm_head_calls"] - 1) * cm["lm_head_macs"]  # minus the prefill's head
               for r in results)
    ctrl = controller.macs_per_check if controller is not None else 0
    done += sum(r.counters["controller_macs"] if "controller_macs" in r.counters else r.counters["exit_checks"] * ctrl
                for r in results)
    full = steps * (model.num_layers * cm["layer_macs"] + cm["lm_head_macs"])
    layers_run = sum(r.counters["layers_run"] for r in results)
    return {"compute_ratio": (done / full) if full else None,
            "layers_skipped_share": (1 - layers_run / (steps * model.num_layers)) if steps else None,
            "decode_steps": steps, "macs_done": done, "macs_full": full}
