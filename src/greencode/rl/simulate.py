"""A trajectory bank from teacher-forced passes with the behaviour's early exits simulated.

The decoding-loop bank (:mod:`greencode.rl.build`, ``rl.bank.source: decode``) runs one token
at a time. This module gets the same states from one teacher-forced pass over a window of a
training file, layer by layer and in parallel over all positions (``rl.bank.source: simulate``):

* the decoder layers run in order over the whole window (the real HF layers, called directly);
* after each exit-point layer, every still-running *decided* position (``p >= m``, the minimum
  context: the positions before it are the prompt, which the loop prefills with the full model)
  may exit there: a random behaviour (``rl.bank.behaviour: random``, one rate per sequence drawn
  from ``rl.bank.exit_rate``), the full model, or a stateless exit controller;
* a position that has exited keeps its residual stream frozen at its exit state for every deeper
  layer, yet each deeper layer still computes its K/V from that frozen state (through the layer's
  own input norm and K/V projections, rotary at its position), which is exactly the decoding loop's
  ``propagate`` K/V strategy: later positions attend to the propagated K/V.

A position's state at layer ``l`` depends only on layers ``<= l`` of positions ``<= p``, so this
gives the states the decoding loop reaches token by token with the same exits when it is fed the
same tokens (``generate(..., forced_tokens=..., observe=True)`` with the window's first ``m``
tokens as the prompt): tested against that loop in fp32 for Llama and OPT.

**What is recorded, and how it matches the decoding bank.** In observe mode the loop lets a token
that exited keep climbing "in the shadow": its states at the deeper exit points, and the label, are
those it would have reached had it continued *this token*, over the cache the behaviour really left
(earlier tokens' propagated K/V); only the token's own K/V at each deeper layer are its shadow
ones, as a token that continues computes them. The simulation runs that shadow stream too: at each
layer after the first exit, the shadow states of all positions go through the layer once more,
attending to the real stream's K/V of the earlier positions (propagated where those exited) and to
their own shadow K/V at their own position. So, per decided position, with the same definitions as
the decoding bank:

* ``obs``: the state at every early exit point (the shadow state past the behaviour's exit),
  through :func:`greencode.decoding.policy_observation` and ``rl.observation_features`` computed as
  :func:`greencode.rl.build.record_batch` computes them (``prev_exit``: the previous position's
  behaviour exit; the first decided position's predecessor is a prompt position = the final layer);
* ``preds``: every exit point's greedy prediction on those states; column ``E`` (the final layer's
  prediction on the state the behaviour's history reached) is the label ``y``;
* ``l_opt``: the first exit point agreeing with ``y`` (E = the final layer), derived from ``preds``.

The differences, all from teacher forcing: the tokens fed are the file's own, not the behaviour's
choices, so a wrong exit changes the K/V later tokens attend to but never the tokens that follow;
``tokens`` holds the file's next token (what a teacher-forced loop emits), not the behaviour's
choice (which is ``preds[i, behaviour_exit[i]]``); a sequence is one window of a file (its context
grows from ``m`` to the window's length) rather than ``T`` tokens after a prefix of the file; the
random behaviour's draws come from a per-sequence generator of its own (the same distribution as
:class:`~greencode.decoding.RandomExit`, not the same draws). Controllers that carry state from one
token to the next (``per_row_state``: saturation, a policy with observation features) cannot be
simulated in parallel over positions and are refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from greencode.config import config_from_dict
from greencode.data.corpus import text_sep
from greencode.decoding import policy_observation
from greencode.decoding.controllers import CheapConfidenceExit, SaturationExit, feature_size, recorded_features
from greencode.rl.bank import BANK_FORMAT, MANIFEST, TrajectoryBank, bytes_per_token, manifest_head, replace_dir
from greencode.rl.policy import load_policy
from greencode.rl.reward import optimal_exit
from greencode.rl.sources import behaviour_specs, code_tokens, load_data, make_behaviour
from greencode.utils import set_seed, torch_threads, write_json

log = logging.getLogger(__name__)

# decide(k, layer, h, running) -> exit[B, T]: at early exit point k (0-based index into exit_layers;
# ``layer`` its 0-based decoder layer), for the raw states h [B, T, H], which of the ``running``
# positions [B, T] (decided positions that have not exited) exit there
Decider = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Simulation:
    """What :func:`simulate_exits` computes for a batch of windows."""

    states: torch.Tensor  # [B, T, E+1, H] raw states at every exit point, the final layer last (shadow past the exit)
    exit_point: torch.Tensor  # [B, T] int64: the exit point each position took (E: ran to the final layer)
    decided: torch.Tensor  # [B, T] bool: positions the behaviour decided (p >= min_context, p < length)


class _Capture:
    """A cache a layer writes its K/V into (kept for the shadow pass), nothing before them."""

    kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        self.kv = (key_states, value_states)
        return key_states, value_states


class _Prefixed:
    """A cache holding the real stream's K/V of every position; the shadow pass's own K/V come after
    them (the shadow mask lets position t see the real ones before t and its own at t)."""

    def __init__(self, kv: tuple[torch.Tensor, torch.Tensor]):
        self.keys, self.values = kv

    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        return torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)


def _causal_mask(t: int, dtype, device) -> torch.Tensor:
    """The additive causal mask [1, 1, T, T]."""
    idx = torch.arange(t, device=device)
    mask = torch.zeros((t, t), dtype=dtype, device=device).masked_fill(idx[None, :] > idx[:, None], torch.finfo(dtype).min)
    return mask[None, None]


@dataclass
class _Packed:
    """The exited positions of each row packed into ``S`` = the most any row has, in position order:
    (row, position, slot) of each, the slots' positions [B, S] and the shadow pass's mask
    [B, 1, S, T + S] (a slot sees the real K/V before its position and its own shadow K/V; an empty
    slot only its own, so nothing is all-masked)."""

    rows: torch.Tensor
    pos: torch.Tensor
    slot: torch.Tensor
    slot_pos: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, exited: torch.Tensor, dtype) -> "_Packed":
        b, t = exited.shape
        rows, pos = exited.nonzero(as_tuple=True)  # row-major: each row's positions in order
        slot = (exited.long().cumsum(1) - 1)[rows, pos]
        s = int(exited.sum(1).max())
        slot_pos = torch.zeros((b, s), dtype=torch.long, device=exited.device)
        slot_pos[rows, slot] = pos
        valid = torch.zeros((b, s), dtype=torch.bool, device=exited.device)
        valid[rows, slot] = True
        cols = torch.arange(t, device=exited.device)
        sees_real = (cols[None, None, :] < slot_pos[:, :, None]) & valid[:, :, None]  # [B, S, T]
        sees_own = torch.eye(s, dtype=torch.bool, device=exited.device).expand(b, s, s)
        allowed = torch.cat([sees_real, sees_own], dim=2)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=exited.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return cls(rows=rows, pos=pos, slot=slot, slot_pos=slot_pos, mask=mask[:, None])


def _run_layer(layer, h, mask, cache, kw) -> torch.Tensor:
    out = layer(h, attention_mask=mask, past_key_values=cache, use_cache=cache is not None, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def simulate_exits(model, input_ids: torch.Tensor, decide: Optional[Decider], min_context,
                   lengths: Optional[Sequence[int]] = None) -> Simulation:
    """Teacher-forced pass of ``input_ids`` [B, T] (right-padded to ``lengths``) with the exits
    ``decide`` takes simulated as the decoding loop's ``propagate`` strategy does (module docstring).
    ``min_context``: an int or one per row; positions before it are never decided (the prompt).
    ``decide=None``: the full model (no exits). Returns every exit point's raw state per position
    (the shadow state past the position's exit, as the loop's observe mode records), the exit point
    each position took and which positions were decided."""
    ids = input_ids.to(model.device)
    b, t = ids.shape
    device, dtype = ids.device, model.dtype
    adapter = model.adapter
    exits = list(model.exit_layers)
    points = {layer: k for k, layer in enumerate(model.exit_points)}
    e = len(exits)
    lengths_t = torch.full((b,), t, device=device) if lengths is None else torch.as_tensor(lengths, device=device)
    m = torch.as_tensor(min_context, device=device).reshape(-1).expand(b)
    pos = torch.arange(t, device=device)
    decided = (pos[None, :] >= m[:, None]) & (pos[None, :] < lengths_t[:, None])
    position_ids = pos[None, :].expand(b, t)
    h = adapter.embed(ids, position_ids)
    kw = adapter.layer_kwargs(h, position_ids)
    # sdpa's own causal path (no mask) where the model's attention has one; eager needs the mask
    real_mask = None if getattr(model.hf.config, "_attn_implementation", "eager") == "sdpa" else _causal_mask(t, dtype, device)
    exited = torch.zeros((b, t), dtype=torch.bool, device=device)
    exit_point = torch.full((b, t), e, dtype=torch.long, device=device)
    states = torch.empty((b, t, e + 1, h.shape[-1]), dtype=dtype, device=device)
    # the shadow stream [B, T, H]: None while no position has exited (it equals the real stream); only the
    # exited positions differ, and only they run the shadow pass (packed, with their own positions)
    shadow: Optional[torch.Tensor] = None
    packed: Optional[_Packed] = None
    packed_kw: dict = {}
    for j, layer in enumerate(adapter.layers):
        if shadow is None:
            h = _run_layer(layer, h, real_mask, None, kw)
        else:
            cap = _Capture()
            out = _run_layer(layer, h, real_mask, cap, kw)
            hs = shadow.new_zeros((b, packed.slot_pos.shape[1], shadow.shape[-1]))
            hs[packed.rows, packed.slot] = shadow[packed.rows, packed.pos]
            shadow_out = _run_layer(layer, hs, packed.mask, _Prefixed(cap.kv), packed_kw)
            h = torch.where(exited[..., None], h, out)  # an exited position's residual stream stays at its exit state
            shadow = h.clone()
            shadow[packed.rows, packed.pos] = shadow_out[packed.rows, packed.slot]
        k = points.get(j)
        if k is None:
            continue
        states[:, :, k] = h if shadow is None else shadow
        if k < e and decide is not None:
            running = decided & ~exited
            if bool(running.any()):
                now = decide(k, j, h, running).to(device).bool() & running
                if bool(now.any()):
                    if shadow is None:
                        shadow = h.clone()
                    exit_point[now] = k
                    exited |= now
                    packed = _Packed.of(exited, dtype)
                    packed_kw = adapter.layer_kwargs(shadow, packed.slot_pos)
    return Simulation(states=states, exit_point=exit_point, decided=decided)


# --------------------------------------------------------------------------- behaviours
def random_decider(rates: Sequence[float], seeds: Sequence[int], width: Optional[int] = None) -> Decider:
    """Each row exits at each exit point with its own rate (``RandomExit``'s behaviour), drawn from
    its own generator seeded with its seed. ``width`` (at least the batch's length; default: that
    length) draws are made per exit point, so with a fixed ``width`` a row's exits do not depend on
    the other rows of its batch."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rate = torch.tensor([float(r) for r in rates])

    def decide(k, layer, h, running):
        t = h.shape[1]
        n = t if width is None else width
        if n < t:
            raise ValueError(f"random_decider(width={width}) is narrower than the batch's {t} positions")
        u = torch.stack([torch.rand(n, generator=g)[:t] for g in gens])
        return (u < rate[:, None]).to(running.device) & running

    return decide


def pattern_decider(exit_point: torch.Tensor) -> Decider:
    """Exits given in advance: ``exit_point`` [B, T] holds each position's exit point (E or more: none)."""

    def decide(k, layer, h, running):
        return (exit_point.to(running.device) == k) & running

    return decide


def controller_decider(model, controllers: Sequence) -> Decider:
    """One exit controller per row, asked at the exit points it checks for the running positions
    (rows sharing a controller are asked together, as the loop asks them). Only controllers without
    state carried from token to token can decide all positions at once."""
    for c in controllers:
        if getattr(c, "per_row_state", False) or getattr(c, "runs_all_layers", False):
            raise ValueError(f"controller {c.describe() if hasattr(c, 'describe') else c!r} carries state from "
                             "token to token (or runs every layer), so its exits cannot be simulated in parallel "
                             "over positions; use rl.bank.source=decode for it")
    groups: dict[int, list[int]] = {}
    for r, c in enumerate(controllers):
        groups.setdefault(id(c), []).append(r)
    checks = {id(c): c.check_layers(model) for c in controllers}
    for c in controllers:
        c.reset()

    def decide(k, layer, h, running):
        out = torch.zeros_like(running)
        for rows in groups.values():
            ctrl = controllers[rows[0]]
            if layer not in checks[id(ctrl)]:
                continue
            sel = torch.zeros_like(running)
            sel[rows] = running[rows]
            if not bool(sel.any()):
                continue
            hs = h[sel][:, None]  # [n, 1, H]
            need = ctrl.needs_normed or ctrl.needs_logits
            normed = model.final_norm(hs) if need else None
            logits = model.adapter.lm_head(normed) if ctrl.needs_logits else None
            dec = ctrl.should_exit_rows(layer, hs, normed, logits)
            out[sel] = torch.as_tensor(dec, dtype=torch.bool, device=out.device).reshape(-1)
        return out

    return decide


# --------------------------------------------------------------------------- the bank
@torch.inference_mode()
def record_simulation(model, sim: Simulation, input_ids: torch.Tensor, observation: str,
                      features: Sequence[str] = (), candidates: Optional[dict] = None
                      ) -> list[Optional[dict[str, np.ndarray]]]:
    """Per row, the bank's arrays for its decided positions ``p`` with a next token (``p + 1`` inside
    the row): ``obs`` [n, E, H'] (float32, :func:`policy_observation` + features), ``preds``
    [n, E+1], ``tokens`` [n] (the file's next token), ``behaviour_exit`` [n]; None for a row with
    none. ``candidates``: ``{"source", "k"}`` of the cand_* features (``RLConfig.candidates()``)."""
    out: list[Optional[dict[str, np.ndarray]]] = []
    e = len(model.exit_layers)
    ids = input_ids.to(sim.states.device)
    for r in range(ids.shape[0]):
        keep = sim.decided[r].clone()
        last = int(keep.nonzero().max()) if bool(keep.any()) else -1
        if last >= 0:
            keep[last] = False  # the last position's next token is outside the window
        where = keep.nonzero().flatten()
        if where.numel() == 0:
            out.append(None)
            continue
        states = sim.states[r, where]  # [n, E+1, H]
        preds = model.decode(states).argmax(-1)
        behaviour = sim.exit_point[r, where].cpu().numpy().astype(np.int16)
        obs = policy_observation(model, states[:, :e], observation)
        if features:
            # the predecessor of the first decided position: a prompt position (never exits) = final
            prev_p = (where - 1).clamp(min=0)
            prev = torch.where(sim.decided[r, prev_p], sim.exit_point[r, prev_p], torch.full_like(prev_p, e))
            obs = torch.cat([obs.cpu(), recorded_features(model, states[:, :e], prev.cpu(), features,
                                                          **(candidates or {}))], dim=-1)
        out.append({"obs": obs.float().cpu().numpy(), "preds": preds.cpu().numpy().astype(np.int32),
                    "tokens": ids[r, where + 1].cpu().numpy().astype(np.int32), "behaviour_exit": behaviour,
                    "positions": where.cpu().numpy().astype(np.int32)})
    return out


def plan_windows(cfg, tokenizer, records, rng: np.random.Generator, window: int) -> list[tuple[int, int, list[int]]]:
    """One window per record (records in a seeded order, up to what ``rl.bank.decision_tokens``
    needs): bos + the record's text ids from a uniformly drawn start, ``window`` ids at most.
    Records too short for ``min_context_tokens + 2`` ids are skipped. Returns (record index, start
    in the text ids, window ids)."""
    bc = cfg.rl.bank
    sep = text_sep(cfg)
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    need = simulated_size(cfg)
    plan, planned = [], 0
    for idx in rng.permutation(len(records)):
        if planned >= need:
            break
        body = code_tokens(records[int(idx)])
        if len(body) < 2:
            continue
        text_ids = tokenizer(sep.join(body), add_special_tokens=False)["input_ids"]
        room = window - len(head)
        start = int(rng.integers(0, max(len(text_ids) - room, 0) + 1))
        ids = head + text_ids[start:start + room]
        if len(ids) < bc.min_context_tokens + 2:
            continue
        plan.append((int(idx), start, ids))
        planned += len(ids) - 1 - bc.min_context_tokens
    return plan


def simulated_size(cfg) -> int:
    """The simulated bank's size in decided tokens: ``rl.bank.decision_tokens`` (null: the decoding
    bank's ``num_sequences x tokens_per_sequence``), capped by ``rl.bank.max_tokens``."""
    bc = cfg.rl.bank
    n = bc.decision_tokens if bc.decision_tokens is not None else bc.num_sequences * bc.tokens_per_sequence
    return int(min(n, bc.max_tokens) if bc.max_tokens is not None else n)


def _decider_for(cfg, model, specs: list[dict], policy, width: int) -> Optional[Decider]:
    kinds = {s["kind"] for s in specs}
    if kinds == {"full"}:
        return None
    if kinds == {"random"}:
        return random_decider([s["rate"] for s in specs], [s["seed"] for s in specs], width)
    return controller_decider(model, [make_behaviour(s, cfg, model, policy) for s in specs])


def _describe(spec: dict) -> dict:
    if spec["kind"] == "full":
        return {"controller": "never"}
    if spec["kind"] == "random":
        return {"controller": "random", "rate": round(spec["rate"], 4), "seed": spec["seed"]}
    return {"controller": "policy", "threshold": spec["threshold"]}


@dataclass
class _Plan:
    """What a simulated bank is built from: the windows, one behaviour spec per window, the policy a
    ``policy`` behaviour needs, the window length, the decided tokens asked for and the seeded generator
    (drawn again for the held-out sequences)."""

    plan: list
    specs: list
    policy: object
    window: int
    target: int
    rng: np.random.Generator


def _plan(cfg, model, tokenizer, dataset) -> _Plan:
    bc = cfg.rl.bank
    tokenizer, records = load_data(cfg, tokenizer, dataset)
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    limit = getattr(model.hf.config, "max_position_embeddings", None) or 1 << 30
    window = max(bc.min_context_tokens + 2, min(bc.max_context_tokens, limit))
    plan = plan_windows(cfg, tokenizer, records, rng, window)
    if not plan:
        raise ValueError(f"no file of the {bc.split!r} split has the {bc.min_context_tokens + 2} tokens a window needs "
                         f"(rl.bank.min_context_tokens + 2); use a larger corpus, another rl.bank.split or a smaller "
                         "rl.bank.min_context_tokens")
    specs = behaviour_specs(cfg, np.random.default_rng([cfg.seed, 1]), len(plan))
    policy = load_policy(bc.policy_path, model) if any(s["kind"] == "policy" for s in specs) else None
    return _Plan(plan, specs, policy, window, simulated_size(cfg), rng)


def _start_partial(tmp: Path, shard_dir: Path, key: dict, shape: tuple) -> dict:
    """The build's progress in the partial folder ``tmp``: resumed when it holds the same key, else a fresh
    start (an empty memory-mapped ``obs.npy`` of ``shape``; the worker processes' batches of the same key kept)."""
    from numpy.lib.format import open_memmap

    done = _resume_state(tmp, key, shape)
    if done is not None:
        log.info("resuming the simulated bank at %s: %d of %d decided tokens done", tmp, done["total"], shape[0])
        return done
    keep = _shards_match(shard_dir, key)
    for child in list(tmp.iterdir()) if tmp.is_dir() else []:
        if not (keep and child == shard_dir):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    open_memmap(tmp / "obs.npy", mode="w+", dtype=np.float16, shape=shape).flush()
    return {"next": 0, "total": 0, "preds": [], "tokens": [], "behaviour": [], "lengths": [], "seqs": []}


class _Collected:
    """The bank's rows so far: observations written into the memory-mapped ``obs.npy``, the other arrays
    and the sequences' descriptions held until the end; :meth:`add` takes one batch's records up to the
    target, :meth:`save` checkpoints."""

    def __init__(self, tmp: Path, done: dict, shape: tuple):
        self.tmp, self.shape, self.target = tmp, shape, shape[0]
        self.obs = np.load(tmp / "obs.npy", mmap_mode="r+")
        self.preds, self.tokens, self.behaviour, self.lengths, self.seqs = (
            done[k] for k in ("preds", "tokens", "behaviour", "lengths", "seqs"))
        self.total = done["total"]

    def add(self, batch, bspecs, recs, bar) -> None:
        for (idx, first, w), spec, rec in zip(batch, bspecs, recs):
            if rec is None or self.total >= self.target:
                continue
            n = min(len(rec["tokens"]), self.target - self.total)
            o16 = rec["obs"][:n].astype(np.float16)
            if not np.isfinite(o16).all():
                raise ValueError("some observations overflow float16 (|value| > 65504); use rl.observation=normed")
            self.obs[self.total:self.total + n] = o16
            self.preds.append(rec["preds"][:n])
            self.tokens.append(rec["tokens"][:n])
            self.behaviour.append(rec["behaviour_exit"][:n])
            self.lengths.append(n)
            self.seqs.append({"record": idx, "start": first, "window_tokens": len(w),
                              "first_position": int(rec["positions"][0]), "behaviour": _describe(spec)})
            self.total += n
            bar.update(n)

    def save(self, key: dict, next_start: int) -> None:
        self.obs.flush()
        _save_state(self.tmp, key, self.shape, next_start, self.total, self.preds, self.tokens, self.behaviour,
                    self.lengths, self.seqs)

    def close(self) -> None:
        """Flush the observations and, short of the target, shrink ``obs.npy`` to the rows written."""
        from numpy.lib.format import open_memmap

        self.obs.flush()
        self.obs = None
        total, tmp = self.total, self.tmp
        if total < self.target:
            full = np.load(tmp / "obs.npy", mmap_mode="r")
            small = open_memmap(tmp / "obs.part.npy", mode="w+", dtype=np.float16, shape=(total, *self.shape[1:]))
            for a in range(0, total, 65536):
                b = min(a + 65536, total)
                small[a:b] = full[a:b]
            small.flush()
            del small, full
            (tmp / "obs.part.npy").replace(tmp / "obs.npy")


def _simulate_all(cfg, model, p: _Plan, got: _Collected, done: dict, shard_dir: Path, key: dict) -> None:
    """Every batch the bank needs, in order, through :func:`simulate_exits` (or from the worker processes'
    files with ``rl.bank.workers`` > 1), checkpointing every ``CHECKPOINT_S`` seconds."""
    from tqdm.auto import tqdm

    bc = cfg.rl.bank
    threads = cfg.hardware.num_threads or (1 if model.device.type == "cpu" else torch.get_num_threads())
    saved_at = time.perf_counter()
    bar = tqdm(total=p.target, initial=got.total, desc="simulated bank", unit="tok")
    starts = _needed_batches(p.plan, done["next"], done["total"], p.target, bc.batch_size, bc.min_context_tokens)
    workers = min(int(bc.workers), len(starts)) if model.device.type == "cpu" else 1
    if workers > 1:
        _run_shards(cfg, model, p.plan, p.specs, starts, shard_dir, workers, p.window, key)
    with torch_threads(threads):
        for start in range(done["next"], len(p.plan), bc.batch_size):
            if got.total >= p.target:
                break
            if time.perf_counter() - saved_at > CHECKPOINT_S:
                got.save(key, start)
                saved_at = time.perf_counter()
            batch = p.plan[start:start + bc.batch_size]
            bspecs = p.specs[start:start + bc.batch_size]
            if workers > 1:
                recs = _load_batch(shard_dir, start)
            else:
                recs = _simulate_batch(cfg, model, batch, bspecs, p.policy, p.window)
            got.add(batch, bspecs, recs, bar)
    bar.close()


def _write_arrays(cfg, model, key: dict, p: _Plan, got: _Collected, seconds: float) -> dict:
    """The bank's arrays (held-out sequences drawn per window) and its manifest, into the partial folder."""
    bc, tmp, total = cfg.rl.bank, got.tmp, got.total
    e, hsz = got.shape[1:]
    preds_a = np.concatenate(got.preds)
    n_seq = len(got.lengths)
    n_held = min(int(round(bc.heldout_fraction * n_seq)), n_seq - 1)
    heldout = np.zeros(n_seq, dtype=bool)
    heldout[p.rng.permutation(n_seq)[:n_held]] = True
    arrays = {"preds": preds_a, "l_opt": optimal_exit(preds_a).astype(np.int16),
              "tokens": np.concatenate(got.tokens).astype(np.int32),
              "offsets": np.concatenate([[0], np.cumsum(got.lengths)]).astype(np.int64), "heldout": heldout,
              "behaviour_exit": np.concatenate(got.behaviour).astype(np.int16)}
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
    behaviour_all = arrays["behaviour_exit"]
    manifest = {
        "format": BANK_FORMAT,
        "source": "simulate",
        **manifest_head(cfg, model, key, bc),
        "teacher_forced": True,
        "window_tokens": p.window,
        "sequences": got.seqs,
        "behaviour_early_exit_share": float(np.mean(behaviour_all < e)),
        "exit_point_share": (np.bincount(behaviour_all.astype(np.int64), minlength=e + 1) / total).tolist(),
        "next_token_accuracy_final": float(np.mean(preds_a[:, -1] == arrays["tokens"])),
        "build_seconds": round(seconds, 1),
        "tokens_per_s": round(total / max(seconds, 1e-9), 1),
        "num_tokens": int(total),
        "num_sequences": n_seq,
        "n_exit_points": e,
        "hidden_size": hsz,
        "bytes_per_token": bytes_per_token(e, hsz),
        "size_bytes": int(sum((tmp / f"{a}.npy").stat().st_size for a in ("obs", *arrays))),
        "note": "teacher-forced windows with the behaviour's exits simulated (greencode.rl.simulate): obs "
                "float16 [N, E, H] at the early exit points (final excluded) of the states the behaviour's "
                "history reached (past its exit: the shadow climb, as the decoding bank's observe mode); "
                "preds [N, E+1] (column E = the final layer's prediction on that state, the label); l_opt [N] "
                "exit-point index (E = final layer); tokens [N] the file's next token (teacher forced); "
                "behaviour_exit [N] the behaviour's exit point; positions before rl.bank.min_context_tokens "
                "are the prompt (never decided); 0-based layers",
    }
    write_json(tmp / MANIFEST, manifest)
    return manifest


def build_simulated_bank(cfg, model, path: Path, key: dict, tokenizer=None, dataset=None) -> Path:
    """Build the bank of ``cfg`` (``rl.bank.source: simulate``) at ``path``: windows of
    ``rl.bank.split`` files (:func:`plan_windows`), ``rl.bank.batch_size`` at a time through
    :func:`simulate_exits` with the behaviour of ``rl.bank.behaviour`` (one spec per window, as the
    decoding bank draws them), until ``rl.bank.decision_tokens`` decided tokens (one torch thread on CPU
    unless ``hardware.num_threads`` says otherwise). With ``rl.bank.workers`` > 1 on CPU the batches the
    bank needs (known in advance: a window of ``n`` ids decides ``n - 1 - min_context_tokens`` tokens) are
    dealt out to that many fresh one-thread processes, which write each batch's records to a file; this
    process then assembles them in batch order, so the bank is the one-process bank, bit for bit (tested).
    Launcher ranks are the decoding bank's only. The observations
    are written straight into a memory-mapped ``obs.npy`` (a 400k-token bank is about 1.4 GB on the
    default), in the same on-disk format as the decoding bank, atomically (temporary folder, then
    rename). Each window is one sequence of the bank; ``heldout`` is drawn per window, and a file
    gives one window, so held-out sequences are held-out files. A split with fewer decided tokens than
    asked gives a smaller bank (with a warning)."""
    bc = cfg.rl.bank
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("rl.bank.source=simulate builds the bank in one process; run scripts/build_bank.py without "
                         "torchrun / accelerate launch (or use rl.bank.source=decode, which shards over the ranks)")
    t0 = time.perf_counter()
    p = _plan(cfg, model, tokenizer, dataset)
    shape = (p.target, len(model.exit_layers),
             model.hidden_size + feature_size(cfg.rl.observation_features, len(model.exit_layers)))
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the build checkpoints into a partial folder beside the bank (every CHECKPOINT_S seconds), so a build cut
    # off (a session's end, a crash) resumes where it stopped when run again with the same key
    tmp = path.with_name(f".{path.name}.partial")
    shard_dir = tmp / "batches"  # the worker processes' finished batches (rl.bank.workers > 1)
    try:
        done = _start_partial(tmp, shard_dir, key, shape)
        got = _Collected(tmp, done, shape)
        _simulate_all(cfg, model, p, got, done, shard_dir, key)
        if got.total < p.target:
            log.warning("the %r split gave only %d of the %d decided tokens asked for (rl.bank.decision_tokens)",
                        bc.split, got.total, p.target)
        got.close()
        (tmp / PROGRESS).unlink(missing_ok=True)
        shutil.rmtree(shard_dir, ignore_errors=True)
        seconds = time.perf_counter() - t0
        manifest = _write_arrays(cfg, model, key, p, got, seconds)
        # the same checks as any bank load (shapes, offsets, l_opt from preds), before it takes the place
        TrajectoryBank.load(tmp, model, observation=cfg.rl.observation, mmap=True)
        replace_dir(tmp, path)
    except BaseException:
        if not (tmp / PROGRESS).is_file() and not any(shard_dir.glob("*.npz")):  # nothing to resume from
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("simulated trajectory bank: %d windows, %d decided tokens, %d exit points, %.1f MB at %s in %.0f s "
             "(%.0f tokens/s); behaviour exited early on %.1f%% of tokens", manifest["num_sequences"], got.total,
             shape[1], manifest["size_bytes"] / 1e6, path, seconds, got.total / max(seconds, 1e-9),
             100 * manifest["behaviour_early_exit_share"])
    return path


def _simulate_batch(cfg, model, batch, bspecs, policy, window: int) -> list[Optional[dict[str, np.ndarray]]]:
    """One batch of windows through :func:`simulate_exits` and :func:`record_simulation`."""
    width = max(len(ids) for _, _, ids in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (_, _, w) in enumerate(batch):
        ids[r, :len(w)] = torch.tensor(w, dtype=torch.long)
    sim = simulate_exits(model, ids, _decider_for(cfg, model, bspecs, policy, window), cfg.rl.bank.min_context_tokens,
                         lengths=[len(w) for _, _, w in batch])
    return record_simulation(model, sim, ids, cfg.rl.observation, cfg.rl.observation_features, cfg.rl.candidates())


def _needed_batches(plan, first: int, total: int, target: int, batch_size: int, min_context: int) -> list[int]:
    """The start indices of the batches from ``first`` on that the bank still needs to reach ``target``
    decided tokens (``total`` done): a window of ``n`` ids decides ``n - 1 - min_context`` tokens."""
    starts = []
    for start in range(first, len(plan), batch_size):
        if total >= target:
            break
        starts.append(start)
        total += sum(max(0, len(w) - 1 - min_context) for _, _, w in plan[start:start + batch_size])
    return starts


_REC_KEYS = ("obs", "preds", "tokens", "behaviour_exit", "positions")


def _batch_file(shard_dir: Path, start: int) -> Path:
    return shard_dir / f"{start:08d}.npz"


def _load_batch(shard_dir: Path, start: int) -> list[Optional[dict[str, np.ndarray]]]:
    path = _batch_file(shard_dir, start)
    with np.load(path, allow_pickle=False) as z:
        rows = int(z["rows"])
        recs = [None if not bool(z[f"{r}_present"]) else {k: z[f"{r}_{k}"] for k in _REC_KEYS} for r in range(rows)]
    path.unlink()
    return recs


def _shard_worker(model, cfg_dict: dict, plan, specs, starts: list[int], shard_dir: str, window: int) -> int:
    """One process of a sharded simulated bank: its batches, one torch thread, each written to its own file
    (a temporary name, then renamed: a file is whole or absent, so a cut-off build redoes only what is missing)."""
    cfg = config_from_dict(cfg_dict)
    policy = None
    if any(s["kind"] == "policy" for s in specs):
        policy = load_policy(cfg.rl.bank.policy_path, model)
    model.eval()
    bs = cfg.rl.bank.batch_size
    with torch_threads(1), torch.inference_mode():
        for start in starts:
            recs = _simulate_batch(cfg, model, plan[start:start + bs], specs[start:start + bs], policy, window)
            arrays = {"rows": np.array(len(recs))}
            for r, rec in enumerate(recs):
                arrays[f"{r}_present"] = np.array(rec is not None)
                for k in _REC_KEYS if rec is not None else ():
                    arrays[f"{r}_{k}"] = rec[k].astype(np.float16) if k == "obs" else rec[k]
            part = Path(shard_dir) / f".{start:08d}.part.npz"
            np.savez(part, **arrays)
            part.replace(_batch_file(Path(shard_dir), start))
    return len(starts)


def _shards_match(shard_dir: Path, key: dict) -> bool:
    """Whether ``shard_dir`` holds batches of a build with this key."""
    try:
        return json.loads((shard_dir / "key.json").read_text(encoding="utf-8")) == json.loads(
            json.dumps(key, sort_keys=True, default=str))
    except (OSError, ValueError):
        return False


def _run_shards(cfg, model, plan, specs, starts: list[int], shard_dir: Path, workers: int, window: int,
                key: dict) -> None:
    """The batches ``starts`` not on disk yet, dealt out in turn to ``workers`` fresh processes."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / "key.json").write_text(json.dumps(key, sort_keys=True, default=str), encoding="utf-8")
    todo = [s for s in starts if not _batch_file(shard_dir, s).is_file()]
    log.info("simulated bank: %d batches (%d on disk already) on %d processes", len(starts), len(starts) - len(todo),
             workers)
    if not todo:
        return
    from tqdm.auto import tqdm

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool, \
            tqdm(total=len(starts), initial=len(starts) - len(todo), desc="simulated bank (batches)",
                 unit="batch") as bar:
        futures = [pool.submit(_shard_worker, model, cfg.to_dict(), plan, specs, todo[k::workers], str(shard_dir),
                               window) for k in range(workers)]
        while futures:
            finished, pending = cf.wait(futures, timeout=2.0)
            for f in finished:
                f.result()  # a worker's error, raised here
            futures = list(pending)
            bar.update(sum(_batch_file(shard_dir, s).is_file() for s in starts) - bar.n)


PROGRESS = "progress.npz"
CHECKPOINT_S = 120.0  # seconds between a simulated bank's checkpoints


def _save_state(tmp: Path, key: dict, shape, next_start: int, total: int, preds, tokens, behaviour, lengths,
                seqs) -> None:
    """Checkpoint a simulated bank's build (the observations are already in the memory-mapped obs.npy):
    written to a temporary file, then renamed, so a checkpoint is whole or absent."""
    import json

    part = tmp / "progress.tmp.npz"
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    with open(part, "wb") as f:
        np.savez(f, preds=np.concatenate(preds) if preds else np.zeros((0, shape[1] + 1), np.int32),
                 tokens=cat(tokens, np.int32), behaviour=cat(behaviour, np.int16),
                 lengths=np.asarray(lengths, np.int64),
                 meta=np.frombuffer(json.dumps({"key": key, "shape": list(shape), "next": int(next_start),
                                                "total": int(total), "seqs": seqs}, default=str).encode(), np.uint8))
    part.replace(tmp / PROGRESS)


def _resume_state(tmp: Path, key: dict, shape) -> Optional[dict]:
    """The checkpointed state of a build with the same key and shape at ``tmp``, else None."""
    import json

    f = tmp / PROGRESS
    if not f.is_file() or not (tmp / "obs.npy").is_file():
        return None
    try:
        with np.load(f) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta["key"] != json.loads(json.dumps(key, default=str)) or meta["shape"] != list(shape):
                return None
            lengths = [int(n) for n in z["lengths"]]
            cuts = np.cumsum([0] + lengths)
            split = (lambda a: [a[cuts[i]:cuts[i + 1]] for i in range(len(lengths))])
            return {"next": meta["next"], "total": meta["total"], "seqs": meta["seqs"], "lengths": lengths,
                    "preds": split(z["preds"]), "tokens": split(z["tokens"]), "behaviour": split(z["behaviour"])}
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- token consistency
@dataclass
class ForcedRow:
    """One row of :func:`simulate_forced`: what the decoding loop's teacher-forced row
    (``generate(..., forced_tokens=...)``) returns for the same prompt, controller and fed tokens."""

    own_tokens: list[int]  # the row's own choice at each of the N positions (the first: the full model's prefill)
    exit_layers: list[int]  # the 0-based layer each choice was made at (the first: the final layer)
    counters: dict  # the loop's counters: decode_steps, layers_run, kv_propagated_layers, lm_head_calls, ...


def token_local(controller) -> bool:
    """Whether ``controller``'s decision for a token depends on that token's own states only (no
    state carried from one token to the next), so its exits can be simulated at every position at
    once: stateless controllers, and those whose state lives within a token (saturation's previous
    exit point, the cheap candidates of ``first_full``, a policy's features other than
    ``prev_exit``). A controller may say so itself with a ``token_local`` attribute."""
    flag = getattr(controller, "token_local", None)
    if flag is not None:
        return bool(flag)
    if getattr(controller, "runs_all_layers", False):
        return False
    if not getattr(controller, "per_row_state", False):
        return True
    features = getattr(controller, "features", None)
    if features is not None:
        return "prev_exit" not in features

    return isinstance(controller, (SaturationExit, CheapConfidenceExit))


def _own_copy(controller, model):
    """A fresh instance for one token of a controller with per-token state (the model and a policy shared)."""
    import copy

    memo = {id(model): model}
    policy = getattr(controller, "policy", None)
    if policy is not None:
        memo[id(policy)] = policy
    c = copy.deepcopy(controller, memo)
    c.reset()
    c.check_layers(model)
    return c


# controller -> (model, its describe(), its per-position copies): the pass runs sample after sample with the
# same controllers, so their copies are made once and reset for each sample (a fifth of the pass's time before)
_POSITION_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _position_copies(controller, model, n: int) -> list:
    """``n`` instances of ``controller`` (per-token state), one per continuation position, each reset: made by
    :func:`_own_copy` the first time, reused while the controller, its model and its settings are the same."""
    held = _POSITION_COPIES.get(controller)
    desc = controller.describe()
    if held is None or held[0] is not model or held[1] != desc:
        held = (model, desc, [])
        _POSITION_COPIES[controller] = held
    copies = held[2]
    while len(copies) < n:
        copies.append(_own_copy(controller, model))
    for c in copies[:n]:
        c.reset()
    return copies[:n]


def _prefill(model, prompt: Sequence[int], eager: bool) -> tuple[list, int]:
    """The full model over the prompt: every layer's K/V and the first token (the head on the last state)."""
    adapter, dev = model.adapter, model.device
    p_len = len(prompt)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    pos = torch.arange(p_len, device=dev)[None]
    h = adapter.embed(ids, pos)
    kw = adapter.layer_kwargs(h, pos)
    mask = _causal_mask(p_len, model.dtype, dev) if eager else None
    prefix = []
    for layer in adapter.layers:
        cap = _Capture()
        h = _run_layer(layer, h, mask, cap, kw)
        prefix.append(cap.kv)
    return prefix, int(model.decode(h[:, -1:]).argmax(-1))


class _ForcedPass:
    """The continuation of :func:`simulate_forced`: ``rows`` copies of ``forced[:-1]`` (one per controller, and
    the oracle's full-model stream last) run layer by layer over the prompt's K/V, each position keeping its
    exit state once its row's controller exits it."""

    def __init__(self, model, controllers: Sequence, prefix: list, p_len: int, cont: Sequence[int], rows: int,
                 counters: list[dict]):
        adapter, dev, dtype = model.adapter, model.device, model.dtype
        self.model, self.controllers, self.prefix, self.rows, self.counters = model, controllers, prefix, rows, counters
        t = self.t = len(cont)
        ids = torch.tensor([list(cont)], dtype=torch.long, device=dev).expand(rows, t)
        self.cpos = (p_len + torch.arange(t, device=dev))[None].expand(rows, t)
        self.h = adapter.embed(ids, self.cpos)
        self.kw_of = {rows: adapter.layer_kwargs(self.h, self.cpos)}  # the layers' kwargs for the first n rows
        allowed = torch.cat([torch.ones((t, p_len), dtype=torch.bool, device=dev),
                             torch.ones((t, t), dtype=torch.bool, device=dev).tril()], dim=1)
        self.mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(
            ~allowed, torch.finfo(dtype).min)[None, None]
        self.exited = torch.zeros((rows, t), dtype=torch.bool, device=dev)
        self.exit_layer = torch.full((rows, t), model.final_layer, dtype=torch.long, device=dev)
        self.from_logits = torch.zeros((rows, t), dtype=torch.bool, device=dev)  # the choice reuses the check's head
        self.checks = [c.check_layers(model) for c in controllers]
        self.groups: dict[int, list[int]] = {}  # rows holding the same instance decide together
        for r, c in enumerate(controllers):
            self.groups.setdefault(id(c), []).append(r)
        self.own: dict[tuple[int, int], object] = {}  # (row, position) -> its instance (per-token state)
        for r, c in enumerate(controllers):
            if getattr(c, "per_row_state", False):
                self.own.update(((r, p), x) for p, x in enumerate(_position_copies(c, model, t)))
        self.live = torch.ones(rows, dtype=torch.bool, device=dev)  # rows with a position still running

    def run_layer(self, j: int, layer) -> bool:
        """Layer ``j`` on the rows with a position still running; False once no row has one (a row whose
        every position has exited runs no deeper layer: no query of it is left to read its K/V)."""
        nc = len(self.controllers)
        self.live[:nc] = ~self.exited[:nc].all(1)
        n = int(self.live.sum())
        if n == 0:
            return False
        h, rows = self.h, self.rows
        sub = h if n == rows else h[self.live]
        if n not in self.kw_of:
            self.kw_of[n] = self.model.adapter.layer_kwargs(sub, self.cpos[:n])
        kv = tuple(x.expand(n, *x.shape[1:]) for x in self.prefix[j])
        new = _run_layer(layer, sub, self.mask, _Prefixed(kv), self.kw_of[n])
        if n == rows:  # an exited position keeps its exit state (its K/V: propagated)
            self.h = torch.where(self.exited[..., None], h, new)
        else:
            self.h = h.clone()
            self.h[self.live] = torch.where(self.exited[self.live][..., None], h[self.live], new)
        return True

    def check(self, j: int) -> None:
        """Every group of rows whose controller checks at layer ``j`` decides its running positions."""
        model, dev = self.model, self.model.device
        for rs in self.groups.values():
            ctrl = self.controllers[rs[0]]
            if j not in self.checks[rs[0]]:
                continue
            where = (~self.exited[rs]).nonzero(as_tuple=False)  # the group's running (row, position)s
            if where.numel() == 0:
                continue
            head, macs = ctrl.logits_at(j), ctrl.check_macs(j)
            r_idx, p_idx = torch.tensor(rs, device=dev)[where[:, 0]], where[:, 1]
            hs = self.h[r_idx, p_idx][:, None]  # [n, 1, H]
            normed = model.final_norm(hs) if (ctrl.needs_normed or head) else None
            logits = model.adapter.lm_head(normed) if head else None
            if getattr(ctrl, "per_row_state", False):  # each position its own copy, decided together
                copies = [self.own[(r, p)] for r, p in zip(r_idx.tolist(), p_idx.tolist())]
                dec = copies[0].decide_rows(j, copies, hs, normed, logits)
            else:
                dec = ctrl.should_exit_rows(j, hs, normed, logits)
            dec = torch.as_tensor(dec, dtype=torch.bool, device=dev).reshape(-1)
            for r, n in zip(*torch.unique(r_idx, return_counts=True)):
                c = self.counters[int(r)]
                c["exit_checks"] += int(n)
                c["controller_macs"] += int(n) * int(macs)
                c["lm_head_calls"] += int(n) if head else 0
            if bool(dec.any()):
                self.exited[r_idx[dec], p_idx[dec]] = True
                self.exit_layer[r_idx[dec], p_idx[dec]] = j
                self.from_logits[r_idx[dec], p_idx[dec]] = head

    def finish(self, out: list[ForcedRow]) -> None:
        """Each controller's row: the head on each position's exit state, its exit layers and counters."""
        final = self.model.final_layer
        choice = self.model.decode(self.h[:len(self.controllers)]).argmax(-1)  # [rows, t]
        for r, o in enumerate(out):
            c, el = self.counters[r], self.exit_layer[r]
            c["decode_steps"] = self.t
            c["layers_run"] = int((el + 1).sum())
            c["kv_propagated_layers"] = int((final - el).sum())
            c["lm_head_calls"] += int((~self.from_logits[r]).sum())
            o.counters = c
            o.own_tokens += choice[r].tolist()
            o.exit_layers += el.tolist()


@torch.inference_mode()
def simulate_forced(model, prompt: Sequence[int], forced: Sequence[int], controllers: Sequence,
                    *, oracle: bool = False) -> tuple[list[ForcedRow], Optional[list[int]]]:
    """The teacher-forced decoding loop (``generate(model, prompt, controller, len(forced),
    forced_tokens=[forced])``, ``propagate`` K/V) for every controller in ``controllers`` at once,
    simulated layer by layer over the continuation's positions: the prompt is prefilled once by the
    full model (its K/V shared by every row, as the loop's prefill), then each row is fed
    ``forced[:-1]`` at positions ``len(prompt)...``, every position deciding at its controller's
    check layers. A position that exits keeps its exit state for the deeper layers, whose K/V it
    still fills from that state (the loop's ``propagate``); its own choice is the argmax of the head
    on its exit state. Per row: the own choices, the exit layers and the loop's counters (so
    :func:`greencode.decoding.compute_cost` prices it as the loop's row), equal to the loop's (tested).

    Rows holding the same controller instance decide together (a stateless controller, one
    vectorised check); a controller with per-token state (:func:`token_local`) gets one instance per
    position, and the positions still running are decided together (its ``decide_rows``, as the rows of a
    batch are). Controllers that carry state from token to token, or run every layer (the oracle),
    are refused. ``oracle``: also the oracle's exit point (index into ``model.exit_points``) at each
    continuation position, from the full model's stream (which the oracle's tokens follow)."""
    bad = [c for c in controllers if not token_local(c)]
    if bad:
        raise ValueError(f"controller {bad[0].describe()} carries state from token to token (or runs every layer); "
                         "its teacher-forced pass needs the decoding loop (generate(..., forced_tokens=...))")
    if not forced:
        raise ValueError("forced is empty; feed at least one token")
    final = model.final_layer
    eager = getattr(model.hf.config, "_attn_implementation", "eager") != "sdpa"
    prefix, first = _prefill(model, prompt, eager)
    base = {"decode_steps": 0, "layers_run": 0, "kv_propagated_layers": 0, "lm_head_calls": 1, "exit_checks": 0,
            "controller_macs": 0}
    out = [ForcedRow([first], [final], dict(base)) for _ in controllers]
    if len(forced) == 1:
        return out, ([] if oracle else None)
    # the continuation: every row fed forced[:-1] at positions len(prompt) .. len(prompt) + t - 1
    run = _ForcedPass(model, controllers, prefix, len(prompt), forced[:-1], len(controllers) + (1 if oracle else 0),
                      [dict(o.counters) for o in out])
    ask_at = set().union(*run.checks) if run.checks else set()
    exit_index = {layer: k for k, layer in enumerate(model.exit_points)}
    oracle_preds = []
    for j, layer in enumerate(model.adapter.layers):
        if not run.run_layer(j, layer):
            break
        if oracle and j in exit_index:
            oracle_preds.append(model.decode(run.h[-1]).argmax(-1))
        if j < final and j in ask_at:
            run.check(j)
    run.finish(out)
    oracle_exit = None
    if oracle:
        preds = torch.stack(oracle_preds, dim=1)  # [t, E + 1]
        agree = preds == preds[:, -1:]
        oracle_exit = agree.float().argmax(1).tolist()  # the first exit point agreeing with the final layer
    return out, oracle_exit
