"""Where a batched decode spends its time (a diagnostic, not a benchmark): each method's batch of
``batch`` prompts decoded once under :mod:`cProfile`, after a warmup, and its time split between
the prefill (``DecodeBatch.add``) and each part of the step (``_begin``, the layer segments, the
K/V propagation, the exit checks, the LM heads, token choice, bookkeeping), with the functions
that take the most time of their own. cProfile adds a cost to every Python call, so the shares
point at the parts to look at; speeds are measured by ``scripts/benchmark.py --throughput``.

``python scripts/benchmark.py --config configs/default.yaml --profile`` ->
``results/benchmark/profile_batch_<name>.{json,md}``.
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from greencode.bench.common import bench_prompts, benchmark_path, median_gc_threshold, middle_exit_layer, setup
from greencode.bench.timing import write_result
from greencode.config import Config
from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate
from greencode.provenance import weights_record

# the step's parts (greencode.decoding.generate.DecodeBatch), in the order a step runs them
PARTS = ("add", "step", "_begin", "_run_segment", "_after_segment", "_look", "_decide", "_exit_checks",
         "_propagate_rest", "_top_logits", "_choose_tokens", "_choose", "_finished", "_drop")


def profile_path(cfg: Config) -> Path:
    return benchmark_path(cfg).with_name(f"profile_batch_{cfg.name}.json")


def _split(stats: pstats.Stats, top: int) -> dict:
    """Cumulative seconds of each DecodeBatch part, and the ``top`` functions by their own time."""
    raw = stats.stats  # {(file, line, name): (calls, primitive calls, tottime, cumtime, callers)}
    total = max((v[3] for v in raw.values()), default=0.0)
    parts = {}
    for (file, _, name), (calls, _, tot, cum, _) in raw.items():
        if file.endswith("decoding/generate.py") and name in PARTS:
            p = parts.setdefault(name, {"calls": 0, "cumulative_s": 0.0, "own_s": 0.0})
            p["calls"] += calls
            p["cumulative_s"] += cum
            p["own_s"] += tot
    own = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    return {"total_s": total, "parts": {k: parts[k] for k in PARTS if k in parts},
            "top_own": [{"function": f"{Path(f).name}:{line}:{name}", "calls": v[0], "own_s": v[2],
                         "cumulative_s": v[3]} for (f, line, name), v in own]}


def run_profile(cfg: Config, *, batch: int = 8, context_tokens: int = 200, new_tokens: int = 32,
                methods: Optional[Sequence[str]] = None, top: int = 15,
                out_path: Optional[Union[str, Path]] = None) -> Path:
    """Profile one batched decode of ``batch`` seeded prompts per method (default: the full model, the
    middle fixed exit and GC at the middle of ``eval.gc_thresholds``); write the JSON and a markdown table."""
    out_path, device, model, model_note, policy, policy_note = setup(
        cfg, out_path, profile_path(cfg), context_tokens, new_tokens,
        (("batch", batch, 1), ("context_tokens", context_tokens, 4), ("new_tokens", new_tokens, 2), ("top", top, 1)))
    gen = torch.Generator().manual_seed(cfg.seed)
    low = max(1, (3 * context_tokens) // 4)
    lengths = [int(torch.randint(low, context_tokens + 1, (1,), generator=gen)) for _ in range(batch)]
    prompts, prompt_note = bench_prompts(cfg, model, batch, context_tokens, gen, lengths)
    mid = middle_exit_layer(list(model.exit_layers), model.num_layers)
    gc = median_gc_threshold(cfg)
    controllers = {"full": lambda: NeverExit(), f"fixed@{mid}": lambda: FixedExit(mid),
                   f"gc@{gc!r}": lambda: PolicyExit.of(policy, gc, cfg.decoding.policy_temperature)}
    names = list(methods) if methods else list(controllers)
    unknown = [m for m in names if m not in controllers]
    if unknown:
        raise ValueError(f"methods {unknown}: profile one of {', '.join(controllers)}")
    rows = {}
    for name in names:
        def decode():
            return generate(model, prompts, controllers[name](), new_tokens, kv_strategy=cfg.decoding.kv_strategy)

        decode()  # warmup (allocations, first-call paths)
        prof = cProfile.Profile()
        prof.enable()
        res = decode()
        prof.disable()
        rows[name] = {**_split(pstats.Stats(prof), top),
                      "mean_exit_layer": sum(sum(r.exit_layers[1:]) for r in res)
                      / max(1, sum(len(r.exit_layers) - 1 for r in res))}
    result = {"what": "cProfile of one batched decode per method (after a warmup): the time of each part of "
                      "DecodeBatch's step and the functions with the most time of their own. cProfile's per-call "
                      "cost inflates Python-heavy parts: shares, not speeds",
              "batch": batch, "context_tokens": context_tokens, "new_tokens": new_tokens, "prompts": prompt_note,
              "model": model_note, "policy": policy_note, "methods": rows, "weights": weights_record(model)}
    return write_result(out_path, result, format_profile_markdown, cfg=cfg, stage="profile_batch",
                        weights=result["weights"])


def format_profile_markdown(result: dict) -> str:
    methods = list(result["methods"])
    lines = [f"# Where a batch of {result['batch']} spends its time", "", result["what"] + ".", "",
             f"{result['batch']} prompts of about {result['context_tokens']} tokens, {result['new_tokens']} new tokens "
             "each; seconds under the profiler (cumulative: the part and what it calls).", "",
             "| part | " + " | ".join(f"{m} (s)" for m in methods) + " |", "|---|" + "---|" * len(methods)]
    lines.append("| whole decode | " + " | ".join(f"{result['methods'][m]['total_s']:.3f}" for m in methods) + " |")
    for part in PARTS:
        cells = []
        for m in methods:
            p = result["methods"][m]["parts"].get(part)
            cells.append("–" if p is None else f"{p['cumulative_s']:.3f}")
        lines.append(f"| `{part}` | " + " | ".join(cells) + " |")
    lines.append("| mean exit layer | " + " | ".join(f"{result['methods'][m]['mean_exit_layer']:.2f}"
                                                     for m in methods) + " |")
    for m in methods:
        lines += ["", f"## {m}: most time of their own", "", "| function | calls | own (s) | cumulative (s) |",
                  "|---|---|---|---|"]
        lines += [f"| `{t['function']}` | {t['calls']} | {t['own_s']:.3f} | {t['cumulative_s']:.3f} |"
                  for t in result["methods"][m]["top_own"]]
    return "\n".join(lines)
