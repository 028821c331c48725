"""The batched decoding benchmark (a measurement, not a test): tokens per second when the same
prompts are decoded 1, 4, 8, 16 at a time (left-padded ragged batches), for our loop (the full
model, GC and a fixed exit at the middle exit point) and HF ``generate`` batched with an attention
mask. ``python scripts/benchmark.py --throughput`` -> ``results/benchmark/throughput_<name>.{json,md}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from greencode.bench.common import (batch_rows, bench_prompts, benchmark_path, fmt, hf_greedy_config, md_header,
                                    median_gc_threshold, middle_exit_layer, model_setup, parse_sizes, setup,
                                    target_noise_lines)
from greencode.bench.timing import Noise, interleaved_rounds, paired_median, quartiles, timed, write_result
from greencode.config import Config
from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate
from greencode.decoding.compiled import compile_info
from greencode.provenance import weights_record

THROUGHPUT_TARGETS = {
    "batch8_vs_batch1_min_ratio": 3.0,  # issue 14: tokens/s at batch 8 >= 3x batch 1 (full model)
    "gc_vs_full_batch8_min_ratio": 1.15,  # issue 29: GC at its default threshold, batch 8
    "fixed_vs_full_batch8_min_ratio": 1.3,  # issue 29: the fixed middle exit, batch 8
}


def throughput_path(cfg: Config) -> Path:
    """``results/benchmark/throughput_<config name>.json`` (the markdown table next to it)."""
    return benchmark_path(cfg).with_name(f"throughput_{cfg.name}.json")


class _Workload:
    """Every prompt decoded ``size`` at a time by one method (:meth:`run`): our loop with a controller, or HF
    ``generate`` with left padding. Keeps each (method, batch size)'s tokens (the first run's) and layers per
    decoded token: each row's own, and the batch's (its deepest row's, what a step runs through: a batch runs
    to its deepest row, on however few rows)."""

    def __init__(self, cfg: Config, model, device, prompts: list[list[int]], controllers: dict, new_tokens: int):
        self.cfg, self.model, self.device, self.prompts = cfg, model, device, prompts
        self.controllers, self.new_tokens = controllers, new_tokens
        pad = model.hf.config.pad_token_id
        self.pad = pad if pad is not None else 0
        self.gconf = hf_greedy_config(model, new_tokens)
        self.tokens: dict[tuple[str, int], list[list[int]]] = {}  # (method, batch size) -> each prompt's tokens
        self.depth: dict[tuple[str, int], dict[str, float]] = {}  # (method, batch size) -> {"row", "batch"}

    def _hf(self, chunk: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.inference_mode():
            gen_ids = self.model.hf.generate(ids.to(self.device), attention_mask=mask.to(self.device),
                                             generation_config=self.gconf)
        return [row[width:].tolist() for row in gen_ids]

    def decode_all(self, method: str, size: int) -> tuple[list[list[int]], Optional[float]]:
        """Every prompt's new tokens, decoded ``size`` at a time, and (our loop) the seconds spent after the
        prefills: per batch the longest row's ``decode_time_s`` (HF generate: None)."""
        out: list[list[int]] = []
        decode_s: Optional[float] = None if method == "hf_generate" else 0.0
        steps: list[list[int]] = []
        for i in range(0, len(self.prompts), size):
            chunk = self.prompts[i:i + size]
            if method == "hf_generate":
                out += self._hf(chunk)
                continue
            res = generate(self.model, chunk if len(chunk) > 1 else chunk[0], self.controllers[method],
                           self.new_tokens, kv_strategy=self.cfg.decoding.kv_strategy)
            res = res if isinstance(res, list) else [res]
            out += [r.tokens for r in res]
            decode_s += max(r.counters["decode_time_s"] for r in res)
            # the rows start together: step t decodes token t of every row (token 0 comes from the prefill)
            steps += [[r.exit_layers[t] + 1 for r in res] for t in range(1, min(len(r.exit_layers) for r in res))]
        if steps:
            self.depth.setdefault((method, size), {"row": sum(sum(x) / len(x) for x in steps) / len(steps),
                                                   "batch": sum(max(x) for x in steps) / len(steps)})
        return out, decode_s

    def run(self, method: str, size: int) -> tuple[float, Optional[float]]:
        """Wall seconds to decode every prompt, ``size`` at a time, and the part of it after the prefills."""
        (out, decode_s), wall = timed(self.device, lambda: self.decode_all(method, size))
        n, new = len(self.prompts), self.new_tokens
        if len(out) != n or any(len(t) != new for t in out):
            raise RuntimeError(f"{method} at batch {size} produced {[len(t) for t in out]} tokens, expected "
                               f"{new} for each of {n} prompts")
        self.tokens.setdefault((method, size), out)
        return wall, decode_s


def _throughput_rows(runs: dict, work: _Workload, methods: list[str], sizes: list[int]) -> dict[str, dict[str, dict]]:
    """Per method and batch size: tokens/s (median, quartiles, every round), paired ratios to batch
    ``sizes[0]``, to HF and to the full model, decode-only tokens/s, rows equal to batch ``sizes[0]``'s, depth."""
    n = len(work.prompts)
    total = n * work.new_tokens
    tps = {key: [total / w for w, _ in rs] for key, rs in runs.items()}
    # decode-phase tokens/s (our loop only): what skipping layers can speed up; the prefill is the full model's
    dtps = {key: [total / d for _, d in rs] for key, rs in runs.items() if rs and rs[0][1] is not None}
    rows: dict[str, dict[str, dict]] = {}
    for m in methods:
        rows[m] = {}
        for b in sizes:
            q = quartiles(tps[(m, b)])
            same = sum(t == u for t, u in zip(work.tokens[(m, b)], work.tokens[(m, sizes[0])]))
            depth = work.depth.get((m, b))
            rows[m][str(b)] = {
                "tokens_per_s_median": q["median"], "tokens_per_s_q1": q["q1"], "tokens_per_s_q3": q["q3"],
                "tokens_per_s_iqr": q["iqr"], "relative_iqr": q["iqr"] / q["median"] if q["median"] else None,
                f"ratio_to_batch_{sizes[0]}": paired_median(tps[(m, b)], tps[(m, sizes[0])]),
                "ratio_to_hf": paired_median(tps[(m, b)], tps[("hf_generate", b)]),
                "ratio_to_full": paired_median(tps[(m, b)], tps[("full", b)]),
                f"rows_equal_to_batch_{sizes[0]}": same / n,
                "num_runs": len(tps[(m, b)]), "tokens_per_s_runs": tps[(m, b)],
                "decode_tokens_per_s_median": quartiles(dtps[(m, b)])["median"] if (m, b) in dtps else None,
                "decode_ratio_to_full": paired_median(dtps[(m, b)], dtps[("full", b)]) if (m, b) in dtps else None,
                "layers_per_token_row": depth["row"] if depth else None,
                "layers_per_step_batch": depth["batch"] if depth else None}
    return rows


def _throughput_targets(rows: dict, sizes: list[int], gc_name: str, fixed_name: str) -> dict:
    """Batch 8 over batch 1 (full model), and GC's and the fixed exit's tokens/s over the full model's at batch 8."""
    targets = {}
    if 8 in sizes and 1 in sizes:
        v = rows["full"]["8"]["ratio_to_batch_1"]
        targets["batch8_vs_batch1"] = {"value": v, "target": f">= {THROUGHPUT_TARGETS['batch8_vs_batch1_min_ratio']}",
                                       "met": v >= THROUGHPUT_TARGETS["batch8_vs_batch1_min_ratio"],
                                       "gc_value": rows[gc_name]["8"]["ratio_to_batch_1"],
                                       "what": "full model tokens/s at batch 8 over batch 1 (median of paired rounds)"}
    if 8 in sizes:
        for key, name, bound in (("gc_vs_full_batch8", gc_name, "gc_vs_full_batch8_min_ratio"),
                                 ("fixed_vs_full_batch8", fixed_name, "fixed_vs_full_batch8_min_ratio")):
            r, low = rows[name]["8"], THROUGHPUT_TARGETS[bound]
            targets[key] = {"value": r["ratio_to_full"], "target": f">= {low}", "met": r["ratio_to_full"] >= low,
                            "decode_value": r["decode_ratio_to_full"],
                            "batch1_value": rows[name][str(sizes[0])]["ratio_to_full"],
                            "what": f"{name} tokens/s over the full model's at batch 8 (median of paired rounds; "
                                    "decode_value: the same after the prefills, which run the full model)"}
    return targets


def run_throughput(cfg: Config, *, batch_sizes: Union[str, Sequence[int]] = (1, 4, 8, 16), context_tokens: int = 200,
                   new_tokens: int = 32, num_prompts: Optional[int] = None, repeats: int = 3, warmup: int = 1,
                   gc_threshold: Optional[float] = None, out_path: Optional[Union[str, Path]] = None) -> Path:
    """Tokens per second when the same ``num_prompts`` prompts (default: the largest batch size;
    ragged lengths in [3/4, 1] x ``context_tokens``, seeded) are decoded ``B`` at a time, for each
    batch size ``B``: our loop with the full model (NeverExit) and with GC (the policy at
    ``gc_threshold``, default the middle of ``eval.gc_thresholds``), one left-padded ragged batch per
    ``generate(model, [prompt, ...], controller)`` call, against HF ``generate`` batched with left
    padding and an attention mask (greedy, ``min_new_tokens`` = ``new_tokens`` so every method
    produces the same tokens per row). Tokens/s = prompts x new tokens / wall clock of the whole
    workload (prefill included). Rounds are interleaved (repetition -> batch size -> methods, order
    rotated) after a warmup; ratios are medians of paired per-round ratios. Writes the JSON and a
    markdown table; returns the JSON's path."""
    sizes = parse_sizes(batch_sizes)
    num_prompts = max(sizes) if num_prompts is None else num_prompts
    out_path, device, model, model_note, policy, policy_note = setup(
        cfg, out_path, throughput_path(cfg), context_tokens, new_tokens,
        (("context_tokens", context_tokens, 4), ("new_tokens", new_tokens, 2), ("num_prompts", num_prompts, 1),
         ("repeats", repeats, 1), ("warmup", warmup, 0)))
    gc_threshold = median_gc_threshold(cfg, gc_threshold)
    if not 0.0 <= gc_threshold <= 1.0:
        raise ValueError(f"gc_threshold={gc_threshold} must be in [0, 1]")
    gen = torch.Generator().manual_seed(cfg.seed)
    low = max(1, (3 * context_tokens) // 4)
    lengths = [int(torch.randint(low, context_tokens + 1, (1,), generator=gen)) for _ in range(num_prompts)]
    prompts, prompt_note = bench_prompts(cfg, model, num_prompts, context_tokens, gen, lengths)
    mid = middle_exit_layer(list(model.exit_layers), model.num_layers)
    # the full model, GC, and a fixed exit at the middle exit point (an exit every token: what skipping
    # layers in a batch saves when rows do exit, whatever the policy decides on these prompts)
    controllers = {"full": NeverExit(),
                   f"gc@{gc_threshold!r}": PolicyExit.of(policy, gc_threshold, cfg.decoding.policy_temperature),
                   f"fixed@{mid}": FixedExit(mid)}
    for c in controllers.values():
        c.check_layers(model)
    methods = list(controllers) + ["hf_generate"]
    work = _Workload(cfg, model, device, prompts, controllers, new_tokens)
    with Noise() as noise:  # one group per batch size: every method at it, in a rotated order
        runs = interleaved_rounds([[(m, b) for m in methods] for b in sizes], repeats, warmup,
                                  lambda cell: work.run(*cell))
    rows = _throughput_rows(runs, work, methods, sizes)
    result = {
        "format": "greencode-throughput/1",
        "config_name": cfg.name,
        "setup": {"batch_sizes": sizes, "num_prompts": num_prompts, "prompt_lengths": lengths,
                  "context_tokens": context_tokens, "new_tokens": new_tokens, "repeats": repeats,
                  "warmup_rounds": warmup, "prompts": f"{prompt_note}; ragged lengths in [3/4, 1] x context_tokens, "
                                                      "left-padded per batch",
                  "model": model_note, "policy": policy_note, "gc_threshold": gc_threshold,
                  **model_setup(cfg, model, device), "decode_compile": compile_info(model),
                  "timing": "wall clock of the whole workload (every prompt, prefill + decode), decoded B prompts "
                            "per call; tokens/s = prompts x new_tokens / wall; interleaved, order rotated; decode "
                            "tokens/s (our loop): the same tokens over the seconds after each batch's prefill",
                  "hf": "model.hf.generate, left padding + attention mask, greedy, min_new_tokens = max_new_tokens"},
        "methods": rows,
        "targets": _throughput_targets(rows, sizes, methods[1], methods[2]),
        "noise": {**noise.record(),
                  "max_relative_iqr": max(r["relative_iqr"] or 0 for m in rows.values() for r in m.values())},
    }
    return write_result(out_path, result, format_throughput_markdown, cfg=cfg, stage="throughput",
                        weights=weights_record(model))


def format_throughput_markdown(result: dict) -> str:
    """The throughput result as a markdown table."""
    s = result["setup"]
    sizes = s["batch_sizes"]
    base = sizes[0]
    lines = md_header(f"Throughput: {result['config_name']}", result,
                       f"{s['num_prompts']} prompts of {min(s['prompt_lengths'])}-{max(s['prompt_lengths'])} tokens") + [
             f"| method | batch | tokens/s | IQR | x batch {base} | x HF | x full | decode tokens/s | decode x full | "
             f"rows = batch {base} | layers/token (row) | layers/step (batch) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += batch_rows(result, lambda r: (
        f"{r['tokens_per_s_median']:.1f} | {r['tokens_per_s_iqr']:.1f} | "
        f"{fmt(r[f'ratio_to_batch_{base}'], '.2f')} | {fmt(r['ratio_to_hf'], '.2f')} | "
        f"{fmt(r['ratio_to_full'], '.2f')} | {fmt(r.get('decode_tokens_per_s_median'), '.1f')} | "
        f"{fmt(r.get('decode_ratio_to_full'), '.2f')} | {r[f'rows_equal_to_batch_{base}']:.2f} | "
        f"{fmt(r.get('layers_per_token_row'), '.2f')} | {fmt(r.get('layers_per_step_batch'), '.2f')}"))
    lines += ["", f"Ratios are medians of paired (same round) tokens/s ratios. {s['timing']}. rows = batch {base}: "
                  f"share of prompts whose tokens equal their tokens at batch {base}. layers/token (row): the layers "
                  "a decoded token ran through, averaged over rows; layers/step (batch): the deepest row's, what the "
                  "batch's step runs through (on fewer rows once the others exit).", ""]
    lines += target_noise_lines(result, "- ")
    return "\n".join(lines)

