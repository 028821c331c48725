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

:func:`run_throughput` is the batched mode: tokens per second when the same prompts are decoded
1, 4, 8, 16 at a time (left-padded ragged batches), for our loop (full model and GC) and HF
``generate`` batched with an attention mask.

Works before any training: without the run's fine-tuned model it uses a randomly
initialised model of the config's shape and random prompts; without an exported policy a
random MLP of ``rl.ppo.net_arch``.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from greencode.config import Config
from greencode.decoding.compiled import compile_info, use_compiled_steps
from greencode.paths import RunPaths
from greencode.eval.timing import Noise, interleaved_rounds, paired_median, quartiles, sync, write_result
from greencode.provenance import weights_record
from greencode.utils import REPO_ROOT, run_metadata, set_seed, setup_torch

log = logging.getLogger(__name__)

TARGETS = {
    "never_vs_hf_max_ratio": 1.0,  # never-exit seconds/token <= 1.0 x HF generate
    "fixed_middle_min_speedup": 1.5,  # fixed exit at the middle exit point >= 1.5x faster than HF generate
    "policy_check_max_share": 0.05,  # the MLP policy check <= 5% of a token's time
    # issue 13: lossless GC (its fastest threshold), wall clock per generation
    "lossless_vs_full_min_speedup": 1.5,
    "lossless_vs_best_static_min_speedup": 1.15,
}
THROUGHPUT_TARGETS = {
    "batch8_vs_batch1_min_ratio": 3.0,  # issue 14: tokens/s at batch 8 >= 3x batch 1 (full model)
    "gc_vs_full_batch8_min_ratio": 1.0,  # GC still saves wall time over the full model at batch 8
}
LAYERSKIP_K = (2, 4, 6, 8)


def benchmark_path(cfg: Config) -> Path:
    """``results/benchmark/<config name>.json`` (next to ``results/<name>``)."""
    results = Path(cfg.results_dir)
    results = results if results.is_absolute() else REPO_ROOT / results
    return results.parent / "benchmark" / f"{cfg.name}.json"


def middle_exit_layer(exit_layers: list[int], num_layers: int) -> int:
    """The exit layer closest to the middle of the model (0-based; ties go to the earlier)."""
    mid = (num_layers - 1) / 2
    return min(exit_layers, key=lambda e: (abs(e - mid), e))


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


def _load_model(cfg: Config, paths: RunPaths, device, dtype):
    from greencode.models import EarlyExitModel

    if (paths.finetuned / "config.json").is_file():
        model = EarlyExitModel.from_run_config(cfg, paths.finetuned, device=device, dtype=dtype).eval()
        use_compiled_steps(model, cfg.decoding.compile)
        return model, f"fine-tuned model {paths.finetuned}"
    model = EarlyExitModel.from_config(cfg.model, vocab_size=cfg.tokenizer.vocab_size, bos_token_id=0,
                                       eos_token_id=2, pad_token_id=1)
    note = "randomly initialised model of the config's shape (no fine-tuned model in the run folder yet)"
    if cfg.model.base:
        note += f"; model.base={cfg.model.base!r} is not loaded, the shape fields of model.* are used"
    model = model.to(device=device, dtype=dtype).eval()
    use_compiled_steps(model, cfg.decoding.compile)
    return model, note


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


def bench_prompts(cfg: Config, model, num_prompts: int, context_tokens: int, gen: torch.Generator,
                  lengths: Optional[Sequence[int]] = None) -> tuple[list[list[int]], str]:
    """Prompts for the speed benchmarks: with a trained model, code contexts from the validation
    split's tuning slice (the first samples of its seeded order; the test split is never read),
    each the last ``context_tokens`` (or ``lengths[i]``) tokens of a sample whose context is long
    enough; otherwise (a random model, or no corpus yet) uniform random token ids. Early exits,
    and so the lossless methods' drafts, behave on code as they do in use, not as on noise."""
    want = list(lengths) if lengths is not None else [context_tokens] * num_prompts
    if (RunPaths.from_config(cfg).finetuned / "config.json").is_file():
        try:
            from greencode.data import load_tokenizer
            from greencode.data.samples import samples_for_config

            sub = dataclasses.replace(cfg, eval=dataclasses.replace(
                cfg.eval, split="validation", num_samples=4 * num_prompts + 8, sample_offset=0,
                context_fraction=0.6, max_context_tokens=max(want)))
            samples = samples_for_config(sub, load_tokenizer(cfg))
            ctx = [list(map(int, s.context_ids)) for s in samples]
            out = []
            for n in want:
                pick = next((c for c in ctx if len(c) >= n and c not in out), None)
                if pick is None:
                    raise ValueError(f"no validation sample with {n} context tokens")
                out.append(pick[-n:])
            return out, (f"code: the last {context_tokens} tokens of the first validation samples' contexts "
                         "(tuning slice; 60% of the file as context)")
        except (OSError, ValueError, KeyError) as e:
            log.warning("benchmark prompts: no code contexts (%s); using random token ids", e)
    return ([torch.randint(3, model.vocab_size, (n,), generator=gen).tolist() for n in want],
            "uniform random token ids (seeded)")


def _setup(cfg: Config, out_path: Union[str, Path], context_tokens: int, new_tokens: int,
           checks: Sequence[tuple[str, Any, int]]):
    """Check the integer arguments (name, value, minimum), that the output folder is writable and
    that the prompt fits the model; seed; load the model and the policy. Returns (out_path, device,
    model, model note, policy, policy note)."""
    from greencode.eval.summary import check_writable

    for name, v, low in checks:
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name}={v!r} must be an integer >= {low}")
    out_path = Path(out_path)
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
    return out_path, device, model, model_note, policy, policy_note


def run_benchmark(cfg: Config, *, context_tokens: int = 200, new_tokens: int = 32, num_prompts: int = 4,
                  repeats: int = 5, warmup: int = 1, out_path: Optional[Union[str, Path]] = None,
                  lossless: bool = True, layerskip_layers: Union[str, Sequence[int], None] = None,
                  layerskip_k: Sequence[int] = LAYERSKIP_K, hf_early_exit: bool = True) -> Path:
    """Measure seconds per new token for every method and write the JSON result; returns its path.

    ``lossless``: also the self-speculative methods (``gc_lossless`` at ``eval.gc_thresholds``,
    ``layerskip`` at ``layerskip_layers`` ("mid", "all" or a list; default the middle exit point) x
    ``layerskip_k`` draft lengths, and with ``hf_early_exit`` HF ``assistant_early_exit`` at the
    middle exit point), compared by wall clock in the result's ``lossless`` section."""
    from transformers import GenerationConfig, StoppingCriteriaList

    from greencode.decoding import ConfidenceExit, FixedExit, NeverExit, PolicyExit, generate, generate_lossless

    out_path, device, model, model_note, policy, policy_note = _setup(
        cfg, out_path if out_path is not None else benchmark_path(cfg), context_tokens, new_tokens,
        (("context_tokens", context_tokens, 1), ("new_tokens", new_tokens, 2), ("num_prompts", num_prompts, 1),
         ("repeats", repeats, 1), ("warmup", warmup, 0)))
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt_lists, prompt_note = bench_prompts(cfg, model, num_prompts, context_tokens, gen)
    prompts = [torch.tensor([p], dtype=torch.long, device=device) for p in prompt_lists]

    conf_t = sorted(cfg.eval.confidence_thresholds)[len(cfg.eval.confidence_thresholds) // 2] \
        if cfg.eval.confidence_thresholds else 0.9
    controllers: dict[str, Any] = {"never": NeverExit()}
    for layer in model.exit_layers:
        controllers[f"fixed@{layer}"] = FixedExit(layer)
    controllers[f"confidence@{conf_t:g}"] = ConfidenceExit(conf_t)
    controllers["policy_check"] = PolicyExit.of(policy, 0.5, cfg.decoding.policy_temperature, ignore_decision=True)
    for c in controllers.values():
        c.check_layers(model)
    methods = ["hf_generate"] + list(controllers)
    mid = middle_exit_layer(model.exit_layers, model.num_layers)
    # lossless methods: name -> (drafting controller, k_max, draft threshold); HF's assisted early exit apart
    speculative: dict[str, tuple[Any, int, Optional[float]]] = {}
    hf_ee: Optional[str] = None
    if lossless:
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
        if hf_early_exit:
            hf_ee = f"hf_early_exit@{mid}"
    methods += list(speculative) + ([hf_ee] if hf_ee else [])
    pad = model.hf.config.pad_token_id
    gconf = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad if pad is not None else 0, eos_token_id=model.hf.config.eos_token_id)
    gconf_ee = None
    if hf_ee:  # HF counts layers; ours is the 0-based exit layer
        gconf_ee = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    num_beams=1, pad_token_id=pad if pad is not None else 0,
                                    eos_token_id=model.hf.config.eos_token_id, assistant_early_exit=mid + 1)
    full_tokens: dict[int, list[int]] = {}  # prompt index -> our full loop's tokens (the lossless reference)
    spec_tokens: list[tuple[str, int, list[int]]] = []

    def run(method: str, prompt: torch.Tensor, index: int) -> dict:
        if method in ("hf_generate", hf_ee):
            clock = _StepClock(device)
            base_cfg = getattr(model.hf, model.hf.base_model_prefix).config
            saved_layers = base_cfg.num_hidden_layers  # HF's early-exit drafter may leave it lowered on errors
            try:
                sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                            generation_config=gconf if method == "hf_generate" else gconf_ee,
                                            stopping_criteria=StoppingCriteriaList([clock]))
                sync(device)
                wall = time.perf_counter() - t0
            finally:
                base_cfg.num_hidden_layers = saved_layers
            n = out.shape[1] - prompt.shape[1]
            if n != new_tokens or (method == "hf_generate" and len(clock.times) != n):
                raise RuntimeError(f"{method} produced {n} tokens / {len(clock.times)} steps, expected {new_tokens}")
            # assisted generation checks its stopping criteria once per round: no per-token decode clock
            s_tok = (clock.times[-1] - clock.times[0]) / (n - 1) if method == "hf_generate" else None
            return {"s_per_token": s_tok, "wall_s": wall, "mean_exit_layer": model.final_layer,
                    "controller_share": None, "s_per_check": None}
        if method in speculative:
            c, k_max, draft_t = speculative[method]
            sync(device)
            t0 = time.perf_counter()
            res = generate_lossless(model, prompt, c, new_tokens, k_max=k_max, draft_threshold=draft_t,
                                    kv_strategy=cfg.decoding.kv_strategy)
            sync(device)
            wall = time.perf_counter() - t0
            k = res.counters
            if res.new_tokens != new_tokens:
                raise RuntimeError(f"{method} produced {res.new_tokens} tokens, expected {new_tokens}")
            spec_tokens.append((method, index, list(res.tokens)))
            return {"s_per_token": k["decode_time_s"] / k["decode_steps"], "wall_s": wall,
                    "mean_exit_layer": model.final_layer, "controller_share": None, "s_per_check": None,
                    "drafted": k["drafted"], "accepted": k["accepted"], "rounds": k["rounds"],
                    "verified_tokens": k["verified_tokens"], "layers_run": k["layers_run"],
                    "decode_steps": k["decode_steps"]}
        c = controllers[method]
        sync(device)
        t0 = time.perf_counter()
        res = generate(model, prompt, c, new_tokens, kv_strategy=cfg.decoding.kv_strategy)
        sync(device)
        wall = time.perf_counter() - t0
        k = res.counters
        if res.new_tokens != new_tokens:
            raise RuntimeError(f"{method} produced {res.new_tokens} tokens, expected {new_tokens}")
        if method == "never":
            full_tokens.setdefault(index, list(res.tokens))
        return {"s_per_token": k["decode_time_s"] / k["decode_steps"], "wall_s": wall,
                "mean_exit_layer": statistics.fmean(res.exit_layers[1:]),
                "controller_share": k["controller_time_s"] / k["decode_time_s"] if k["decode_time_s"] else None,
                "s_per_check": k["controller_time_s"] / k["exit_checks"] if k["exit_checks"] else None}

    with Noise() as noise:  # one group per prompt: every method on it, in a rotated order
        cells = interleaved_rounds([[(m, p) for m in methods] for p in range(num_prompts)], repeats, warmup,
                                   lambda cell: run(cell[0], prompts[cell[1]], cell[1]), warmup_one_group=True)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(repeats):  # per method: round by round, prompt by prompt (the pairing the ratios use)
        for p in range(num_prompts):
            for m in methods:
                runs[m].append(cells[(m, p)][rep])
    for method, index, toks in spec_tokens:  # lossless: the full loop's tokens on every prompt, or the run fails
        if index in full_tokens and toks != full_tokens[index]:
            raise RuntimeError(f"{method} is not lossless on prompt {index}: {toks} vs the full loop's "
                               f"{full_tokens[index]}")

    hf = [r["s_per_token"] for r in runs["hf_generate"]]
    never = [r["s_per_token"] for r in runs["never"]]
    rows = {}
    for m in ["hf_generate"] + list(controllers):
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
                  "repeats": repeats, "warmup_rounds": warmup, "prompts": prompt_note,
                  "model": model_note, "policy": policy_note, "num_layers": model.num_layers,
                  "exit_layers": list(model.exit_layers), "hidden_size": model.hidden_size,
                  "vocab_size": model.vocab_size, "family": model.family, "device": str(device),
                  "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
                  "kv_strategy": cfg.decoding.kv_strategy, "decode_compile": compile_info(model),
                  "confidence_threshold": conf_t,
                  "timing": "decode steps only (tokens 2..N), seconds per new token; interleaved, order rotated"},
        "methods": rows,
        "targets": targets,
        "lossless": _lossless_section(runs, list(speculative), hf_ee, cfg) if lossless else None,
        "noise": {**noise.record(),
                  "max_relative_iqr": max(r["relative_iqr"] or 0 for r in rows.values())},
        "run_metadata": run_metadata(cfg, stage="benchmark", weights=weights_record(model)),
    }
    return write_result(out_path, result)


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
    for name, t in result["targets"].items():
        extra = f" (timers: {100 * t['timer_share']:.1f}%)" if t.get("timer_share") is not None else ""
        lines.append(f"target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'NOT met'}{extra}")
    n = result["noise"]
    lines.append(f"noise: load average {n['load_average_before']} -> {n['load_average_after']}, max relative IQR "
                 f"{n['max_relative_iqr']:.2f}, wall {n['wall_s']:.1f} s")
    if result.get("lossless"):
        lines += ["", format_lossless_table(result["lossless"])]
    return "\n".join(lines)


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_lossless_table(section: dict) -> str:
    """The lossless comparison as a text table."""
    lines = [f"Lossless (self-speculative) methods, wall clock per generation; k_max {section['k_max']} for "
             f"gc_lossless, draft threshold {section['draft_threshold']}",
             f"{'method':<24} {'ms/gen':>8} {'IQR ms':>7} {'x full':>7} {'x HF':>6} {'x static':>8} {'dec x full':>10} "
             f"{'accept':>7} {'draft':>6}",
             "-" * 91]
    for m, r in section["methods"].items():
        lines.append(f"{m:<24} {1e3 * r['wall_s_median']:>8.2f} {1e3 * r['wall_s_iqr']:>7.2f} "
                     f"{_fmt(r['speedup_vs_full'], '.2f'):>7} {_fmt(r['speedup_vs_hf'], '.2f'):>6} "
                     f"{_fmt(r['speedup_vs_best_static'], '.2f'):>8} {_fmt(r['decode_speedup_vs_full'], '.2f'):>10} "
                     f"{_fmt(r.get('acceptance_rate'), '.2f'):>7} {_fmt(r.get('mean_draft_length'), '.2f'):>6}")
    lines.append(f"x full / x HF / x static = speed-up (median of paired runs) over our full loop, HF generate and "
                 f"the fastest static setting ({section['best_static']}); dec x full = decode-only; accept = "
                 "accepted / drafted; draft = drafted tokens per round")
    for name, t in section["targets"].items():
        lines.append(f"target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'NOT met'} "
                     f"({t['method']})")
    return "\n".join(lines)


# ------------------------------------------------------------------ throughput (batched decoding)

def throughput_path(cfg: Config) -> Path:
    """``results/benchmark/throughput_<config name>.json`` (the markdown table next to it)."""
    return benchmark_path(cfg).with_name(f"throughput_{cfg.name}.json")


def _parse_sizes(sizes: Union[str, Sequence[int]]) -> list[int]:
    if isinstance(sizes, str):
        sizes = [x for x in sizes.split(",") if x.strip()]
    try:
        out = [int(x) for x in sizes]
    except ValueError:
        raise ValueError(f"batch sizes {sizes!r} must be integers, e.g. 1,4,8,16") from None
    if not out or any(b < 1 for b in out):
        raise ValueError(f"batch sizes {out} must be integers >= 1")
    return sorted(set(out))


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
    from transformers import GenerationConfig

    from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate

    sizes = _parse_sizes(batch_sizes)
    num_prompts = max(sizes) if num_prompts is None else num_prompts
    out_path, device, model, model_note, policy, policy_note = _setup(
        cfg, out_path if out_path is not None else throughput_path(cfg), context_tokens, new_tokens,
        (("context_tokens", context_tokens, 4), ("new_tokens", new_tokens, 2), ("num_prompts", num_prompts, 1),
         ("repeats", repeats, 1), ("warmup", warmup, 0)))
    if gc_threshold is None:
        ts = sorted(cfg.eval.gc_thresholds)
        gc_threshold = ts[len(ts) // 2] if ts else 0.9
    gc_threshold = float(gc_threshold)
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
    pad = model.hf.config.pad_token_id
    pad = pad if pad is not None else 0
    gconf = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=model.hf.config.eos_token_id)
    tokens: dict[tuple[str, int], list[list[int]]] = {}  # (method, batch size) -> each prompt's tokens

    def batches(size: int) -> list[list[list[int]]]:
        return [prompts[i:i + size] for i in range(0, num_prompts, size)]

    def run(method: str, size: int) -> float:
        """Wall seconds to decode every prompt, ``size`` at a time."""
        out: list[list[int]] = []
        sync(device)
        t0 = time.perf_counter()
        for chunk in batches(size):
            if method == "hf_generate":
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, width - len(p):] = torch.tensor(p)
                    mask[r, width - len(p):] = 1
                with torch.inference_mode():
                    gen_ids = model.hf.generate(ids.to(device), attention_mask=mask.to(device), generation_config=gconf)
                out += [row[width:].tolist() for row in gen_ids]
            else:
                res = generate(model, chunk if len(chunk) > 1 else chunk[0], controllers[method], new_tokens,
                               kv_strategy=cfg.decoding.kv_strategy)
                out += [r.tokens for r in (res if isinstance(res, list) else [res])]
        sync(device)
        wall = time.perf_counter() - t0
        if len(out) != num_prompts or any(len(t) != new_tokens for t in out):
            raise RuntimeError(f"{method} at batch {size} produced {[len(t) for t in out]} tokens, expected "
                               f"{new_tokens} for each of {num_prompts} prompts")
        tokens.setdefault((method, size), out)
        return wall

    with Noise() as noise:  # one group per batch size: every method at it, in a rotated order
        walls = interleaved_rounds([[(m, b) for m in methods] for b in sizes], repeats, warmup,
                                   lambda cell: run(*cell))

    total = num_prompts * new_tokens
    tps = {key: [total / w for w in ws] for key, ws in walls.items()}
    gc_name = methods[1]
    rows: dict[str, dict[str, dict]] = {}
    for m in methods:
        rows[m] = {}
        for b in sizes:
            q = quartiles(tps[(m, b)])
            same = sum(t == u for t, u in zip(tokens[(m, b)], tokens[(m, sizes[0])]))
            rows[m][str(b)] = {
                "tokens_per_s_median": q["median"], "tokens_per_s_q1": q["q1"], "tokens_per_s_q3": q["q3"],
                "tokens_per_s_iqr": q["iqr"], "relative_iqr": q["iqr"] / q["median"] if q["median"] else None,
                f"ratio_to_batch_{sizes[0]}": paired_median(tps[(m, b)], tps[(m, sizes[0])]),
                "ratio_to_hf": paired_median(tps[(m, b)], tps[("hf_generate", b)]),
                "ratio_to_full": paired_median(tps[(m, b)], tps[("full", b)]),
                f"rows_equal_to_batch_{sizes[0]}": same / num_prompts,
                "num_runs": len(tps[(m, b)]), "tokens_per_s_runs": tps[(m, b)]}
    targets = {}
    if 8 in sizes and 1 in sizes:
        v = rows["full"]["8"]["ratio_to_batch_1"]
        targets["batch8_vs_batch1"] = {"value": v, "target": f">= {THROUGHPUT_TARGETS['batch8_vs_batch1_min_ratio']}",
                                       "met": v >= THROUGHPUT_TARGETS["batch8_vs_batch1_min_ratio"],
                                       "gc_value": rows[gc_name]["8"]["ratio_to_batch_1"],
                                       "what": "full model tokens/s at batch 8 over batch 1 (median of paired rounds)"}
    if 8 in sizes:
        v = rows[gc_name]["8"]["ratio_to_full"]
        targets["gc_vs_full_batch8"] = {"value": v, "target": f"> {THROUGHPUT_TARGETS['gc_vs_full_batch8_min_ratio']}",
                                        "met": v > THROUGHPUT_TARGETS["gc_vs_full_batch8_min_ratio"],
                                        "what": f"{gc_name} tokens/s over the full model's at batch 8 (median of "
                                                "paired rounds)"}
    if 8 in sizes:
        fixed_name = methods[2]
        v = rows[fixed_name]["8"]["ratio_to_full"]
        targets["fixed_vs_full_batch8"] = {"value": v, "target": "> 1.0", "met": v > 1.0,
                                           "batch1_value": rows[fixed_name][str(sizes[0])]["ratio_to_full"],
                                           "what": f"{fixed_name} tokens/s over the full model's at batch 8: rows that "
                                                   "exited skip the deeper layers in a batch too"}
    result = {
        "format": "greencode-throughput/1",
        "config_name": cfg.name,
        "setup": {"batch_sizes": sizes, "num_prompts": num_prompts, "prompt_lengths": lengths,
                  "context_tokens": context_tokens, "new_tokens": new_tokens, "repeats": repeats,
                  "warmup_rounds": warmup, "prompts": f"{prompt_note}; ragged lengths in [3/4, 1] x context_tokens, "
                                                      "left-padded per batch",
                  "model": model_note, "policy": policy_note, "gc_threshold": gc_threshold,
                  "num_layers": model.num_layers, "exit_layers": list(model.exit_layers),
                  "hidden_size": model.hidden_size, "vocab_size": model.vocab_size, "family": model.family,
                  "device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
                  "torch_threads": torch.get_num_threads(), "kv_strategy": cfg.decoding.kv_strategy,
                  "decode_compile": compile_info(model),
                  "timing": "wall clock of the whole workload (every prompt, prefill + decode), decoded B prompts "
                            "per call; tokens/s = prompts x new_tokens / wall; interleaved, order rotated",
                  "hf": "model.hf.generate, left padding + attention mask, greedy, min_new_tokens = max_new_tokens"},
        "methods": rows,
        "targets": targets,
        "noise": {**noise.record(),
                  "max_relative_iqr": max(r["relative_iqr"] or 0 for m in rows.values() for r in m.values())},
        "run_metadata": run_metadata(cfg, stage="throughput", weights=weights_record(model)),
    }
    return write_result(out_path, result, format_throughput_markdown)


def _shape_line(s: dict) -> str:
    """The model and machine a benchmark's ``setup`` describes, for its markdown header."""
    return (f"{s['family']}, {s['num_layers']} layers, exits {s['exit_layers']} (0-based), hidden {s['hidden_size']}, "
            f"{s['device']} {s['dtype']}, {s['torch_threads']} threads")


def _md_header(title: str, result: dict, prompts: str) -> list[str]:
    """A benchmark table's title and the line saying what ran on what."""
    s, meta = result["setup"], result.get("run_metadata", {})
    return [f"# {title}", "",
            f"{_shape_line(s)}; {prompts}, {s['new_tokens']} new tokens each, {s['repeats']} interleaved rounds; "
            f"model: {s['model']}; policy: {s['policy']}; commit {meta.get('git_commit')}.", ""]


def format_throughput_markdown(result: dict) -> str:
    """The throughput result as a markdown table."""
    s = result["setup"]
    sizes = s["batch_sizes"]
    base = sizes[0]
    lines = _md_header(f"Throughput: {result['config_name']}", result,
                       f"{s['num_prompts']} prompts of {min(s['prompt_lengths'])}-{max(s['prompt_lengths'])} tokens") + [
             f"| method | batch | tokens/s | IQR | x batch {base} | x HF | x full | rows = batch {base} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, by_size in result["methods"].items():
        for b, r in by_size.items():
            lines.append(f"| {m} | {b} | {r['tokens_per_s_median']:.1f} | {r['tokens_per_s_iqr']:.1f} | "
                         f"{_fmt(r[f'ratio_to_batch_{base}'], '.2f')} | {_fmt(r['ratio_to_hf'], '.2f')} | "
                         f"{_fmt(r['ratio_to_full'], '.2f')} | {r[f'rows_equal_to_batch_{base}']:.2f} |")
    lines += ["", f"Ratios are medians of paired (same round) tokens/s ratios. {s['timing']}. rows = batch {base}: "
                  f"share of prompts whose tokens equal their tokens at batch {base}.", ""]
    for name, t in result["targets"].items():
        lines.append(f"- target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'NOT met'}")
    n = result["noise"]
    lines.append(f"- noise: load average {n['load_average_before']} -> {n['load_average_after']}, max relative IQR "
                 f"{n['max_relative_iqr']:.2f}, wall {n['wall_s']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- compiled layer steps
def compiled_path(cfg: Config) -> Path:
    """``results/benchmark/compiled_<config name>.json`` (the markdown table next to it)."""
    return benchmark_path(cfg).with_name(f"compiled_{cfg.name}.json")


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
    from transformers import GenerationConfig, StoppingCriteriaList

    from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate
    from greencode.decoding.compiled import COMPILE_MODES, use_compiled_steps

    sizes = _parse_sizes(batch_sizes)
    out_path, device, model, model_note, policy, policy_note = _setup(
        cfg, out_path if out_path is not None else compiled_path(cfg), context_tokens, new_tokens,
        (("context_tokens", context_tokens, 1), ("new_tokens", new_tokens, 2), ("num_prompts", num_prompts, 1),
         ("repeats", repeats, 1), ("warmup", warmup, 1)))
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in COMPILE_MODES or mode == "off":
        raise ValueError(f"compile mode {mode!r}; choose one of {', '.join(m for m in COMPILE_MODES if m != 'off')}")
    if gc_threshold is None:
        ts = sorted(cfg.eval.gc_thresholds)
        gc_threshold = ts[len(ts) // 2] if ts else 0.9
    gc_threshold = float(gc_threshold)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(3, model.vocab_size, (context_tokens,), generator=gen).tolist()
               for _ in range(num_prompts)]
    mid = middle_exit_layer(list(model.exit_layers), model.num_layers)
    controllers = {"full": NeverExit(), f"fixed@{mid}": FixedExit(mid),
                   f"gc@{gc_threshold!r}": PolicyExit.of(policy, gc_threshold, cfg.decoding.policy_temperature)}
    for c in controllers.values():
        c.check_layers(model)
    steps = use_compiled_steps(model, mode)
    pad = model.hf.config.pad_token_id
    gconf = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad if pad is not None else 0, eos_token_id=model.hf.config.eos_token_id)
    methods = [(name, impl) for name in controllers for impl in ("eager", "compiled")]
    reference: dict[tuple[str, int, int], tuple] = {}  # (method, batch, chunk) -> eager tokens and exits
    agree: dict[tuple[str, int], list[int]] = {}  # (method, batch) -> [compiled chunks equal to eager, compared]
    compile_s: dict[str, float] = {}

    def run(name: str, impl: str, size: int) -> Optional[float]:
        """Median seconds per decode step over the chunks of ``size`` prompts."""
        if name == "hf_generate":
            per = []
            for p in prompts:
                ids = torch.tensor([p], device=device)
                clock = _StepClock(device)
                with torch.inference_mode():
                    model.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gconf,
                                      stopping_criteria=StoppingCriteriaList([clock]))
                per.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
            return statistics.median(per)
        model.layer_step = steps if impl == "compiled" else None
        per = []
        for k in range(0, num_prompts, size):
            chunk = prompts[k:k + size]
            t0 = time.perf_counter()
            res = generate(model, chunk if len(chunk) > 1 else chunk[0], controllers[name], new_tokens,
                           kv_strategy=cfg.decoding.kv_strategy)
            wall = time.perf_counter() - t0
            res = res if isinstance(res, list) else [res]
            got = ([r.tokens for r in res], [r.exit_layers for r in res])
            key = (name, size, k)
            if impl == "eager":
                reference[key] = got
            elif key in reference:
                a = agree.setdefault((name, size), [0, 0])
                a[0] += got == reference[key]
                a[1] += 1
                compile_s.setdefault(f"{name}@{size}", wall)  # the first compiled call of this shape compiles
            per.append(res[0].counters["decode_time_s"] / (new_tokens - 1))
        model.layer_step = None
        return statistics.median(per)

    order = [(n, i, b) for b in sizes for n, i in methods] + ([("hf_generate", "eager", 1)] if 1 in sizes else [])
    with Noise() as noise:  # one group: every (method, eager or compiled, batch size), in a rotated order
        times = interleaved_rounds([order], repeats, warmup, lambda cell: run(*cell))
    rows: dict[str, dict] = {}
    for size in sizes:
        for name in controllers:
            e, c = times[(name, "eager", size)], times[(name, "compiled", size)]
            a = agree.get((name, size), [0, 0])
            row = {"eager_s_per_step": quartiles(e), "compiled_s_per_step": quartiles(c),
                   "eager_tokens_per_s": size / statistics.median(e), "compiled_tokens_per_s": size / statistics.median(c),
                   "speedup": paired_median(e, c), "identical_chunks": a[0], "compared_chunks": a[1],
                   "first_compiled_call_s": compile_s.get(f"{name}@{size}")}
            if size == 1 and ("hf_generate", "eager", 1) in times:
                hf = times[("hf_generate", "eager", 1)]
                row["compiled_vs_hf"] = paired_median(hf, c)
                row["eager_vs_hf"] = paired_median(hf, e)
            rows.setdefault(name, {})[str(size)] = row
    hf_row = ({"s_per_token": quartiles(times[("hf_generate", "eager", 1)])}
              if ("hf_generate", "eager", 1) in times else None)
    full_c = {b: statistics.median(times[("full", "compiled", b)]) for b in sizes}
    exits_save = {f"fixed@{mid}": {}, f"gc@{gc_threshold!r}": {}}
    for name in exits_save:
        for b in sizes:
            exits_save[name][str(b)] = full_c[b] / statistics.median(times[(name, "compiled", b)])
    result = {
        "format": "greencode-compiled/1",
        "config_name": cfg.name,
        "setup": {"mode": mode, "batch_sizes": sizes, "num_prompts": num_prompts, "context_tokens": context_tokens,
                  "new_tokens": new_tokens, "repeats": repeats, "warmup_rounds": warmup,
                  "prompts": "uniform random token ids (seeded), equal lengths", "model": model_note,
                  "policy": policy_note, "gc_threshold": gc_threshold, "num_layers": model.num_layers,
                  "exit_layers": list(model.exit_layers), "hidden_size": model.hidden_size, "family": model.family,
                  "device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
                  "torch_threads": torch.get_num_threads(), "kv_strategy": cfg.decoding.kv_strategy,
                  "compile": steps.describe(),
                  "timing": "seconds per decode step (tokens 2..N) from the loop's decode_time_s, median over the "
                            "chunks of a round; tokens/s = batch / s per step; HF generate at batch 1 from its "
                            "step clock; interleaved rounds, order rotated; speed-ups = medians of paired ratios"},
        "methods": rows,
        "hf_generate_batch1": hf_row,
        "compiled_exit_speedup_over_compiled_full": exits_save,
        "all_identical": all(a[0] == a[1] and a[1] > 0 for a in agree.values()),
        "noise": noise.record(),
        "run_metadata": run_metadata(cfg, stage="compiled-benchmark", weights=weights_record(model)),
    }
    return write_result(out_path, result, format_compiled_markdown)


def format_compiled_markdown(result: dict) -> str:
    """The compiled-vs-eager result as a markdown table."""
    s = result["setup"]
    lines = _md_header(f"Compiled layer steps: {result['config_name']}", result,
                       f"torch.compile mode `{s['mode']}`; {s['num_prompts']} prompts of {s['context_tokens']} tokens") + [
             "| method | batch | eager ms/step | compiled ms/step | compiled tokens/s | speed-up | "
             "compiled x HF (batch 1) | same tokens | first compiled call s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, by_size in result["methods"].items():
        for b, r in by_size.items():
            lines.append(f"| {m} | {b} | {r['eager_s_per_step']['median'] * 1e3:.2f} | "
                         f"{r['compiled_s_per_step']['median'] * 1e3:.2f} | {r['compiled_tokens_per_s']:.0f} | "
                         f"{_fmt(r['speedup'], '.2f')} | {_fmt(r.get('compiled_vs_hf'), '.2f')} | "
                         f"{r['identical_chunks']}/{r['compared_chunks']} | {_fmt(r['first_compiled_call_s'], '.1f')} |")
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
