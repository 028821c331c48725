"""Running methods on samples: the run's inputs (fine-tuned model, tokenizer, base model, exit
policy and classifier), the seeded samples, each sample's prompt, and :class:`Runner` (one method on
one prompt, one record).

The evaluator (:mod:`greencode.eval.evaluator`) and the teacher-forced pass
(:mod:`greencode.eval.forced`) both build on this module; it imports neither.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import greencode.data as data
from greencode.config import Config, ConfigError
from greencode.decoding import compute_cost, generate, generate_lossless
from greencode.decoding.compiled import use_compiled_steps
from greencode.decoding.registry import Resources, get_controller
from greencode.eval.methods import MethodSpec, controller_of
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.rl import load_policy


# --------------------------------------------------------------------------- inputs
@dataclass
class EvalInputs:
    """Everything the methods need. ``None`` fields are missing inputs, with the reason."""

    model: Any  # EarlyExitModel (fine-tuned)
    tokenizer: Any
    base: Any = None  # EarlyExitModel of the base model
    base_reason: Optional[str] = None
    policy: Any = None  # exported exit policy (nn.Module with .observation)
    policy_reason: Optional[str] = None
    classifier: Any = None  # the supervised exit classifier (an ExitPolicy), trained beside the agent
    classifier_reason: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def _load_tokenizer(paths: RunPaths):
    from transformers import AutoTokenizer

    for d in (paths.finetuned, paths.base_model, paths.tokenizer):
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(d))
    raise FileNotFoundError(f"no tokenizer in {str(paths.finetuned)!r} (nor the base model or tokenizer folders); "
                            "run the pipeline first: `python scripts/reproduce.py --config <cfg>` or scripts/finetune.py")


def require_finetuned(cfg: Config, paths: Optional[RunPaths] = None) -> RunPaths:
    """The run's paths, once its fine-tuned model is there; else a FileNotFoundError naming the stage to run
    (checked before any slow preparation, e.g. building the corpus)."""
    paths = paths or RunPaths.from_config(cfg)
    if not (paths.finetuned / "config.json").is_file():
        raise FileNotFoundError(f"no fine-tuned model in {str(paths.finetuned)!r}; run `python scripts/finetune.py "
                                f"--config {cfg.source_path or '<cfg>'}` (or scripts/reproduce.py) first")
    return paths


def load_inputs(cfg: Config, paths: RunPaths, device: torch.device, dtype: torch.dtype, *,
                need_base: bool = True, need_policy: bool = True) -> EvalInputs:
    """Load the fine-tuned model (required), tokenizer, base model and policy (optional)."""
    require_finetuned(cfg, paths)
    tokenizer = _load_tokenizer(paths)
    model = EarlyExitModel.from_run_config(cfg, paths.finetuned, device=device, dtype=dtype).eval()
    use_compiled_steps(model, cfg.decoding.compile)
    inputs = EvalInputs(model=model, tokenizer=tokenizer)
    if need_base:
        source = cfg.model.base or str(paths.base_model)
        try:
            # the config's exit points (only HF generate runs on the base model; they must just be valid)
            inputs.base = EarlyExitModel.from_run_config(cfg, source, device=device, dtype=dtype).eval()
        except (FileNotFoundError, OSError, ValueError, ConfigError) as e:
            inputs.base_reason = f"base model {source!r} could not be loaded: {e}"
    if need_policy:  # the RL policy and the supervised classifier (same file format)
        inputs.policy, inputs.policy_reason = _load_exit_policy(paths.policy, model)
        inputs.classifier, inputs.classifier_reason = _load_exit_policy(paths.classifier, model)
    return inputs


def _load_exit_policy(path: Path, model) -> tuple[Any, Optional[str]]:
    """(the exported policy, None) or (None, why it cannot be used)."""
    try:
        return load_policy(path, model), None
    except ImportError as e:
        return None, f"greencode.rl is not available ({e})"
    except (FileNotFoundError, ValueError) as e:
        return None, str(e)


def load_samples(cfg: Config, tokenizer) -> list:
    """The seeded line-completion samples (``greencode.data.samples_for_config``, looked up at each call)."""
    fn = getattr(data, "samples_for_config", None)
    if fn is None:
        raise FileNotFoundError("greencode.data.samples_for_config is not available; the data stage is missing")
    samples = list(fn(cfg, tokenizer))
    if not samples:
        raise ValueError(f"no evaluation samples for config {cfg.name!r} (split {cfg.eval.split!r}); check the corpus "
                         "and eval.num_samples")
    return samples


class _RowCounter:
    """Counts the token rows every decoder layer and the LM head process (forward hooks),
    to measure the layer work of HF's speculative early exit without trusting a model."""

    def __init__(self, model):
        self.model = model
        self.layer_rows = 0
        self.head_rows = 0
        self._handles: list = []

    def __enter__(self):
        def layer_hook(_m, args, kwargs, _out):
            h = args[0] if args else kwargs.get("hidden_states")
            self.layer_rows += int(h.shape[-2]) if h is not None and h.dim() >= 2 else 1

        def head_hook(_m, args, _out):
            self.head_rows += int(args[0].shape[-2]) if args[0].dim() >= 2 else 1

        self._handles = [layer.register_forward_hook(layer_hook, with_kwargs=True) for layer in self.model.layers]
        self._handles.append(self.model.adapter.lm_head.register_forward_hook(head_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False


def _full_step_macs(model) -> int:
    cm = model.cost_model()
    return model.num_layers * cm["layer_macs"] + cm["lm_head_macs"]


class Runner:
    """Runs one method on one prompt and returns a record (without accuracy metrics)."""

    def __init__(self, inputs: EvalInputs, cfg: Config, meter, eos_token_id: Optional[int], pad_token_id: Optional[int]):
        self.inputs = inputs
        self.cfg = cfg
        self.meter = meter
        self.eos = eos_token_id
        self.pad = pad_token_id if pad_token_id is not None else eos_token_id
        self.model = inputs.model
        self.full_macs = _full_step_macs(self.model)
        self.resources = Resources(policy=inputs.policy, classifier=inputs.classifier,
                                   policy_temperature=cfg.decoding.policy_temperature,
                                   candidates={"source": cfg.rl.candidate_source, "k": int(cfg.rl.candidate_k)})
        self._controllers: dict[str, Any] = {}

    # controllers are built once per method (PolicyExit holds the policy), from the registry
    def controller(self, spec: MethodSpec):
        if spec.id in self._controllers:
            return self._controllers[spec.id]
        name = controller_of(spec.family)  # a lossless family: the controller that drafts for it
        if name is None:
            raise ValueError(f"method {spec.id!r} does not run in the decoding loop")
        c = get_controller(name).build(spec.param, self.resources)
        c.check_layers(self.model)  # validates layer/shape now, not mid-run
        self._controllers[spec.id] = c
        return c

    def run(self, spec: MethodSpec, prompt: list[int], window: str, prefilled=None) -> dict:
        """One generation. ``window`` None: not timed (accuracy only; ``prefilled`` may carry
        the shared full-model prefill of ``prompt`` for the loop methods)."""
        if spec.runs_hf:
            return self._run_hf(spec, prompt, window)
        if spec.lossless:
            return self._run_lossless(spec, self.controller(spec), prompt, window)
        return self._run_loop(spec, self.controller(spec), prompt, window, prefilled)

    def _run_lossless(self, spec: MethodSpec, controller, prompt: list[int], window: Optional[str]) -> dict:
        """Self-speculative decoding (greencode.decoding.generate_lossless): drafted by ``controller``,
        verified by the full model; the cost counts drafting, verification and rejected tokens."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)
        res, m = self._measured(window, lambda: generate_lossless(
            self.model, ids, controller, self.cfg.eval.max_new_tokens, k_max=self.cfg.eval.lossless_k_max,
            draft_threshold=self.cfg.eval.lossless_draft_threshold,
            eos_token_id=self.eos, kv_strategy=self.cfg.decoding.kv_strategy))
        cost = self._cost(res, controller)
        return self._record(res.tokens, m, len(prompt), None, res.finish_reason, dict(res.counters), cost)

    def _cost(self, res, controller) -> dict:
        """One record's cost, the same accounting for every loop method (lossless included):
        :func:`greencode.decoding.compute_cost`'s MACs and the layer steps against the full model's."""
        cost = compute_cost(self.model, [res], controller)
        steps = res.counters["decode_steps"]
        return {"decode_steps": steps, "layers_run": res.counters["layers_run"],
                "layer_steps_full": steps * self.model.num_layers, "macs_done": cost["macs_done"],
                "macs_full": cost["macs_full"]}

    def _measured(self, window: Optional[str], fn: Callable[[], Any]):
        if window is None:
            return fn(), None
        with self.meter.window(window) as w:
            out = fn()
        return out, w.measurement

    def _record(self, tokens: list[int], measurement, prompt_len: int, exit_layers, finish, counters, cost) -> dict:
        m = measurement
        return {"new_tokens": len(tokens), "tokens": list(tokens), "exit_layers": exit_layers, "finish_reason": finish,
                "prompt_tokens": prompt_len, "timed": m is not None,
                "latency_s": m.latency_s if m else None, "energy_j": m.energy_j if m else None,
                "gpu_energy_j": m.gpu_energy_j if m else None, "cpu_energy_j": m.cpu_energy_j if m else None,
                "energy_note": m.note if m else "not timed (accuracy-only sample)", "counters": counters,
                "cost": cost}

    def _run_loop(self, spec: MethodSpec, controller, prompt: list[int], window: Optional[str],
                  prefilled=None) -> dict:
        ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)
        res, m = self._measured(window, lambda: generate(
            self.model, ids, controller, self.cfg.eval.max_new_tokens, eos_token_id=self.eos,
            kv_strategy=self.cfg.decoding.kv_strategy, prefilled=prefilled))
        cost = self._cost(res, controller)
        return self._record(res.tokens, m, len(prompt), list(res.exit_layers), res.finish_reason, dict(res.counters),
                            cost)

    def run_rows(self, specs: Sequence[MethodSpec], prompts: Sequence[list[int]]) -> list[list[dict]]:
        """Loop methods on some prompts, untimed: one row per (prompt, method) in one batched
        decode, each prompt prefilled once (the same tokens as separate runs, tested). Returns
        one list of records (in ``specs`` order) per prompt."""
        ctrls = [self.controller(s) for s in specs]  # one instance per method: its rows decide together
        rows = [(p, c) for p in prompts for c in ctrls]
        results = generate(self.model, [p for p, _ in rows], [c for _, c in rows], self.cfg.eval.max_new_tokens,
                           eos_token_id=self.eos, kv_strategy=self.cfg.decoding.kv_strategy)
        out = []
        for (prompt, ctrl), res in zip(rows, results):
            cost = self._cost(res, ctrl)
            out.append(self._record(res.tokens, None, len(prompt), list(res.exit_layers), res.finish_reason,
                                    dict(res.counters), cost))
        return [out[k * len(ctrls):(k + 1) * len(ctrls)] for k in range(len(prompts))]

    def _run_hf(self, spec: MethodSpec, prompt: list[int], window: Optional[str]) -> dict:
        from transformers import GenerationConfig

        model = self.inputs.base if spec.family == "base" else self.model
        gen = dict(max_new_tokens=self.cfg.eval.max_new_tokens, do_sample=False, num_beams=1,
                   eos_token_id=self.eos, pad_token_id=self.pad)
        if spec.family == "hf_early_exit":
            gen["assistant_early_exit"] = int(spec.param) + 1  # HF counts layers; ours is the 0-based exit layer
        gc = GenerationConfig(**gen)
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        mask = torch.ones_like(ids)
        counter = _RowCounter(model) if spec.family == "hf_early_exit" else contextlib.nullcontext()
        # HF's early-exit drafter lowers config.num_hidden_layers while drafting and does not restore it when
        # drafting raises (transformers 5.23), which would corrupt every later run on this model: restore it here
        base_cfg = getattr(model.hf, model.hf.base_model_prefix).config
        saved_layers = base_cfg.num_hidden_layers
        try:
            with torch.inference_mode(), counter:
                out, m = self._measured(window, lambda: model.hf.generate(ids, attention_mask=mask,
                                                                          generation_config=gc))
        finally:
            base_cfg.num_hidden_layers = saved_layers
        tokens = out[0, ids.shape[1]:].tolist()
        steps = max(len(tokens) - 1, 0)
        cm = model.cost_model()
        if spec.family == "hf_early_exit":
            # all layer/head work minus the full-model prefill every method does (prompt rows x all layers + 1 head row)
            layer_rows = counter.layer_rows - len(prompt) * model.num_layers
            head_rows = counter.head_rows - 1
            cost = {"decode_steps": steps, "layers_run": layer_rows, "layer_steps_full": steps * model.num_layers,
                    "macs_done": layer_rows * cm["layer_macs"] + head_rows * cm["lm_head_macs"],
                    "macs_full": steps * self.full_macs}
            exit_layers = None  # every token is verified by the full model
        else:
            cost = {"decode_steps": steps, "layers_run": steps * model.num_layers,
                    "layer_steps_full": steps * model.num_layers, "macs_done": steps * _full_step_macs(model),
                    "macs_full": steps * self.full_macs}
            exit_layers = [model.final_layer] * len(tokens)
        finish = "eos" if (self.eos is not None and tokens and tokens[-1] == self.eos) else "length"
        return self._record(tokens, m, len(prompt), exit_layers, finish, None, cost)


def prompt_of(sample, limit: Optional[int], max_new: int) -> list[int]:
    """A sample's prompt ids, cut from the left so that ``max_new`` more tokens fit ``limit`` positions."""
    ids = [int(t) for t in (sample.context_ids.tolist() if hasattr(sample.context_ids, "tolist")
                            else sample.context_ids)]
    if limit and len(ids) + max_new > limit:
        ids = ids[len(ids) + max_new - limit:]
    if not ids:
        raise ValueError(f"sample {sample.id!r} has an empty context; the data stage must give at least one token")
    return ids
