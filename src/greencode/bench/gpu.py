"""One command for a GPU box: paper-shape correctness, speed, energy and LITE-step checks.

``python scripts/gpu_check.py`` (``make gpu-check``) builds random-initialised models with the
exact Llama-3.2-3B and OPT-2.7B architectures (``configs/hf/*.json``) in bf16, without
downloading anything, and measures in parts, each with its own time budget (a part that fails
is recorded with its error and the others still run):

- ``correctness``: our never-exit loop gives HF ``generate``'s greedy tokens;
- ``latency``: decode time per token at batch 1 and 8 for HF ``generate`` (dynamic cache; static
  cache + ``torch.compile``) and our loop (full model, fixed exits at the first, middle and last
  exit points, a random-init policy of the paper's size at threshold 0.5);
- ``compiled``: our loop with its compiled layer step (``decoding.compile``: ``reduce-overhead``,
  i.e. Inductor kernels replayed as CUDA graphs; ``default`` on the CPU) against the eager loop,
  paired, for the full model, the middle fixed exit and the policy at batch 1 and 8: seconds per
  token, the compile time, and whether the tokens equal the eager loop's;
- ``energy``: joules per token for the full model and the middle fixed exit over steady-state
  windows of a few seconds after warm-up (Zeus when importable, else NVML's energy counter
  through ``nvidia-ml-py``, installed or carried in ``vendor/``);
- ``lite``: a few LITE fine-tuning steps with the paper's settings (bf16, gradient
  checkpointing, batch 4 x 1024): steps/s, tokens/s and peak memory.

Results go to ``results/gpu/<gpu-name>.json`` with hardware, versions and commit; a short
summary is printed. Only torch, transformers and this package's model/decoding/training-loss
modules and its timing harness (:mod:`greencode.bench.timing`, which adds numpy) are imported (no
gymnasium, SB3, codebleu or zeus needed). ``--tiny`` runs the same
code path on the CPU with tiny shapes (what the test suite does); it compiles the first shape only.
"""

from __future__ import annotations

import glob
import json
import math
import os
import platform
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from greencode.bench.timing import Deadline, Stopwatch, best_of, steady_window, sync, timed, write_result
from greencode.config import ExitScheduleConfig
from greencode.training.lite import lite_loss
from greencode.utils import REPO_ROOT as ROOT

SHAPES = ("llama-3.2-3b", "opt-2.7b")
# the paper's exit rules (configs/paper/*.yaml): first exit, stride in the first half, in the second half
SCHEDULES = {"llama-3.2-3b": (3, 2, 4), "opt-2.7b": (3, 2, 4)}
DEFAULT_BUDGETS_S = {"build": 90, "correctness": 45, "latency": 150, "compiled": 150, "energy": 60, "lite": 60}
TOTAL_BUDGET_S = 480.0  # the whole check: 8 minutes
SHAPE_RESERVE_S = 150.0  # kept for each shape still to come when a shape's compiled part starts


# --------------------------------------------------------------------------- models
def hf_config(shape: str, tiny: bool = False):
    """The HF config of a paper shape from ``configs/hf/<shape>.json``; ``tiny`` keeps the
    architecture (family, GQA ratio, rope scaling, tied embeddings) at toy sizes."""
    from transformers import AutoConfig

    path = ROOT / "configs" / "hf" / f"{shape}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it holds the {shape} architecture")
    data = json.loads(path.read_text())
    if tiny:
        heads = 4
        kv = max(1, heads * data.get("num_key_value_heads", data.get("num_attention_heads")) //
                 data["num_attention_heads"])
        data.update(hidden_size=64, num_hidden_layers=6, num_attention_heads=heads, vocab_size=512,
                    max_position_embeddings=min(data.get("max_position_embeddings", 2048), 2048))
        if data["model_type"] == "llama":
            data.update(num_key_value_heads=kv, intermediate_size=128, head_dim=16)
        else:
            data.update(ffn_dim=128, word_embed_proj_dim=64)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if not k.startswith("_")})


def build_model(shape: str, device: torch.device, dtype: torch.dtype, tiny: bool = False):
    """A random-initialised :class:`~greencode.models.EarlyExitModel` of ``shape`` with the
    paper's exit points (``[1, 2, 3]`` on the tiny shape)."""
    from transformers import AutoModelForCausalLM

    from greencode.models import EarlyExitModel, resolve_exit_layers

    cfg = hf_config(shape, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    hf = hf.to(device=device, dtype=dtype).eval()
    n = cfg.num_hidden_layers
    first, s1, s2 = SCHEDULES[shape]
    exits = [1, 2, 3] if tiny else resolve_exit_layers(n, None, ExitScheduleConfig(first, s1, s2))
    return EarlyExitModel(hf, exits)


class RandomPolicy(nn.Module):
    """The paper's policy size (hidden -> 64 -> 64 -> 2, tanh), random init, on normed states."""

    def __init__(self, hidden: int, exit_layers: list[int]):
        super().__init__()
        self.policy_net = nn.Sequential(nn.Linear(hidden, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.action_net = nn.Linear(64, 2)
        self.hidden_size, self.exit_layers, self.observation = hidden, list(exit_layers), "normed"

    def forward(self, obs):
        return self.action_net(self.policy_net(obs))


# --------------------------------------------------------------------------- inputs and per-token timing
def _prompts(vocab: int, batch: int, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (batch, length), generator=g).to(device)


def _per_token(device, run: Callable[[int], Any], new_tokens: int) -> float:
    """Decode seconds per generated token: (time for n tokens - time for 1) / (n - 1), each the
    faster of two timed calls (less noise)."""
    run(2)  # warm-up
    for _ in range(3):  # a busy machine can make the n-token call no slower than the 1-token one: time again
        t1 = best_of(device, lambda: run(1))
        tn = best_of(device, lambda: run(new_tokens))
        if tn > t1:
            return (tn - t1) / (new_tokens - 1)
    raise RuntimeError(f"below the timer's noise: {new_tokens} tokens took {tn:.6f} s, 1 token {t1:.6f} s "
                       "(three tries); time on a quiet machine or with more new tokens")


# --------------------------------------------------------------------------- parts
def part_correctness(model, device, tiny: bool, deadline: Deadline) -> dict:
    from greencode.decoding import NeverExit, generate

    n_new = 8 if tiny else 16
    same, tried = 0, 0
    for seed in range(4):
        if deadline.passed:
            break
        prompt = _prompts(model.vocab_size, 1, 32 if tiny else 128, device, seed)
        ref = model.hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
        ours = generate(model, prompt, NeverExit(), n_new)
        tried += 1
        same += int(ours.tokens == ref.tolist())
    return {"prompts": tried, "identical": same, "ok": tried > 0 and same == tried,
            "what": "greedy never-exit tokens of our loop vs HF generate (KV cache)"}


def _controllers(model, policy) -> dict:
    from greencode.decoding import FixedExit, NeverExit, PolicyExit

    ex = model.exit_layers
    return {"full": NeverExit(), f"fixed@{ex[0]}": FixedExit(ex[0]), f"fixed@{ex[len(ex) // 2]}":
            FixedExit(ex[len(ex) // 2]), f"fixed@{ex[-1]}": FixedExit(ex[-1]),
            "policy@0.5": PolicyExit.of(policy, 0.5)}


def part_latency(model, policy, device, tiny: bool, deadline: Deadline, compile_hf: bool) -> dict:
    from greencode.decoding import generate

    ctx, new = (32, 8) if tiny else (512, 64)
    out: dict[str, Any] = {"context_tokens": ctx, "new_tokens": new, "unit": "seconds per generated token "
                           "(decode only: time(n) - time(1) over n - 1), wall clock with device sync",
                           "batches": {}}
    for batch in (1, 8):
        rows: dict[str, Any] = {}
        prompts = _prompts(model.vocab_size, batch, ctx, device, 1)
        mask = torch.ones_like(prompts)

        def hf_run(n, cache=None):
            kw = {"cache_implementation": cache} if cache else {}
            return model.hf.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0, **kw)

        for name, fn in [("hf_generate_dynamic", lambda n: hf_run(n))]:
            rows[name] = _guarded(lambda: _per_token(device, fn, new), deadline)
        for name, ctrl in _controllers(model, policy).items():
            ids = prompts[0:1] if batch == 1 else prompts
            rows[f"greencode_{name}"] = _guarded(
                lambda: _per_token(device, lambda n: generate(model, ids, ctrl, n), new), deadline)
        if compile_hf and device.type == "cuda":
            def compiled(n):
                return hf_run(n, cache="static")

            orig = model.hf.forward
            try:
                model.hf.forward = torch.compile(orig, mode="reduce-overhead")
                rows["hf_generate_static_compile"] = _guarded(lambda: _per_token(device, compiled, new), deadline)
            finally:
                model.hf.forward = orig
        else:
            rows["hf_generate_static_compile"] = {"skipped": "CUDA only (torch.compile + static cache)"}
        full = rows.get("greencode_full")
        for v in rows.values():
            if isinstance(v, dict) and isinstance(full, dict) and v.get("value") and full.get("value"):
                v["speedup_vs_greencode_full"] = full["value"] / v["value"]
        out["batches"][str(batch)] = rows
    out["lossless"] = _lossless(model, policy, device, ctx, new, deadline)
    return out


def _lossless(model, policy, device, ctx: int, new: int, deadline: Deadline) -> dict:
    """Batch 1, lossless (self-speculative) decoding: drafted by the random-init policy at 0.5
    and by a fixed exit at the middle exit point (LayerSkip-style, k = 4), verified by the full
    model. Seconds per generated token (as above), whether the tokens equal the full model's
    (greedy), acceptance rate and mean draft length."""
    from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate, generate_lossless

    ex = model.exit_layers
    prompt = _prompts(model.vocab_size, 1, ctx, device, 1)
    full = generate(model, prompt, NeverExit(), new).tokens
    rows: dict[str, Any] = {}
    for name, ctrl in (("gc_lossless@0.5", PolicyExit.of(policy, 0.5)),
                       (f"layerskip@{ex[len(ex) // 2]}", FixedExit(ex[len(ex) // 2]))):
        if deadline.passed:
            rows[name] = {"skipped": "part time budget spent"}
            continue
        try:
            res = generate_lossless(model, prompt, ctrl, new, k_max=4)
            row = _guarded(lambda: _per_token(device, lambda n: generate_lossless(model, prompt, ctrl, n, k_max=4),
                                              new), deadline)
            row.update(identical_to_full=res.tokens == full, acceptance_rate=res.counters.get("acceptance_rate"),
                       mean_draft_length=res.counters.get("mean_draft_length"))
            rows[name] = row
        except Exception as e:  # noqa: BLE001 - recorded, the other measurements go on
            rows[name] = {"failed": f"{type(e).__name__}: {e}"}
    return {"batch": 1, "k_max": 4, "methods": rows}


def part_compiled(model, policy, device, tiny: bool, deadline: Deadline) -> dict:
    """Our loop with the compiled layer step against the eager loop, paired (same prompts, one
    after the other): seconds per token, speed-up, compile time, identical tokens."""
    from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate
    from greencode.decoding.compiled import use_compiled_steps

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    ctx, new = (32, 8) if tiny else (512, 64)
    ex = model.exit_layers
    ctrls = {"full": NeverExit(), f"fixed@{ex[len(ex) // 2]}": FixedExit(ex[len(ex) // 2]),
             "policy@0.5": PolicyExit.of(policy, 0.5)}
    out: dict[str, Any] = {"mode": mode, "context_tokens": ctx, "new_tokens": new, "batches": {},
                           "unit": "seconds per generated token (decode only), eager vs compiled layer step"}
    try:
        for batch in (1, 8):
            ids = _prompts(model.vocab_size, batch, ctx, device, 2)
            rows: dict[str, Any] = {}
            for name, ctrl in ctrls.items():
                if deadline.passed:
                    rows[name] = {"skipped": "part time budget spent"}
                    continue
                model.layer_step = None
                eager_tokens = [r.tokens for r in _as_list(generate(model, ids, ctrl, new))]
                eager = _guarded(lambda: _per_token(device, lambda n: generate(model, ids, ctrl, n), new), deadline)
                steps = use_compiled_steps(model, mode)
                got, compile_s = timed(device, lambda: _as_list(generate(model, ids, ctrl, new)))
                compiled = _guarded(lambda: _per_token(device, lambda n: generate(model, ids, ctrl, n), new), deadline)
                row = {"eager_s": eager.get("value"), "compiled_s": compiled.get("value"),
                       "first_call_s": compile_s, "identical_to_eager": [r.tokens for r in got] == eager_tokens,
                       "compile": steps.describe()}
                if row["eager_s"] and row["compiled_s"]:
                    row["speedup"] = row["eager_s"] / row["compiled_s"]
                for key, r in (("eager", eager), ("compiled", compiled)):
                    if "value" not in r:
                        row[f"{key}_error"] = r
                rows[name] = row
            out["batches"][str(batch)] = rows
    finally:
        model.layer_step = None
    return out


def _as_list(res):
    return res if isinstance(res, list) else [res]


def _guarded(fn: Callable[[], float], deadline: Deadline) -> dict:
    if deadline.passed:
        return {"skipped": "part time budget spent"}
    try:
        return {"value": float(fn())}
    except Exception as e:  # noqa: BLE001 - one failing measurement must not stop the others
        return {"failed": f"{type(e).__name__}: {e}"}


def _energy_reader(device: torch.device):
    """(name, read() -> joules since some origin) for the GPU, or raise with the reason."""
    if device.type != "cuda":
        raise RuntimeError("no CUDA device: GPU energy is not measured (never estimated)")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    try:  # Zeus when the environment has it (it needs scikit-learn, pandas, ... at import)
        from zeus.monitor import ZeusMonitor

        return "zeus", None, ZeusMonitor(gpu_indices=[idx])
    except Exception:  # noqa: BLE001 - zeus absent or unusable: the same NVML counter directly
        pass
    for wheel in sorted(glob.glob(str(ROOT / "vendor" / "nvidia_ml_py-*.whl"))):
        if wheel not in sys.path:
            sys.path.append(wheel)  # a pure-Python wheel imports from the zip
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(idx)

    def read() -> float:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0  # mJ -> J

    read()
    return "nvml (nvidia-ml-py)", read, None


def part_energy(model, device, tiny: bool, deadline: Deadline, window_s: float) -> dict:
    from greencode.decoding import FixedExit, NeverExit, generate

    source, read, monitor = _energy_reader(device)
    ex = model.exit_layers
    prompt = _prompts(model.vocab_size, 1, 32 if tiny else 512, device, 2)
    new = 8 if tiny else 64
    out: dict[str, Any] = {"source": source, "window_s": window_s, "new_tokens_per_generation": new, "methods": {}}
    for name, ctrl in (("full", NeverExit()), (f"fixed@{ex[len(ex) // 2]}", FixedExit(ex[len(ex) // 2]))):
        if deadline.passed:
            out["methods"][name] = {"skipped": "part time budget spent"}
            continue
        for _ in range(3):  # warm-up
            generate(model, prompt, ctrl, new)
        sync(device)
        if monitor is not None:
            monitor.begin_window(name)
        else:
            e0 = read()
        tokens, elapsed = steady_window(device, lambda: len(generate(model, prompt, ctrl, new).tokens), window_s)
        joules = monitor.end_window(name).total_energy if monitor is not None else read() - e0
        out["methods"][name] = {"joules_per_token": joules / tokens, "tokens": tokens, "seconds": elapsed,
                                "watts": joules / elapsed}
    m = out["methods"]
    full, mid = m.get("full", {}), m.get(f"fixed@{ex[len(ex) // 2]}", {})
    if "joules_per_token" in full and "joules_per_token" in mid:
        out["fixed_mid_energy_vs_full"] = mid["joules_per_token"] / full["joules_per_token"]
    return out


def part_lite(model, device, tiny: bool, deadline: Deadline) -> dict:
    from greencode.models import EarlyExitModel, lite_weights

    hf = model.hf  # trains in place: LITE is the last part run on a model
    ee = EarlyExitModel(hf, model.exit_layers)
    hf.train()
    if hasattr(hf, "gradient_checkpointing_enable"):
        hf.gradient_checkpointing_enable()
    weights = lite_weights(ee.exit_layers, ee.num_layers, "geometric", [0.7, 0.2, 0.1], 0.9)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    batch, seq = (2, 64) if tiny else (4, 1024)
    ids = _prompts(ee.vocab_size, batch, seq, device, 3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(2 + (2 if tiny else 5)):
        if deadline.passed:
            break
        clock = Stopwatch(device)
        loss, _ = lite_loss(ee, ids, weights=weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:  # the first two are warm-up
            times.append(clock.elapsed)
    hf.eval()
    out = {"batch_size": batch, "seq_len": seq, "dtype": str(next(hf.parameters()).dtype).replace("torch.", ""),
           "gradient_checkpointing": True, "optimizer": "AdamW lr 1e-5", "timed_steps": len(times),
           "loss_finite": bool(math.isfinite(float(loss)))}
    if times:
        s = sum(times) / len(times)
        out.update(seconds_per_step=s, steps_per_s=1.0 / s, tokens_per_s=batch * seq / s)
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# --------------------------------------------------------------------------- driver
def environment(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    try:
        import subprocess

        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    return info


def _run_part(name: str, fn: Callable[[Deadline], dict], budget_s: float) -> dict:
    deadline = Deadline(budget_s)
    try:
        res = fn(deadline)
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=4)}
    res["seconds"] = round(deadline.elapsed, 2)
    res["budget_s"] = budget_s
    return res


def _skipped_part(reason: str) -> dict:
    """The record of a part that was not run: status ``skipped``, no budget, no time, and ``reason``."""
    return {"status": "skipped", "budget_s": 0, "seconds": 0.0, "reason": reason}


def _check_shape(k: int, shape: str, shapes: Sequence[str], run: Callable[..., dict], device: torch.device,
                 dtype: torch.dtype, tiny: bool, *, compile_hf: bool, energy_window_s: float,
                 compiled_shapes: Optional[Sequence[str]]) -> dict:
    """The result's entry for ``shape`` (the ``k``-th of ``shapes``): the record of each part
    (``build``, then, when the model was built, ``correctness``, ``latency``, ``energy``, ``lite``
    for the first shape and ``compiled``), each run through ``run(name, fn, reserve)``; the model
    is let go at the end."""
    entry: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    def build(_deadline):
        holder["model"] = build_model(shape, device, dtype, tiny)
        m = holder["model"]
        holder["policy"] = RandomPolicy(m.hidden_size, m.exit_layers).to(device)
        return {"num_layers": m.num_layers, "exit_layers": m.exit_layers, "hidden_size": m.hidden_size,
                "parameters_b": sum(p.numel() for p in m.parameters()) / 1e9}

    entry["build"] = run("build", build)
    if "model" not in holder:
        return entry
    m, pol = holder["model"], holder["policy"]
    with torch.inference_mode():
        entry["correctness"] = run("correctness", lambda d: part_correctness(m, device, tiny, d))
        entry["latency"] = run("latency", lambda d: part_latency(m, pol, device, tiny, d, compile_hf))
        entry["energy"] = run("energy", lambda d: part_energy(m, device, tiny, d, energy_window_s))
    if shape == shapes[0]:  # one LITE measurement (the first shape) keeps the check within minutes
        entry["lite"] = run("lite", lambda d: part_lite(m, device, tiny, d))
    if compiled_shapes is not None and shape not in compiled_shapes:
        entry["compiled"] = _skipped_part(f"compiled for {', '.join(compiled_shapes) or 'no shape'} only"
                                          + (" (--tiny: compiling on the CPU is most of its time; "
                                             "tests/test_decoding_compiled.py covers both families)"
                                             if tiny else ""))
    else:
        with torch.inference_mode():
            entry["compiled"] = run("compiled", lambda d: part_compiled(m, pol, device, tiny, d),
                                    reserve=SHAPE_RESERVE_S * (len(shapes) - 1 - k))
    del holder["model"], m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def _result_path(environment_info: dict, tiny: bool, out: Optional[Path]) -> Path:
    """Where the result is written: ``out`` when given, else ``results/gpu/<gpu-name>.json``
    (``cpu-tiny`` or ``cpu`` in place of the GPU's name without one)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", environment_info.get("gpu", "cpu-tiny" if tiny else "cpu")).strip("-")
    return Path(out) if out is not None else ROOT / "results" / "gpu" / f"{name.lower()}.json"


def run_check(*, tiny: bool = False, shapes=SHAPES, out: Optional[Path] = None, budgets: Optional[dict] = None,
              energy_window_s: float = 4.0, compile_hf: bool = True, total_budget_s: float = TOTAL_BUDGET_S,
              compiled_shapes: Optional[Sequence[str]] = None) -> dict:
    """Run every part for every shape (the compiled part for ``compiled_shapes`` only, when given); write and
    return the result.

    Each part runs under its own budget and within ``total_budget_s`` for the whole check: the
    compiled part (the one whose time is hard to foresee: compiling) comes last in each shape and
    leaves ``SHAPE_RESERVE_S`` for every shape still to come; a part with no time left is recorded
    as skipped."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budgets = {**DEFAULT_BUDGETS_S, **(budgets or {})}
    check = Deadline(total_budget_s)
    result: dict[str, Any] = {"format": "greencode-gpu-check/1", "tiny": tiny, "dtype": str(dtype).split(".")[-1],
                              "environment": environment(device), "total_budget_s": total_budget_s, "shapes": {}}

    def run(name: str, fn: Callable[[Deadline], dict], reserve: float = 0.0) -> dict:
        left = check.left - reserve
        if left < 5:
            return _skipped_part(f"the check's total budget ({total_budget_s:.0f} s) is spent"
                                 + (f", keeping {reserve:.0f} s for the shapes still to run" if reserve else ""))
        return _run_part(name, fn, min(budgets[name], left))

    for k, shape in enumerate(shapes):
        result["shapes"][shape] = _check_shape(k, shape, shapes, run, device, dtype, tiny, compile_hf=compile_hf,
                                               energy_window_s=energy_window_s, compiled_shapes=compiled_shapes)
    result["total_seconds"] = round(check.elapsed, 1)
    out = _result_path(result["environment"], tiny, out)
    # random-initialised models: no weights to record; the environment above names commit and versions
    write_result(out, json.loads(json.dumps(result, default=str)))
    result["written_to"] = str(out)
    return result


def summary_lines(result: dict) -> list[str]:
    env = result["environment"]
    lines = [f"GREEN-CODE GPU check on {env.get('gpu', env['device'])} ({result['dtype']}), torch {env['torch']}, "
             f"transformers {env['transformers']}, {result['total_seconds']} s"]
    for shape, e in result["shapes"].items():
        lines.append(f"{shape}:")
        for part in ("build", "correctness", "latency", "energy", "lite", "compiled"):
            p = e.get(part)
            if p is None:
                continue
            if p["status"] == "skipped":
                lines.append(f"  {part}: skipped ({p['reason']})")
                continue
            if p["status"] != "ok":
                lines.append(f"  {part}: FAILED {p['error']}")
                continue
            if part == "correctness":
                lines.append(f"  correctness: {p['identical']}/{p['prompts']} prompts identical to HF generate")
            elif part == "latency":
                for b, rows in p["batches"].items():
                    cells = [f"{k.replace('greencode_', '')} {v['value'] * 1e3:.2f}" for k, v in rows.items()
                             if isinstance(v, dict) and "value" in v]
                    lines.append(f"  ms/token batch {b}: " + ", ".join(cells))
                lossless = p.get("lossless", {}).get("methods", {})
                cells = [f"{k} {v['value'] * 1e3:.2f} (identical {v.get('identical_to_full')}, accepted "
                         f"{v.get('acceptance_rate') or 0:.2f})" for k, v in lossless.items() if "value" in v]
                if cells:
                    lines.append("  lossless ms/token batch 1: " + ", ".join(cells))
            elif part == "compiled":
                for b, rows in p["batches"].items():
                    cells = [f"{k} {v['eager_s'] * 1e3:.2f} -> {v['compiled_s'] * 1e3:.2f} (same tokens "
                             f"{v['identical_to_eager']})" for k, v in rows.items()
                             if v.get("eager_s") and v.get("compiled_s")]
                    lines.append(f"  compiled ({p['mode']}) ms/token batch {b}: " + ", ".join(cells))
            elif part == "energy":
                cells = [f"{k} {v['joules_per_token']:.3f} J/token" for k, v in p["methods"].items()
                         if "joules_per_token" in v]
                lines.append(f"  energy ({p['source']}): " + ", ".join(cells))
            elif part == "lite" and "steps_per_s" in p:
                mem = f", peak {p['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in p else ""
                lines.append(f"  LITE: {p['steps_per_s']:.2f} steps/s, {p['tokens_per_s']:.0f} tokens/s{mem}")
            elif part == "build":
                lines.append(f"  {p['parameters_b']:.2f}B parameters, {p['num_layers']} layers, exits {p['exit_layers']}")
    lines.append(f"-> {result.get('written_to')}")
    return lines
