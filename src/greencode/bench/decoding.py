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

Lossless (self-speculative) methods run in the same interleaved rounds: ``gc_lossless@T`` at
each of ``eval.gc_thresholds`` (drafts of up to ``eval.lossless_k_max`` tokens exiting where the
policy says, ``eval.lossless_draft_threshold``), LayerSkip-style static drafts
``layerskip@L:kK`` (fixed exit layer L, K tokens per draft; by default the middle exit point and
K in 2, 4, 6, 8) and HF ``assistant_early_exit`` at the middle exit point. For them every method
also records its wall-clock seconds per generation (prefill included: HF's assisted generation
cannot separate it); speed-ups over our full loop (``never``), over HF ``generate`` and over the
best (fastest) static setting are medians of paired per-run ratios, next to acceptance rates and
mean draft lengths. Their tokens must equal the full loop's on every prompt (a mismatch fails the
run).

The batched mode is :mod:`greencode.bench.throughput`, the compiled layer step
:mod:`greencode.bench.compiled`.

Works before any training: without the run's fine-tuned model it uses a randomly
initialised model of the config's shape and random prompts; without an exported policy a
random MLP of ``rl.ppo.net_arch``.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from greencode.bench.common import (StepClock, bench_prompts, benchmark_path, fmt, hf_greedy_config, middle_exit_layer,
                                    model_setup, setup, target_noise_lines)
from greencode.bench.timing import Noise, interleaved_rounds, paired_median, quartiles, timed, write_result
from greencode.config import Config
from greencode.decoding import ConfidenceExit, FixedExit, NeverExit, PolicyExit, generate, generate_lossless
from greencode.decoding.compiled import compile_info
from greencode.provenance import weights_record

log = logging.getLogger(__name__)

TARGETS = {
    "never_vs_hf_max_ratio": 1.0,  # never-exit seconds/token <= 1.0 x HF generate
    "fixed_middle_min_speedup": 1.5,  # fixed exit at the middle exit point >= 1.5x faster than HF generate
    "policy_check_max_share": 0.05,  # the MLP policy check <= 5% of a token's time
    # issue 13: lossless GC (its fastest threshold), wall clock per generation
    "lossless_vs_full_min_speedup": 1.5,
    "lossless_vs_best_static_min_speedup": 1.15,
}
LAYERSKIP_K = (2, 4, 6, 8)


def _layerskip_layers(spec: Union[str, Sequence[int], None], exit_layers: list[int], num_layers: int) -> list[int]:
    """``None`` / ``"mid"``: the middle exit point; ``"all"``: every exit point; or explicit layers."""
    if spec is None or spec == "mid":
        return [middle_exit_layer(exit_layers, num_layers)]
    if spec == "all":
        return list(exit_layers)
    if isinstance(spec, str):
        spec = [int(x) for x in spec.split(",") if x.strip()]
    layers = [int(x) for x in spec]
    for layer in layers:
        if not 0 <= layer < num_layers - 1:
            raise ValueError(f"layerskip layer {layer} is out of range [0, {num_layers - 2}] (0-based, below the "
                             "final layer)")
    return layers


def _controllers(cfg: Config, model, policy) -> tuple[dict[str, Any], float]:
    """The loop's methods: never-exit, a fixed exit at every exit point, a confidence exit (the middle of
    ``eval.confidence_thresholds``), the policy evaluated with its decision ignored, and GC at each of
    ``eval.gc_thresholds``; and the confidence threshold."""
    conf_t = sorted(cfg.eval.confidence_thresholds)[len(cfg.eval.confidence_thresholds) // 2] \
        if cfg.eval.confidence_thresholds else 0.9
    controllers: dict[str, Any] = {"never": NeverExit()}
    for layer in model.exit_layers:
        controllers[f"fixed@{layer}"] = FixedExit(layer)
    controllers[f"confidence@{conf_t:g}"] = ConfidenceExit(conf_t)
    controllers["policy_check"] = PolicyExit.of(policy, 0.5, cfg.decoding.policy_temperature, ignore_decision=True)
    for t in cfg.eval.gc_thresholds:  # GC deciding, at the evaluation's thresholds: its wall clock beside its compute
        controllers[f"gc@{float(t):g}"] = PolicyExit.of(policy, float(t), cfg.decoding.policy_temperature)
    for c in controllers.values():
        c.check_layers(model)
    return controllers, conf_t


def _speculative(cfg: Config, model, policy, layerskip_layers, layerskip_k) -> dict[str, tuple[Any, int, Optional[float]]]:
    """The lossless methods: name -> (drafting controller, k_max, draft threshold)."""
    speculative: dict[str, tuple[Any, int, Optional[float]]] = {}
    for t in cfg.eval.gc_thresholds:
        speculative[f"gc_lossless@{float(t)!r}"] = (
            PolicyExit.of(policy, float(t), cfg.decoding.policy_temperature),
            cfg.eval.lossless_k_max, cfg.eval.lossless_draft_threshold)
    for layer in _layerskip_layers(layerskip_layers, list(model.exit_layers), model.num_layers):
        for k in layerskip_k:
            if int(k) < 1:
                raise ValueError(f"layerskip draft length {k} must be >= 1")
            speculative[f"layerskip@{layer}:k{int(k)}"] = (FixedExit(layer), int(k), None)
    for c, _, _ in speculative.values():
        c.check_layers(model)
    return speculative


class _Methods:
    """One timed generation of a method on a prompt (:meth:`run`): HF ``generate`` (plain or its assisted
    early exit), a lossless method, or our loop with a controller. Keeps the full loop's tokens per prompt
    and every lossless generation's, for :meth:`check_lossless`."""

    def __init__(self, cfg: Config, model, device, new_tokens: int, controllers: dict, speculative: dict,
                 hf_ee: Optional[str], mid: int):
        self.cfg, self.model, self.device, self.new_tokens = cfg, model, device, new_tokens
        self.controllers, self.speculative, self.hf_ee = controllers, speculative, hf_ee
        self.gconf = hf_greedy_config(model, new_tokens)
        # HF counts layers; ours is the 0-based exit layer
        self.gconf_ee = hf_greedy_config(model, new_tokens, assistant_early_exit=mid + 1) if hf_ee else None
        self.full_tokens: dict[int, list[int]] = {}  # prompt index -> our full loop's tokens (the lossless reference)
        self.spec_tokens: list[tuple[str, int, list[int]]] = []

    def run(self, method: str, prompt: torch.Tensor, index: int) -> dict:
        if method in ("hf_generate", self.hf_ee):
            return self._hf(method, prompt)
        if method in self.speculative:
            return self._lossless(method, prompt, index)
        return self._loop(method, prompt, index)

    def _hf(self, method: str, prompt: torch.Tensor) -> dict:
        from transformers import StoppingCriteriaList

        model = self.model
        clock = StepClock(self.device)
        base_cfg = getattr(model.hf, model.hf.base_model_prefix).config
        saved_layers = base_cfg.num_hidden_layers  # HF's early-exit drafter may leave it lowered on errors
        try:
            with torch.inference_mode():
                out, wall = timed(self.device, lambda: model.hf.generate(
                    prompt, attention_mask=torch.ones_like(prompt),
                    generation_config=self.gconf if method == "hf_generate" else self.gconf_ee,
                    stopping_criteria=StoppingCriteriaList([clock])))
        finally:
            base_cfg.num_hidden_layers = saved_layers
        n = out.shape[1] - prompt.shape[1]
        if n != self.new_tokens or (method == "hf_generate" and len(clock.times) != n):
            raise RuntimeError(f"{method} produced {n} tokens / {len(clock.times)} steps, expected {self.new_tokens}")
        # assisted generation checks its stopping criteria once per round: no per-token decode clock
        s_tok = clock.per_step() if method == "hf_generate" else None
        return {"s_per_token": s_tok, "wall_s": wall, "mean_exit_layer": model.final_layer,
                "controller_share": None, "s_per_check": None}

    def _lossless(self, method: str, prompt: torch.Tensor, index: int) -> dict:
        c, k_max, draft_t = self.speculative[method]
        res, wall = timed(self.device, lambda: generate_lossless(
            self.model, prompt, c, self.new_tokens, k_max=k_max, draft_threshold=draft_t,
            kv_strategy=self.cfg.decoding.kv_strategy))
        k = res.counters
        if res.new_tokens != self.new_tokens:
            raise RuntimeError(f"{method} produced {res.new_tokens} tokens, expected {self.new_tokens}")
        self.spec_tokens.append((method, index, list(res.tokens)))
        return {"s_per_token": k["decode_time_s"] / k["decode_steps"], "wall_s": wall,
                "mean_exit_layer": self.model.final_layer, "controller_share": None, "s_per_check": None,
                "drafted": k["drafted"], "accepted": k["accepted"], "rounds": k["rounds"],
                "verified_tokens": k["verified_tokens"], "layers_run": k["layers_run"],
                "decode_steps": k["decode_steps"]}

    def _loop(self, method: str, prompt: torch.Tensor, index: int) -> dict:
        c = self.controllers[method]
        res, wall = timed(self.device, lambda: generate(self.model, prompt, c, self.new_tokens,
                                                        kv_strategy=self.cfg.decoding.kv_strategy))
        k = res.counters
        if res.new_tokens != self.new_tokens:
            raise RuntimeError(f"{method} produced {res.new_tokens} tokens, expected {self.new_tokens}")
        if method == "never":
            self.full_tokens.setdefault(index, list(res.tokens))
        return {"s_per_token": k["decode_time_s"] / k["decode_steps"], "wall_s": wall,
                "mean_exit_layer": statistics.fmean(res.exit_layers[1:]),
                "controller_share": k["controller_time_s"] / k["decode_time_s"] if k["decode_time_s"] else None,
                "s_per_check": k["controller_time_s"] / k["exit_checks"] if k["exit_checks"] else None}

    def check_lossless(self) -> None:
        """Every lossless generation equals the full loop's tokens on its prompt, or the run fails."""
        for method, index, toks in self.spec_tokens:
            if index in self.full_tokens and toks != self.full_tokens[index]:
                raise RuntimeError(f"{method} is not lossless on prompt {index}: {toks} vs the full loop's "
                                   f"{self.full_tokens[index]}")


def _method_rows(runs: dict[str, list[dict]], methods: Sequence[str]) -> dict[str, dict]:
    """Per method: seconds per token (median, quartiles, every run), ratios to HF ``generate`` (of medians
    and the median of paired runs), mean exit layer, the controller's share of the time and per check."""
    hf = [r["s_per_token"] for r in runs["hf_generate"]]
    rows = {}
    for m in methods:
        xs = [r["s_per_token"] for r in runs[m]]
        q = quartiles(xs)
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
    return rows


def _targets(rows: dict[str, dict], runs: dict[str, list[dict]], mid: int) -> dict[str, dict]:
    """never-exit against HF, the middle fixed exit's speed-up, and the policy check's A/B share."""
    pol = [r["s_per_token"] for r in runs["policy_check"]]
    never = [r["s_per_token"] for r in runs["never"]]
    policy_ab = statistics.median([a / b - 1.0 for a, b in zip(pol, never)])
    never_ratio = rows["never"]["ratio_to_hf_paired_median"]
    fixed_speedup = 1.0 / rows[f"fixed@{mid}"]["ratio_to_hf_paired_median"]
    return {
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


def run_benchmark(cfg: Config, *, context_tokens: int = 200, new_tokens: int = 32, num_prompts: int = 4,
                  repeats: int = 5, warmup: int = 1, out_path: Optional[Union[str, Path]] = None,
                  lossless: bool = True, layerskip_layers: Union[str, Sequence[int], None] = None,
                  layerskip_k: Sequence[int] = LAYERSKIP_K, hf_early_exit: bool = True) -> Path:
    """Measure seconds per new token for every method and write the JSON result; returns its path.

    ``lossless``: also the self-speculative methods (``gc_lossless`` at ``eval.gc_thresholds``,
    ``layerskip`` at ``layerskip_layers`` ("mid", "all" or a list; default the middle exit point) x
    ``layerskip_k`` draft lengths, and with ``hf_early_exit`` HF ``assistant_early_exit`` at the
    middle exit point), compared by wall clock in the result's ``lossless`` section."""
    out_path, device, model, model_note, policy, policy_note = setup(
        cfg, out_path, benchmark_path(cfg), context_tokens, new_tokens,
        (("context_tokens", context_tokens, 1), ("new_tokens", new_tokens, 2), ("num_prompts", num_prompts, 1),
         ("repeats", repeats, 1), ("warmup", warmup, 0)))
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt_lists, prompt_note = bench_prompts(cfg, model, num_prompts, context_tokens, gen)
    prompts = [torch.tensor([p], dtype=torch.long, device=device) for p in prompt_lists]

    controllers, conf_t = _controllers(cfg, model, policy)
    mid = middle_exit_layer(model.exit_layers, model.num_layers)
    speculative = _speculative(cfg, model, policy, layerskip_layers, layerskip_k) if lossless else {}
    hf_ee = f"hf_early_exit@{mid}" if lossless and hf_early_exit else None
    methods = ["hf_generate"] + list(controllers) + list(speculative) + ([hf_ee] if hf_ee else [])
    timer = _Methods(cfg, model, device, new_tokens, controllers, speculative, hf_ee, mid)

    with Noise() as noise:  # one group per prompt: every method on it, in a rotated order
        cells = interleaved_rounds([[(m, p) for m in methods] for p in range(num_prompts)], repeats, warmup,
                                   lambda cell: timer.run(cell[0], prompts[cell[1]], cell[1]), warmup_one_group=True)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(repeats):  # per method: round by round, prompt by prompt (the pairing the ratios use)
        for p in range(num_prompts):
            for m in methods:
                runs[m].append(cells[(m, p)][rep])
    timer.check_lossless()

    rows = _method_rows(runs, ["hf_generate"] + list(controllers))
    result = {
        "format": "greencode-benchmark/1",
        "config_name": cfg.name,
        "setup": {"context_tokens": context_tokens, "new_tokens": new_tokens, "num_prompts": num_prompts,
                  "repeats": repeats, "warmup_rounds": warmup, "prompts": prompt_note,
                  "model": model_note, "policy": policy_note, **model_setup(cfg, model, device),
                  "decode_compile": compile_info(model), "confidence_threshold": conf_t,
                  "timing": "decode steps only (tokens 2..N), seconds per new token; interleaved, order rotated"},
        "methods": rows,
        "targets": _targets(rows, runs, mid),
        "lossless": _lossless_section(runs, list(speculative), hf_ee, cfg) if lossless else None,
        "noise": {**noise.record(),
                  "max_relative_iqr": max(r["relative_iqr"] or 0 for r in rows.values())},
    }
    return write_result(out_path, result, cfg=cfg, stage="benchmark", weights=weights_record(model))


def _lossless_section(runs: dict[str, list[dict]], speculative: list[str], hf_ee: Optional[str], cfg: Config) -> dict:
    """The lossless comparison: wall clock per generation (prefill included) of every lossless
    method against our full loop, HF ``generate`` and the best static setting (paired per-run
    ratios), decode-only seconds per token against the full loop, acceptance and draft lengths."""
    names = ["never", "hf_generate"] + speculative + ([hf_ee] if hf_ee else [])
    wall = {m: [r["wall_s"] for r in runs[m]] for m in names}
    dec = {m: [r["s_per_token"] for r in runs[m]] for m in wall}
    static = [m for m in speculative if m.startswith("layerskip@")]
    best_static = min(static, key=lambda m: statistics.median(wall[m])) if static else None
    rows = {}
    for m in wall:
        q = quartiles(wall[m])
        row = {"wall_s_median": q["median"], "wall_s_q1": q["q1"], "wall_s_q3": q["q3"], "wall_s_iqr": q["iqr"],
               "relative_iqr": q["iqr"] / q["median"] if q["median"] else None,
               # speed-up = the reference's time over this method's, median of paired runs
               "speedup_vs_full": paired_median(wall["never"], wall[m]),
               "speedup_vs_hf": paired_median(wall["hf_generate"], wall[m]),
               "speedup_vs_best_static": paired_median(wall[best_static], wall[m]) if best_static else None,
               "decode_speedup_vs_full": (paired_median(dec["never"], dec[m])
                                          if all(x is not None for x in dec[m]) else None),
               "num_runs": len(wall[m]), "wall_s_runs": wall[m]}
        if m in speculative:
            drafted = sum(r["drafted"] for r in runs[m])
            rounds = sum(r["rounds"] for r in runs[m])
            steps = sum(r["decode_steps"] for r in runs[m])
            row.update(acceptance_rate=sum(r["accepted"] for r in runs[m]) / drafted if drafted else None,
                       mean_draft_length=drafted / rounds if rounds else None,
                       verified_tokens_per_token=sum(r["verified_tokens"] for r in runs[m]) / steps if steps else None,
                       layers_run_per_token=sum(r["layers_run"] for r in runs[m]) / steps if steps else None)
        rows[m] = row
    gc_rows = [m for m in speculative if m.startswith("gc_lossless@")]
    best_gc = min(gc_rows, key=lambda m: statistics.median(wall[m])) if gc_rows else None
    targets = {}
    if best_gc:
        v = rows[best_gc]["speedup_vs_full"]
        targets["lossless_vs_full"] = {"value": v, "method": best_gc,
                                       "target": f">= {TARGETS['lossless_vs_full_min_speedup']}",
                                       "met": v >= TARGETS["lossless_vs_full_min_speedup"],
                                       "what": "wall clock of our full loop over the fastest lossless GC threshold's "
                                               "(median of paired runs)"}
        if best_static:
            v = rows[best_gc]["speedup_vs_best_static"]
            targets["lossless_vs_best_static"] = {
                "value": v, "method": best_gc, "static": best_static,
                "target": f">= {TARGETS['lossless_vs_best_static_min_speedup']}",
                "met": v >= TARGETS["lossless_vs_best_static_min_speedup"],
                "what": "wall clock of the fastest static self-speculative setting over the fastest lossless GC's "
                        "(median of paired runs)"}
    return {"methods": rows, "best_static": best_static, "best_gc_lossless": best_gc, "targets": targets,
            "k_max": cfg.eval.lossless_k_max, "draft_threshold": cfg.eval.lossless_draft_threshold,
            "tokens_checked": "every lossless generation equals the full loop's tokens on its prompt",
            "timing": "wall clock per generation (prefill + decode; HF assisted generation cannot separate them); "
                      "decode_speedup_vs_full from the decode-only seconds per token"}


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
    lines += target_noise_lines(result)
    if result.get("lossless"):
        lines += ["", format_lossless_table(result["lossless"])]
    return "\n".join(lines)


def format_lossless_table(section: dict) -> str:
    """The lossless comparison as a text table."""
    lines = [f"Lossless (self-speculative) methods, wall clock per generation; k_max {section['k_max']} for "
             f"gc_lossless, draft threshold {section['draft_threshold']}",
             f"{'method':<24} {'ms/gen':>8} {'IQR ms':>7} {'x full':>7} {'x HF':>6} {'x static':>8} {'dec x full':>10} "
             f"{'accept':>7} {'draft':>6}",
             "-" * 91]
    for m, r in section["methods"].items():
        lines.append(f"{m:<24} {1e3 * r['wall_s_median']:>8.2f} {1e3 * r['wall_s_iqr']:>7.2f} "
                     f"{fmt(r['speedup_vs_full'], '.2f'):>7} {fmt(r['speedup_vs_hf'], '.2f'):>6} "
                     f"{fmt(r['speedup_vs_best_static'], '.2f'):>8} {fmt(r['decode_speedup_vs_full'], '.2f'):>10} "
                     f"{fmt(r.get('acceptance_rate'), '.2f'):>7} {fmt(r.get('mean_draft_length'), '.2f'):>6}")
    lines.append(f"x full / x HF / x static = speed-up (median of paired runs) over our full loop, HF generate and "
                 f"the fastest static setting ({section['best_static']}); dec x full = decode-only; accept = "
                 "accepted / drafted; draft = drafted tokens per round")
    for name, t in section["targets"].items():
        lines.append(f"target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'NOT met'} "
                     f"({t['method']})")
    return "\n".join(lines)

