"""The teacher-forced pass (token consistency): every loop method fed the full model's greedy
continuation of each sample, its own choice at each position compared with it.

Both the calibration stage (the ``token`` criterion on the validation split) and the evaluator
(the calibrated rows' token risk on the test split) run it; it builds on :mod:`greencode.eval.runner`
and :mod:`greencode.calibrated` and imports neither of its callers.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing as mp
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from greencode.calibrated import CRITERIA, TEACHER_FORCED_FILE, method_records
from greencode.config import Config, ConfigError, config_from_dict
from greencode.decoding import NeverExit, compute_cost, generate
from greencode.eval.methods import MethodSpec, needs, param_kind, parse_method_name
from greencode.eval.runner import Runner, load_inputs, load_samples, prompt_of
from greencode.paths import RunPaths
from greencode.provenance import weights_record
from greencode.rl.simulate import simulate_forced, token_local
from greencode.utils import setup_torch, write_json

log = logging.getLogger(__name__)


def _known_continuations(eval_dir: Path, full_tokens: Optional[dict[int, list[int]]]) -> dict[int, list[int]]:
    """The full model's continuations given, or (None) those of ``eval_dir/methods/full.json``."""
    if full_tokens is not None:
        return dict(full_tokens)
    full = method_records(eval_dir, "full")
    if full is None:
        raise FileNotFoundError(f"no full-model records in {eval_dir}/methods/full.json; the teacher-forced pass "
                                "feeds the full model's continuation, so evaluate method 'full' first")
    return {int(r["index"]): [int(t) for t in r["tokens"]] for r in full if r.get("tokens")}


def _decode_missing(cfg: Config, model, tok, prompts: dict, forced_of: dict) -> None:
    """The full model's continuations not decoded yet, into ``forced_of``: batched, sorted by length."""
    per_batch = max(1, int(cfg.eval.accuracy_batch_prompts))
    missing = sorted((i for i in prompts if i not in forced_of), key=lambda i: (len(prompts[i]), i))
    with torch.inference_mode():
        for start in tqdm(range(0, len(missing), 2 * per_batch), desc="full continuations", unit="batch",
                          disable=None if missing else True):
            chunk = missing[start:start + 2 * per_batch]
            res = generate(model, [prompts[i] for i in chunk], [NeverExit() for _ in chunk], cfg.eval.max_new_tokens,
                           eos_token_id=tok.eos_token_id, kv_strategy=cfg.decoding.kv_strategy)
            forced_of.update({i: r.tokens for i, r in zip(chunk, res)})


def _pass(cfg: Config, inputs, specs: list, method_ids: Sequence[str], prompts: dict, forced_of: dict,
          idx: list[int], oracle: bool, workers: int) -> dict:
    """The pass over the samples ``idx``: here, or with ``workers`` > 1 on that many fresh one-thread processes
    (the samples dealt out in turn), merged in sample order."""
    if workers <= 1:
        return _forced_pass(inputs, cfg, specs, prompts, forced_of, idx, oracle)
    log.info("teacher-forced pass: %d samples on %d processes", len(idx), workers)
    chunks = [idx[k::workers] for k in range(workers)]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_forced_worker, [cfg.to_dict()] * workers, [list(method_ids)] * workers,
                              [{i: forced_of[i] for i in c} for c in chunks], chunks, [oracle] * workers))
    return _merge(parts)


def teacher_forced(cfg: Config, eval_dir: Path, method_ids: Sequence[str], *,
                   full_tokens: Optional[dict[int, list[int]]] = None, oracle: bool = False) -> dict[str, dict[int, float]]:
    """Token consistency of loop methods: each is fed the full model's greedy continuation of each
    sample (``full_tokens``; None: ``eval_dir/methods/full.json``; samples with neither get theirs
    generated here, batched, so ``{}`` generates them all) and its own choice at each position is compared with it. One
    teacher-forced pass per sample for every candidate at once (:func:`greencode.rl.simulate.simulate_forced`:
    the prompt prefilled once, every controller's exits simulated over the continuation's positions,
    equal to the decoding loop's teacher-forced rows, tested); controllers that carry state from
    token to token go through the loop (``generate(..., forced_tokens=...)``). Returns and writes
    ``eval_dir/teacher_forced.json``: {method id: {sample index: share of positions that differ}},
    with each row's compute ratio and layers skipped per sample (``compute``, ``layers_skipped``)
    and, with ``oracle``, the oracle's hypothetical layers skipped on the same continuations. On CPU with
    ``eval.workers`` > 1 the samples are dealt out to that many fresh processes of one torch thread each
    (as the evaluator's accuracy-only samples), and the results merged in sample order."""
    t0 = time.perf_counter()
    forced_of = _known_continuations(eval_dir, full_tokens)
    paths = RunPaths.from_config(cfg)
    device, dtype = setup_torch(cfg.hardware)
    specs = _specs(method_ids)
    inputs = load_inputs(cfg, paths, device, dtype, need_base=False, need_policy=any(needs(s.family) for s in specs))
    samples = load_samples(cfg, inputs.tokenizer)
    model = inputs.model
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    prompts = {i: prompt_of(samples[i], limit, cfg.eval.max_new_tokens) for i in range(len(samples))}
    _decode_missing(cfg, model, inputs.tokenizer, prompts, forced_of)
    if cfg.decoding.kv_strategy != "propagate":
        raise ConfigError(f"decoding.kv_strategy={cfg.decoding.kv_strategy!r}: the teacher-forced simulation "
                          "propagates K/V from the exit state (the default strategy); use propagate")
    idx = [i for i in range(len(samples)) if forced_of.get(i)]
    workers = max(1, min(int(cfg.eval.workers), len(idx))) if device.type == "cpu" else 1
    passed = _pass(cfg, inputs, specs, method_ids, prompts, forced_of, idx, oracle, workers)
    specs = [s for s in specs if s.id in passed["methods"]]
    out, compute, skipped, oracle_skip = (passed[k] for k in ("methods", "compute", "layers_skipped", "oracle"))
    fast, slow = passed["simulated"], passed["loop"]
    seconds = time.perf_counter() - t0
    write_json(eval_dir / TEACHER_FORCED_FILE, {
        "format": "greencode-teacher-forced/2", "split": cfg.eval.split, "what": CRITERIA["token"],
        "how": "one teacher-forced pass per sample: the prompt prefilled once, every candidate's exits simulated over "
               "the full model's continuation (greencode.rl.simulate.simulate_forced, equal to the decoding loop's "
               "teacher-forced rows); controllers with state across tokens through the loop",
        "simulated": fast, "loop": slow,
        "num_samples": len(idx), "seconds": round(seconds, 1), "processes": workers,
        "methods": out, "compute": compute, "layers_skipped": skipped,
        "oracle_layers_skipped": oracle_skip if oracle else None, "weights": weights_record(model)})
    log.info("teacher-forced pass: %d samples x %d methods (%d simulated) in %.0f s", len(idx), len(specs), len(fast),
             seconds)
    return out


def _specs(method_ids: Sequence[str]) -> list[MethodSpec]:
    """The loop methods of ``method_ids`` the pass can feed (not HF rows, lossless rows, full or oracle)."""
    specs = []
    for mid in method_ids:
        fam, param = parse_method_name(mid)
        spec = MethodSpec(fam, param)
        if spec.runs_hf or spec.lossless or param_kind(fam) is None:  # HF rows, lossless rows, full, oracle
            continue
        specs.append(spec)
    return specs


def _forced_pass(inputs, cfg: Config, specs: Sequence[MethodSpec], prompts: dict, forced_of: dict,
                 idx: Sequence[int], oracle: bool) -> dict:
    """The pass over samples ``idx`` in this process: per method id and sample, the share of positions that
    differ, the compute ratio and the layers skipped; the oracle's layers skipped; which methods were simulated
    and which went through the loop."""
    model, tok = inputs.model, inputs.tokenizer
    runner = Runner(inputs, cfg, None, tok.eos_token_id, tok.pad_token_id)
    specs = [s for s in specs if all(getattr(inputs, n) is not None for n in needs(s.family))]
    ctrls = [runner.controller(s) for s in specs]
    max_new = cfg.eval.max_new_tokens
    per_batch = max(1, int(cfg.eval.accuracy_batch_prompts))
    fast = [k for k, c in enumerate(ctrls) if token_local(c)]
    slow = [k for k in range(len(ctrls)) if k not in fast]
    out: dict[str, dict[int, float]] = {s.id: {} for s in specs}
    compute: dict[str, dict[int, Optional[float]]] = {s.id: {} for s in specs}
    skipped: dict[str, dict[int, Optional[float]]] = {s.id: {} for s in specs}
    oracle_skip: dict[int, float] = {}

    def keep(i, k, res):
        f = forced_of[i]
        spec = specs[k]
        out[spec.id][i] = sum(a != b for a, b in zip(res.own_tokens, f)) / len(f)
        cost = compute_cost(model, [res], ctrls[k])
        compute[spec.id][i] = cost["compute_ratio"]
        skipped[spec.id][i] = cost["layers_skipped_share"]

    with torch.inference_mode():
        for i in tqdm(idx if fast or oracle else [], desc="teacher-forced (simulated)", unit="sample", disable=None):
            rows, oex = simulate_forced(model, prompts[i], forced_of[i], [ctrls[k] for k in fast], oracle=oracle)
            for k, res in zip(fast, rows):
                keep(i, k, res)
            if oracle and oex:
                layers = [model.exit_points[e] for e in oex]
                oracle_skip[i] = 1.0 - sum(x + 1 for x in layers) / (len(layers) * model.num_layers)
        for start in tqdm(range(0, len(idx), per_batch) if slow else [], desc="teacher-forced (loop)", unit="batch",
                          disable=None):
            chunk = idx[start:start + per_batch]
            rows = [(i, k) for i in chunk for k in slow]
            res = generate(model, [prompts[i] for i, _ in rows], [ctrls[k] for _, k in rows], max_new,
                           eos_token_id=tok.eos_token_id, kv_strategy=cfg.decoding.kv_strategy,
                           forced_tokens=[forced_of[i] for i, _ in rows])
            for (i, k), r in zip(rows, res):
                keep(i, k, r)
    return {"methods": out, "compute": compute, "layers_skipped": skipped, "oracle": oracle_skip,
            "simulated": [specs[k].id for k in fast], "loop": [specs[k].id for k in slow]}


def _forced_worker(cfg_dict: dict, method_ids: list[str], forced_of: dict, idx: list[int], oracle: bool) -> dict:
    """One process of the sharded pass: one torch thread, its own model, samples ``idx``."""
    cfg = config_from_dict(cfg_dict)
    cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, num_threads=1))
    device, dtype = setup_torch(cfg.hardware)
    specs = _specs(method_ids)
    inputs = load_inputs(cfg, RunPaths.from_config(cfg), device, dtype, need_base=False,
                         need_policy=any(needs(s.family) for s in specs))
    samples = load_samples(cfg, inputs.tokenizer)
    limit = getattr(inputs.model.hf.config, "max_position_embeddings", None)
    prompts = {i: prompt_of(samples[i], limit, cfg.eval.max_new_tokens) for i in idx}
    return _forced_pass(inputs, cfg, specs, prompts, {int(i): v for i, v in forced_of.items()}, idx, oracle)


def _merge(parts: Sequence[dict]) -> dict:
    """The shards' results as one pass's, every per-sample table in sample order."""
    merged: dict = {"simulated": parts[0]["simulated"], "loop": parts[0]["loop"]}
    for key in ("methods", "compute", "layers_skipped"):
        merged[key] = {mid: dict(sorted((i, v) for p in parts for i, v in p[key][mid].items()))
                       for mid in parts[0][key]}
    merged["oracle"] = dict(sorted((i, v) for p in parts for i, v in p["oracle"].items()))
    return merged
