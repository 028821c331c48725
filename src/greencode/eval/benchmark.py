"""The decoding speed benchmark (a measurement, not a test).

For the same prompts in one process: seconds per new token of HF ``generate`` (greedy, KV
cache) and of our loop with never-exit, a fixed exit at every exit point, a confidence
exit and an MLP policy controller whose decision is ignored (so it never exits and the row
isolates what evaluating the policy costs). Every method generates exactly the same number
of tokens (HF: ``min_new_tokens``; ours: no EOS).

Seconds per new token covers the decode steps only (tokens 2..N: the prefill is the same
for every method and is excluded): for our loop from its own ``decode_time_s`` counter, for
HF ``generate`` from a stopping criterion that timestamps every step (it is called right
after each token is chosen). Runs are interleaved (repetition -> prompt -> methods, order
rotated) after a warmup, and each method's per-run values are summarised by median and IQR;
ratios to HF use the median of paired per-run ratios, so slow drifts of the shared machine
cancel out.

Works before any training: without the run's fine-tuned model it uses a randomly
initialised model of the config's shape and random prompts; without an exported policy a
random MLP of ``rl.ppo.net_arch``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from greencode.config import Config
from greencode.paths import RunPaths
from greencode.utils import REPO_ROOT, run_metadata, set_seed, setup_torch, write_json

log = logging.getLogger(__name__)

TARGETS = {
    "never_vs_hf_max_ratio": 1.0,  # never-exit seconds/token <= 1.0 x HF generate
    "fixed_middle_min_speedup": 1.5,  # fixed exit at the middle exit point >= 1.5x faster than HF generate
    "policy_check_max_share": 0.05,  # the MLP policy check <= 5% of a token's time
}


def benchmark_path(cfg: Config) -> Path:
    """``results/benchmark/<config name>.json`` (next to ``results/<name>``)."""
    results = Path(cfg.results_dir)
    results = results if results.is_absolute() else REPO_ROOT / results
    return results.parent / "benchmark" / f"{cfg.name}.json"


def middle_exit_layer(exit_layers: list[int], num_layers: int) -> int:
    """The exit layer closest to the middle of the model (0-based; ties go to the earlier)."""
    mid = (num_layers - 1) / 2
    return min(exit_layers, key=lambda e: (abs(e - mid), e))


def _quartiles(xs: list[float]) -> dict[str, float]:
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "iqr": 0.0}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


class _StepClock:
    """A stopping criterion that never stops and timestamps every generation step."""

    def __init__(self, device: torch.device):
        self.times: list[float] = []
        self.cuda = device.type == "cuda"

    def __call__(self, input_ids, scores, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _load_model(cfg: Config, paths: RunPaths, device, dtype):
    from greencode.models import EarlyExitModel

    if (paths.finetuned / "config.json").is_file():
        return EarlyExitModel.from_run_config(cfg, paths.finetuned, device=device, dtype=dtype).eval(), \
            f"fine-tuned model {paths.finetuned}"
    model = EarlyExitModel.from_config(cfg.model, vocab_size=cfg.tokenizer.vocab_size, bos_token_id=0,
                                       eos_token_id=2, pad_token_id=1)
    note = "randomly initialised model of the config's shape (no fine-tuned model in the run folder yet)"
    if cfg.model.base:
        note += f"; model.base={cfg.model.base!r} is not loaded, the shape fields of model.* are used"
    return model.to(device=device, dtype=dtype).eval(), note


def _load_policy(cfg: Config, paths: RunPaths, model):
    from greencode.rl import ExitPolicy, load_policy

    if paths.policy.is_file():
        try:
            return load_policy(paths.policy, model), f"exported policy {paths.policy}"
        except ValueError as e:  # e.g. trained on other weights than the random model here
            log.warning("not using %s: %s", paths.policy, e)
    policy = ExitPolicy(model.hidden_size, cfg.rl.ppo.net_arch,
                        metadata={"observation": cfg.rl.observation, "exit_layers": list(model.exit_layers)})
    return policy.to(model.device).eval(), f"random MLP policy, net_arch {cfg.rl.ppo.net_arch}"


def run_benchmark(cfg: Config, *, context_tokens: int = 200, new_tokens: int = 32, num_prompts: int = 4,
                  repeats: int = 5, warmup: int = 1, out_path: Optional[Union[str, Path]] = None) -> Path:
    """Measure seconds per new token for every method and write the JSON result; returns its path."""
    from transformers import GenerationConfig, StoppingCriteriaList

    from greencode.decoding import ConfidenceExit, FixedExit, NeverExit, PolicyExit, generate

    for name, v, low in (("context_tokens", context_tokens, 1), ("new_tokens", new_tokens, 2),
                         ("num_prompts", num_prompts, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name}={v!r} must be an integer >= {low}")
    out_path = Path(out_path) if out_path is not None else benchmark_path(cfg)
    from greencode.eval.summary import check_writable

    check_writable(out_path.parent)
    set_seed(cfg.seed)
    device, dtype = setup_torch(cfg.hardware)
    paths = RunPaths.from_config(cfg)
    model, model_note = _load_model(cfg, paths, device, dtype)
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    if limit and context_tokens + new_tokens > limit:
        raise ValueError(f"context_tokens ({context_tokens}) + new_tokens ({new_tokens}) exceed the model's "
                         f"{limit} positions; use a shorter context")
    policy, policy_note = _load_policy(cfg, paths, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(3, model.vocab_size, (1, context_tokens), generator=gen).to(device)
               for _ in range(num_prompts)]

    conf_t = sorted(cfg.eval.confidence_thresholds)[len(cfg.eval.confidence_thresholds) // 2] \
        if cfg.eval.confidence_thresholds else 0.9
    controllers: dict[str, Any] = {"never": NeverExit()}
    for layer in model.exit_layers:
        controllers[f"fixed@{layer}"] = FixedExit(layer)
    controllers[f"confidence@{conf_t:g}"] = ConfidenceExit(conf_t)
    controllers["policy_check"] = PolicyExit(policy, 0.5, cfg.decoding.policy_temperature,
                                             observation=getattr(policy, "observation", cfg.rl.observation),
                                             ignore_decision=True)
    for c in controllers.values():
        c.check_layers(model)
    methods = ["hf_generate"] + list(controllers)
    pad = model.hf.config.pad_token_id
    gconf = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad if pad is not None else 0, eos_token_id=model.hf.config.eos_token_id)

    def run(method: str, prompt: torch.Tensor) -> dict:
        if method == "hf_generate":
            clock = _StepClock(device)
            with torch.inference_mode():
                out = model.hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gconf,
                                        stopping_criteria=StoppingCriteriaList([clock]))
            n = out.shape[1] - prompt.shape[1]
            if n != new_tokens or len(clock.times) != n:
                raise RuntimeError(f"HF generate produced {n} tokens / {len(clock.times)} steps, expected {new_tokens}")
            return {"s_per_token": (clock.times[-1] - clock.times[0]) / (n - 1), "mean_exit_layer": model.final_layer,
                    "controller_share": None, "s_per_check": None}
        c = controllers[method]
        res = generate(model, prompt, c, new_tokens, kv_strategy=cfg.decoding.kv_strategy)
        k = res.counters
        if res.new_tokens != new_tokens:
            raise RuntimeError(f"{method} produced {res.new_tokens} tokens, expected {new_tokens}")
        return {"s_per_token": k["decode_time_s"] / k["decode_steps"],
                "mean_exit_layer": statistics.fmean(res.exit_layers[1:]),
                "controller_share": k["controller_time_s"] / k["decode_time_s"] if k["decode_time_s"] else None,
                "s_per_check": k["controller_time_s"] / k["exit_checks"] if k["exit_checks"] else None}

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    for w in range(warmup):
        for m in methods:
            run(m, prompts[w % num_prompts])
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(repeats):
        for p, prompt in enumerate(prompts):
            shift = rep * num_prompts + p
            for j in range(len(methods)):
                m = methods[(j + shift) % len(methods)]
                runs[m].append(run(m, prompt))
    wall_s = time.perf_counter() - t0
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    hf = [r["s_per_token"] for r in runs["hf_generate"]]
    never = [r["s_per_token"] for r in runs["never"]]
    rows = {}
    for m in methods:
        xs = [r["s_per_token"] for r in runs[m]]
        q = _quartiles(xs)
        paired = [x / h for x, h in zip(xs, hf)]
        shares = [r["controller_share"] for r in runs[m] if r["controller_share"] is not None]
        checks = [r["s_per_check"] for r in runs[m] if r["s_per_check"] is not None]
        rows[m] = {
            "s_per_token_median": q["median"], "s_per_token_q1": q["q1"], "s_per_token_q3": q["q3"],
            "s_per_token_iqr": q["iqr"], "relative_iqr": q["iqr"] / q["median"] if q["median"] else None,
            "ratio_to_hf": q["median"] / statistics.median(hf),
            "ratio_to_hf_paired_median": statistics.median(paired),
            "speedup_vs_hf": statistics.median(hf) / q["median"],
            "mean_exit_layer": statistics.fmean(r["mean_exit_layer"] for r in runs[m]),
            "controller_time_share": statistics.median(shares) if shares else None,
            "s_per_check_median": statistics.median(checks) if checks else None,
            "num_runs": len(xs), "s_per_token_runs": xs,
        }
    mid = middle_exit_layer(model.exit_layers, model.num_layers)
    pol = [r["s_per_token"] for r in runs["policy_check"]]
    policy_ab = statistics.median([a / b - 1.0 for a, b in zip(pol, never)])
    never_ratio = rows["never"]["ratio_to_hf_paired_median"]
    fixed_speedup = 1.0 / rows[f"fixed@{mid}"]["ratio_to_hf_paired_median"]
    targets = {
        "never_vs_hf": {"value": never_ratio, "target": f"<= {TARGETS['never_vs_hf_max_ratio']}",
                        "met": never_ratio <= TARGETS["never_vs_hf_max_ratio"],
                        "what": "never-exit seconds/token over HF generate's (median of paired runs)"},
        "fixed_middle_speedup": {"value": fixed_speedup, "layer": mid,
                                 "target": f">= {TARGETS['fixed_middle_min_speedup']}",
                                 "met": fixed_speedup >= TARGETS["fixed_middle_min_speedup"],
                                 "what": f"HF generate seconds/token over fixed exit at layer {mid} (0-based)"},
        "policy_check_share": {"value": policy_ab, "timer_share": rows["policy_check"]["controller_time_share"],
                               "target": f"<= {TARGETS['policy_check_max_share']}",
                               "met": policy_ab <= TARGETS["policy_check_max_share"],
                               "what": "A/B: seconds/token with the policy evaluated (decision ignored) over "
                                       "never-exit, minus 1 (median of paired runs); timer_share = time inside "
                                       "the controller / decode time"},
    }
    result = {
        "format": "greencode-benchmark/1",
        "config_name": cfg.name,
        "setup": {"context_tokens": context_tokens, "new_tokens": new_tokens, "num_prompts": num_prompts,
                  "repeats": repeats, "warmup_rounds": warmup, "prompts": "uniform random token ids (seeded)",
                  "model": model_note, "policy": policy_note, "num_layers": model.num_layers,
                  "exit_layers": list(model.exit_layers), "hidden_size": model.hidden_size,
                  "vocab_size": model.vocab_size, "family": model.family, "device": str(device),
                  "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
                  "kv_strategy": cfg.decoding.kv_strategy, "confidence_threshold": conf_t,
                  "timing": "decode steps only (tokens 2..N), seconds per new token; interleaved, order rotated"},
        "methods": rows,
        "targets": targets,
        "noise": {"load_average_before": load_before, "load_average_after": load_after, "wall_s": wall_s,
                  "max_relative_iqr": max(r["relative_iqr"] or 0 for r in rows.values())},
        "run_metadata": run_metadata(cfg, stage="benchmark"),
    }
    write_json(out_path, result)
    log.info("wrote %s", out_path)
    return out_path


def format_table(result: dict) -> str:
    """A readable text table of a benchmark result."""
    s = result["setup"]
    lines = [f"Decoding benchmark: {result['config_name']} ({s['family']}, {s['num_layers']} layers, exits "
             f"{s['exit_layers']} 0-based, hidden {s['hidden_size']}, {s['device']} {s['dtype']}, "
             f"{s['torch_threads']} threads)",
             f"{s['num_prompts']} prompts x {s['repeats']} repeats, {s['context_tokens']} context tokens, "
             f"{s['new_tokens']} new tokens; model: {s['model']}",
             "",
             f"{'method':<18} {'ms/token':>9} {'IQR ms':>8} {'x HF':>6} {'speedup':>8} {'exit L':>7} {'ctrl %':>7}",
             "-" * 69]
    for m, r in result["methods"].items():
        ctrl = r["controller_time_share"]
        lines.append(f"{m:<18} {1e3 * r['s_per_token_median']:>9.3f} {1e3 * r['s_per_token_iqr']:>8.3f} "
                     f"{r['ratio_to_hf_paired_median']:>6.2f} {1 / r['ratio_to_hf_paired_median']:>7.2f}x "
                     f"{r['mean_exit_layer']:>7.2f} {'' if ctrl is None else f'{100 * ctrl:.1f}':>7}")
    lines.append("")
    lines.append("x HF = median of paired (same prompt, same round) seconds/token ratios to HF generate; "
                 "exit L = mean 0-based exit layer; ctrl % = time inside the exit controller / decode time")
    for name, t in result["targets"].items():
        extra = f" (timers: {100 * t['timer_share']:.1f}%)" if t.get("timer_share") is not None else ""
        lines.append(f"target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'NOT met'}{extra}")
    n = result["noise"]
    lines.append(f"noise: load average {n['load_average_before']} -> {n['load_average_after']}, max relative IQR "
                 f"{n['max_relative_iqr']:.2f}, wall {n['wall_s']:.1f} s")
    return "\n".join(lines)
