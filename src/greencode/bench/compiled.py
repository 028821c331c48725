"""The compiled layer step benchmark (a measurement, not a test): the decode loop with its compiled
layer step (``decoding.compile``) against the eager loop, at batch 1 and 8, with HF ``generate`` as
the reference and a check that the tokens are identical. ``python scripts/benchmark.py --compiled``
-> ``results/benchmark/compiled_<name>.{json,md}``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from greencode.bench.common import (StepClock, batch_rows, benchmark_path, fmt, hf_greedy_config, md_header,
                                    median_gc_threshold, middle_exit_layer, model_setup, parse_sizes, setup)
from greencode.bench.timing import Noise, interleaved_rounds, paired_median, quartiles, timed, write_result
from greencode.config import Config
from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate
from greencode.decoding.compiled import COMPILE_MODES, CompiledSteps
from greencode.provenance import weights_record


def compiled_path(cfg: Config) -> Path:
    """``results/benchmark/compiled_<config name>.json`` (the markdown table next to it)."""
    return benchmark_path(cfg).with_name(f"compiled_{cfg.name}.json")


class _CompiledRuns:
    """One round's cell (:meth:`run`): every prompt, ``size`` at a time, through the loop eager or with the
    compiled layer step, or HF ``generate`` at batch 1. Each compiled chunk's tokens and exits are compared
    with the eager run's (``agree``: [identical, compared] per method and batch), and the first compiled
    call of each shape, which compiles, is kept apart (``compile_s``)."""

    def __init__(self, cfg: Config, model, device, prompts: list[list[int]], controllers: dict, new_tokens: int,
                 steps: CompiledSteps):
        self.cfg, self.model, self.device, self.prompts = cfg, model, device, prompts
        self.controllers, self.new_tokens, self.steps = controllers, new_tokens, steps
        self.gconf = hf_greedy_config(model, new_tokens)
        self.reference: dict[tuple[str, int, int], tuple] = {}  # (method, batch, chunk) -> eager tokens and exits
        self.agree: dict[tuple[str, int], list[int]] = {}  # (method, batch) -> [compiled chunks equal to eager, compared]
        self.compile_s: dict[str, float] = {}

    def _hf(self) -> float:
        from transformers import StoppingCriteriaList

        per = []
        for p in self.prompts:
            ids = torch.tensor([p], device=self.device)
            clock = StepClock(self.device)
            with torch.inference_mode():
                self.model.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=self.gconf,
                                       stopping_criteria=StoppingCriteriaList([clock]))
            per.append(clock.per_step())
        return statistics.median(per)

    def run(self, name: str, impl: str, size: int) -> Optional[float]:
        """Median seconds per decode step over the chunks of ``size`` prompts."""
        if name == "hf_generate":
            return self._hf()
        layer_step = self.steps if impl == "compiled" else None
        per = []
        for k in range(0, len(self.prompts), size):
            chunk = self.prompts[k:k + size]
            res, wall = timed(self.device, lambda: generate(
                self.model, chunk if len(chunk) > 1 else chunk[0], self.controllers[name], self.new_tokens,
                kv_strategy=self.cfg.decoding.kv_strategy, layer_step=layer_step))
            res = res if isinstance(res, list) else [res]
            got = ([r.tokens for r in res], [r.exit_layers for r in res])
            key = (name, size, k)
            if impl == "eager":
                self.reference[key] = got
            elif key in self.reference:
                a = self.agree.setdefault((name, size), [0, 0])
                a[0] += got == self.reference[key]
                a[1] += 1
                self.compile_s.setdefault(f"{name}@{size}", wall)  # the first compiled call of this shape compiles
            per.append(res[0].counters["decode_time_s"] / (self.new_tokens - 1))
        return statistics.median(per)


def _compiled_rows(times: dict, runs: _CompiledRuns, sizes: list[int]) -> dict[str, dict]:
    """Per method and batch size: eager and compiled seconds per step (quartiles), tokens/s, the paired
    speed-up, identical chunks, the first compiled call, and at batch 1 both against HF ``generate``."""
    rows: dict[str, dict] = {}
    hf = times.get(("hf_generate", "eager", 1))
    for size in sizes:
        for name in runs.controllers:
            e, c = times[(name, "eager", size)], times[(name, "compiled", size)]
            a = runs.agree.get((name, size), [0, 0])
            row = {"eager_s_per_step": quartiles(e), "compiled_s_per_step": quartiles(c),
                   "eager_tokens_per_s": size / statistics.median(e), "compiled_tokens_per_s": size / statistics.median(c),
                   "speedup": paired_median(e, c), "identical_chunks": a[0], "compared_chunks": a[1],
                   "first_compiled_call_s": runs.compile_s.get(f"{name}@{size}")}
            if size == 1 and hf is not None:
                row["compiled_vs_hf"] = paired_median(hf, c)
                row["eager_vs_hf"] = paired_median(hf, e)
            rows.setdefault(name, {})[str(size)] = row
    return rows


def _exit_speedups(times: dict, sizes: list[int], names: list[str]) -> dict[str, dict[str, float]]:
    """Each exiting method's compiled step against the compiled full model's, per batch size (ratio of medians)."""
    full = {b: statistics.median(times[("full", "compiled", b)]) for b in sizes}
    return {name: {str(b): full[b] / statistics.median(times[(name, "compiled", b)]) for b in sizes} for name in names}


def run_compiled(cfg: Config, *, mode: Optional[str] = None, batch_sizes: Union[str, Sequence[int]] = (1, 8),
                 context_tokens: int = 200, new_tokens: int = 32, num_prompts: int = 4, repeats: int = 5,
                 warmup: int = 1, gc_threshold: Optional[float] = None,
                 out_path: Optional[Union[str, Path]] = None) -> Path:
    """The decode loop with its compiled layer step (``decoding.compile``) against the eager loop.

    For each batch size ``B`` (``num_prompts`` seeded random prompts of ``context_tokens`` tokens,
    decoded ``B`` at a time): seconds per decode step (tokens 2..N, the loop's ``decode_time_s``;
    per token = per step / ``B``) of the full model, a fixed exit at the middle exit point and GC
    (the run's policy at ``gc_threshold``), each eager and compiled, and HF ``generate`` at batch 1
    (its step clock). The first compiled call of each shape compiles: the warmup rounds take it
    and it is recorded apart (``compile_s``). Rounds are interleaved, order rotated; speed-ups are
    medians of paired per-round ratios. Every compiled run's tokens and exit layers must equal the
    eager run's (counted; a mismatch is reported, not hidden). Writes the JSON and a markdown
    table; returns the JSON's path."""
    sizes = parse_sizes(batch_sizes)
    out_path, device, model, model_note, policy, policy_note = setup(
        cfg, out_path, compiled_path(cfg), context_tokens, new_tokens,
        (("context_tokens", context_tokens, 1), ("new_tokens", new_tokens, 2), ("num_prompts", num_prompts, 1),
         ("repeats", repeats, 1), ("warmup", warmup, 1)))
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in COMPILE_MODES or mode == "off":
        raise ValueError(f"compile mode {mode!r}; choose one of {', '.join(m for m in COMPILE_MODES if m != 'off')}")
    gc_threshold = median_gc_threshold(cfg, gc_threshold)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(3, model.vocab_size, (context_tokens,), generator=gen).tolist()
               for _ in range(num_prompts)]
    mid = middle_exit_layer(list(model.exit_layers), model.num_layers)
    controllers = {"full": NeverExit(), f"fixed@{mid}": FixedExit(mid),
                   f"gc@{gc_threshold!r}": PolicyExit.of(policy, gc_threshold, cfg.decoding.policy_temperature)}
    for c in controllers.values():
        c.check_layers(model)
    steps = CompiledSteps(mode)  # the compiled runs' layer step, passed to the loop (the eager runs: None)
    runs = _CompiledRuns(cfg, model, device, prompts, controllers, new_tokens, steps)
    order = [(n, i, b) for b in sizes for n in controllers for i in ("eager", "compiled")]
    order += [("hf_generate", "eager", 1)] if 1 in sizes else []
    with Noise() as noise:  # one group: every (method, eager or compiled, batch size), in a rotated order
        times = interleaved_rounds([order], repeats, warmup, lambda cell: runs.run(*cell))
    result = {
        "format": "greencode-compiled/1",
        "config_name": cfg.name,
        "setup": {"mode": mode, "batch_sizes": sizes, "num_prompts": num_prompts, "context_tokens": context_tokens,
                  "new_tokens": new_tokens, "repeats": repeats, "warmup_rounds": warmup,
                  "prompts": "uniform random token ids (seeded), equal lengths", "model": model_note,
                  "policy": policy_note, "gc_threshold": gc_threshold, **model_setup(cfg, model, device),
                  "compile": steps.describe(),
                  "timing": "seconds per decode step (tokens 2..N) from the loop's decode_time_s, median over the "
                            "chunks of a round; tokens/s = batch / s per step; HF generate at batch 1 from its "
                            "step clock; interleaved rounds, order rotated; speed-ups = medians of paired ratios"},
        "methods": _compiled_rows(times, runs, sizes),
        "hf_generate_batch1": ({"s_per_token": quartiles(times[("hf_generate", "eager", 1)])}
                               if ("hf_generate", "eager", 1) in times else None),
        "compiled_exit_speedup_over_compiled_full": _exit_speedups(times, sizes, [f"fixed@{mid}",
                                                                                  f"gc@{gc_threshold!r}"]),
        "all_identical": all(a[0] == a[1] and a[1] > 0 for a in runs.agree.values()),
        "noise": noise.record(),
    }
    return write_result(out_path, result, format_compiled_markdown, cfg=cfg, stage="compiled-benchmark",
                        weights=weights_record(model))


def format_compiled_markdown(result: dict) -> str:
    """The compiled-vs-eager result as a markdown table."""
    s = result["setup"]
    lines = md_header(f"Compiled layer steps: {result['config_name']}", result,
                       f"torch.compile mode `{s['mode']}`; {s['num_prompts']} prompts of {s['context_tokens']} tokens") + [
             "| method | batch | eager ms/step | compiled ms/step | compiled tokens/s | speed-up | "
             "compiled x HF (batch 1) | same tokens | first compiled call s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += batch_rows(result, lambda r: (
        f"{r['eager_s_per_step']['median'] * 1e3:.2f} | {r['compiled_s_per_step']['median'] * 1e3:.2f} | "
        f"{r['compiled_tokens_per_s']:.0f} | {fmt(r['speedup'], '.2f')} | {fmt(r.get('compiled_vs_hf'), '.2f')} | "
        f"{r['identical_chunks']}/{r['compared_chunks']} | {fmt(r['first_compiled_call_s'], '.1f')}"))
    hf = result.get("hf_generate_batch1")
    lines.append("")
    if hf:
        lines.append(f"HF `generate` at batch 1: {hf['s_per_token']['median'] * 1e3:.2f} ms/token.")
    for name, by in result["compiled_exit_speedup_over_compiled_full"].items():
        cells = ", ".join(f"batch {b}: {v:.2f}x" for b, v in by.items())
        lines.append(f"- compiled {name} over the compiled full model: {cells}")
    lines += [f"- every compiled run's tokens and exits equal the eager run's: {result['all_identical']}",
              f"- {s['timing']}.",
              f"- noise: load average {result['noise']['load_average_before']} -> "
              f"{result['noise']['load_average_after']}, wall {result['noise']['wall_s']:.1f} s"]
    return "\n".join(lines)
