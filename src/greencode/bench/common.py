"""What the decoding benchmarks (:mod:`~greencode.bench.decoding`, :mod:`~greencode.bench.throughput`,
:mod:`~greencode.bench.compiled`) share: where their results go, loading the run's model and policy
(or random ones of the config's shape), their prompts, HF ``generate``'s per-step clock and greedy
settings, the ``setup`` lines and the markdown header."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from greencode.bench.timing import Stopwatch
from greencode.config import Config
from greencode.data import load_tokenizer
from greencode.data.samples import samples_for_config
from greencode.decoding.compiled import use_compiled_steps
from greencode.eval.summary import check_writable
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.rl import ExitPolicy, load_policy
from greencode.utils import REPO_ROOT, set_seed, setup_torch

log = logging.getLogger(__name__)


RANDOM_INIT_SUFFIX = "_random_init"  # a benchmark of a random model (no fine-tuned one yet), beside the run's own


def benchmark_path(cfg: Config) -> Path:
    """``results/benchmark/<config name>.json`` (next to ``results/<name>``)."""
    results = Path(cfg.results_dir)
    results = results if results.is_absolute() else REPO_ROOT / results
    return results.parent / "benchmark" / f"{cfg.name}.json"


def middle_exit_layer(exit_layers: list[int], num_layers: int) -> int:
    """The exit layer closest to the middle of the model (0-based; ties go to the earlier)."""
    mid = (num_layers - 1) / 2
    return min(exit_layers, key=lambda e: (abs(e - mid), e))


class StepClock:
    """A stopping criterion for HF ``generate`` that never stops and stamps every generation step
    (it is called right after each token is chosen; the device is synchronized first)."""

    def __init__(self, device: torch.device):
        self.watch = Stopwatch(device)

    @property
    def times(self) -> list[float]:
        return self.watch.stamps

    def per_step(self) -> float:
        """Seconds per decode step: from the first token's stamp to the last's (the prefill apart)."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def __call__(self, input_ids, scores, **kwargs):
        self.watch.stamp()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_greedy_config(model, new_tokens: int, **extra):
    """HF ``generate``'s settings for a benchmark: greedy, exactly ``new_tokens`` new tokens."""
    from transformers import GenerationConfig

    pad = model.hf.config.pad_token_id
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad if pad is not None else 0, eos_token_id=model.hf.config.eos_token_id,
                            **extra)


def model_setup(cfg: Config, model, device) -> dict:
    """What every decoding benchmark's ``setup`` says about the model and the machine."""
    return {"num_layers": model.num_layers, "exit_layers": list(model.exit_layers), "hidden_size": model.hidden_size,
            "vocab_size": model.vocab_size, "family": model.family, "device": str(device),
            "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
            "kv_strategy": cfg.decoding.kv_strategy}


def median_gc_threshold(cfg: Config, given: Optional[float] = None) -> float:
    """``given``, else the middle of ``eval.gc_thresholds`` (0.9 without any)."""
    if given is None:
        ts = sorted(cfg.eval.gc_thresholds)
        given = ts[len(ts) // 2] if ts else 0.9
    return float(given)


def load_bench_model(cfg: Config, paths: RunPaths, device, dtype):
    """The run's fine-tuned model, else a random one of the config's shape; (model, what it is)."""
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


def load_bench_policy(cfg: Config, paths: RunPaths, model):
    """The run's exported policy, else a random MLP of ``rl.ppo.net_arch``; (policy, what it is)."""
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


def setup(cfg: Config, out_path: Optional[Union[str, Path]], default_path: Path, context_tokens: int,
          new_tokens: int, checks: Sequence[tuple[str, Any, int]]):
    """Check the integer arguments (name, value, minimum), that the output folder is writable and
    that the prompt fits the model; seed; load the model and the policy. Returns (out_path, device,
    model, model note, policy, policy note). Without ``out_path`` the result goes to ``default_path``,
    or, when the run has no fine-tuned model yet and a random one is timed, beside it with a
    ``_random_init`` suffix: a random model's timings never replace a trained run's committed result."""
    for name, v, low in checks:
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name}={v!r} must be an integer >= {low}")
    paths = RunPaths.from_config(cfg)
    if out_path is None and not (paths.finetuned / "config.json").is_file():
        out_path = default_path.with_name(f"{default_path.stem}{RANDOM_INIT_SUFFIX}{default_path.suffix}")
        log.warning("no fine-tuned model in %s: timing a random model of the config's shape, written to %s "
                    "(train the run first, e.g. make demo, for the run's own benchmark)", paths.finetuned, out_path)
    out_path = Path(out_path if out_path is not None else default_path)
    check_writable(out_path.parent)
    set_seed(cfg.seed)
    device, dtype = setup_torch(cfg.hardware)
    model, model_note = load_bench_model(cfg, paths, device, dtype)
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    if limit and context_tokens + new_tokens > limit:
        raise ValueError(f"context_tokens ({context_tokens}) + new_tokens ({new_tokens}) exceed the model's "
                         f"{limit} positions; use a shorter context")
    policy, policy_note = load_bench_policy(cfg, paths, model)
    return out_path, device, model, model_note, policy, policy_note


def fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def parse_sizes(sizes: Union[str, Sequence[int]]) -> list[int]:
    if isinstance(sizes, str):
        sizes = [x for x in sizes.split(",") if x.strip()]
    try:
        out = [int(x) for x in sizes]
    except ValueError:
        raise ValueError(f"batch sizes {sizes!r} must be integers, e.g. 1,4,8,16") from None
    if not out or any(b < 1 for b in out):
        raise ValueError(f"batch sizes {out} must be integers >= 1")
    return sorted(set(out))


def shape_line(s: dict) -> str:
    """The model and machine a benchmark's ``setup`` describes, for its markdown header."""
    return (f"{s['family']}, {s['num_layers']} layers, exits {s['exit_layers']} (0-based), hidden {s['hidden_size']}, "
            f"{s['device']} {s['dtype']}, {s['torch_threads']} threads")


def batch_rows(result: dict, cells) -> list[str]:
    """One markdown table row per (method, batch size) of ``result["methods"]``: ``| method | batch | cells(r) |``."""
    return [f"| {m} | {b} | {cells(r)} |" for m, by_size in result["methods"].items() for b, r in by_size.items()]


def target_noise_lines(result: dict, bullet: str = "") -> list[str]:
    """A benchmark's verdict on each target (met or not, with its decode-only or timer variant where it has
    one) and the noise it ran under, one line each, prefixed by ``bullet``."""
    lines = []
    for name, t in result["targets"].items():
        extra = ""
        if t.get("decode_value") is not None:
            extra = f" (decode only: {t['decode_value']:.3f})"
        elif t.get("timer_share") is not None:
            extra = f" (timers: {100 * t['timer_share']:.1f}%)"
        lines.append(f"{bullet}target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'NOT met'}{extra}")
    n = result["noise"]
    lines.append(f"{bullet}noise: load average {n['load_average_before']} -> {n['load_average_after']}, max relative "
                 f"IQR {n['max_relative_iqr']:.2f}, wall {n['wall_s']:.1f} s")
    return lines


def md_header(title: str, result: dict, prompts: str) -> list[str]:
    """A benchmark table's title and the line saying what ran on what."""
    s, meta = result["setup"], result.get("run_metadata", {})
    return [f"# {title}", "",
            f"{shape_line(s)}; {prompts}, {s['new_tokens']} new tokens each, {s['repeats']} interleaved rounds; "
            f"model: {s['model']}; policy: {s['policy']}; commit {meta.get('git_commit')}.", ""]

