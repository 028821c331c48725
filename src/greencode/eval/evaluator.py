"""The evaluator: every method on the same seeded line-completion samples, in one run.

Methods (ids in :mod:`greencode.eval.methods`): the base model and the fine-tuned model with
all layers through HF ``generate``; the fine-tuned model with all layers, fixed exits,
confidence and entropy exits, the oracle and GC(T) through our decoding loop; HF's own
self-speculative early exit (``assistant_early_exit``) as a peer. Every baseline uses the KV
cache; all decoding is greedy with ``eval.max_new_tokens``.

Same samples for every row: every method decodes every sample (HF ``generate``'s rows too: by
default ``eval.accuracy_only_hf`` lists every HF family), so each row of the table and each point of
a figure is scored on the same samples. Scoring the HF rows on the timed subset only would be
cheaper but would leave them on other samples than the rest (the Pareto figure once showed HF
``generate`` at 30 samples beside our identical loop at 500); the summary guards this
(:func:`greencode.eval.summary.common_samples`): if a config leaves an HF family to the timed samples,
every row is scored on the samples all methods decoded, with a note.

Fairness of the timing: samples are processed one at a time and, for each sample, every
method runs on it back to back in a seeded random order drawn per sample (so no method
always runs first or last, or next to the same neighbours, while the machine's load drifts); warmup runs on the first
``eval.warmup_samples`` samples are thrown away; one energy/time window covers exactly one
generation (never a single policy call). The controller's overhead is reported from the
loop's aggregated timers and from an A/B run at a middle GC threshold: the policy evaluated
but its decision ignored vs. not evaluated at all, same samples, order alternating.

Sharding: under ``accelerate launch --multi_gpu --num_processes N scripts/evaluate.py ...``
(GPUs) or ``torchrun --nproc_per_node N scripts/evaluate.py ...`` (CPU or GPU) rank ``r``
takes samples ``i % N == r``, writes a shard, and rank 0 merges the shards
(:func:`greencode.eval.summary.merge_shards`) and writes the results. Nothing is written
into ``results/<name>/eval`` until everything is computed (temporary folder, then rename).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from greencode.calibrated import calibrated_ids, criteria_of, load_calibration, render_targets, targets_table
from greencode.config import Config, config_from_dict
from greencode.decoding import NeverExit, PolicyExit
from greencode.decoding.compiled import compile_info
from greencode.decoding.registry import threshold_grid
from greencode.distributed import Dist
from greencode.energy import make_meter
from greencode.eval.forced import teacher_forced
from greencode.eval.hull import write_hull
from greencode.eval.methods import MethodSpec, expand_methods, needs, parse_method_name, split_names
from greencode.eval.metrics import check_language
# the run's inputs and the Runner live in runner.py (shared with the teacher-forced pass); imported here by name,
# so ``from greencode.eval.evaluator import EvalInputs, load_inputs, ...`` keeps working
from greencode.eval.runner import EvalInputs, Runner, load_inputs, load_samples, prompt_of
from greencode.eval.showcase import write_completions
from greencode.eval.summary import SHARD_FORMAT, check_writable, merge_shards, summary_table, write_results
from greencode.paths import RunPaths
from greencode.provenance import weights_record
from greencode.runinfo import run_metadata
from greencode.training.shipping import check_split_disjoint
from greencode.utils import read_json, set_seed, setup_torch, write_json, write_text

log = logging.getLogger(__name__)


def _check_lossless(records: dict, active: Sequence[MethodSpec]) -> None:
    """A lossless method must give the full model's tokens on every sample: a mismatch fails the run."""
    if "full" not in records:
        return
    full = {r["index"]: r["tokens"] for r in records["full"]}
    for spec in active:
        if not spec.lossless:
            continue
        for r in records.get(spec.id, []):
            if r["index"] in full and r["tokens"] != full[r["index"]]:
                raise RuntimeError(f"{spec.id} is not lossless on sample {r['index']}: {r['tokens']} vs the full "
                                   f"model's {full[r['index']]}")


def _decode(tokenizer, ids: list[int]) -> str:
    """Text of token ids, decoded like the data stage decodes references (no clean-up)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _available(spec: MethodSpec, inputs: EvalInputs) -> Optional[str]:
    """None when the method can run, else the reason it cannot."""
    if spec.family == "base" and inputs.base is None:
        return inputs.base_reason or "no base model"
    for need in needs(spec.family):  # the run's trained parts its controller is built from
        if getattr(inputs, need) is None:
            return getattr(inputs, f"{need}_reason") or f"no exit {need}"
    if spec.family == "base" and inputs.base is not None:
        tv, bv = inputs.model.vocab_size, inputs.base.vocab_size
        if tv != bv:
            return f"base model vocabulary ({bv}) differs from the fine-tuned model's ({tv}); not comparable"
    return None


def _ab_threshold(cfg: Config) -> float:
    if cfg.eval.overhead_ab_threshold is not None:
        return float(cfg.eval.overhead_ab_threshold)
    ts = sorted(threshold_grid(cfg.eval, "gc")[1]) or [0.9]
    return float(ts[len(ts) // 2])


def _runnable(specs: Sequence[MethodSpec], inputs: EvalInputs, explicit: bool) -> tuple[list[MethodSpec], list[dict]]:
    """The methods whose inputs exist, and the others with the reason (raises for one asked for by name)."""
    active: list[MethodSpec] = []
    skipped: list[dict] = []
    for spec in specs:
        reason = _available(spec, inputs)
        if reason is None:
            active.append(spec)
            continue
        if explicit:
            raise FileNotFoundError(f"method {spec.id!r} was asked for but cannot run: {reason}")
        log.warning("skipping %s: %s", spec.id, reason)
        skipped.append({"id": spec.id, "family": spec.family, "reason": reason})
    return active, skipped


def _overhead_ab(cfg: Config, inputs: EvalInputs, active: Sequence[MethodSpec]) -> Optional[tuple]:
    """(threshold, the policy controller that checks but never exits, the full model's) for the policy-check A/B
    on the timed samples, when it is on and GC runs; else None."""
    if not (cfg.eval.overhead_ab and inputs.policy is not None and any(s.family == "gc" for s in active)):
        return None
    threshold = _ab_threshold(cfg)
    ctrl = PolicyExit.of(inputs.policy, threshold, cfg.decoding.policy_temperature, ignore_decision=True)
    ctrl.check_layers(inputs.model)
    return threshold, ctrl, NeverExit()


def _work_units(indices: Sequence[int], prompts: Sequence[list[int]], timed: set, step: int) -> list[list[int]]:
    """Each timed sample alone, in order; then the accuracy-only samples sorted by prompt length and cut into
    chunks of ``step`` (similar lengths: little left padding to prefill and attend over; a row's tokens do not
    depend on its batch, tested). Positions in ``prompts``."""
    units: list[list[int]] = [[k] for k in range(len(prompts)) if indices[k] in timed]
    rest = sorted((k for k in range(len(prompts)) if indices[k] not in timed), key=lambda k: (len(prompts[k]), k))
    return units + [rest[i:i + step] for i in range(0, len(rest), step)]


class _MethodRun:
    """One process's pass of the active methods over its samples: the records per method, the methods HF's own
    paths failed on (skipped, with why) and the policy-check A/B records."""

    def __init__(self, runner: Runner, cfg: Config, tokenizer, active: Sequence[MethodSpec], explicit: bool,
                 family: str, ab: Optional[tuple]):
        self.runner, self.cfg, self.tok, self.active, self.explicit, self.family = (runner, cfg, tokenizer,
                                                                                    list(active), explicit, family)
        self.ab = ab
        self.failed: dict[str, str] = {}
        self.records: dict[str, list[dict]] = {s.id: [] for s in self.active}
        self.ab_records: list[dict] = []
        self.loop_specs = [s for s in self.active if not s.runs_hf and not s.lossless]

    def attempt(self, spec: MethodSpec, prompt: list[int], window: Optional[str]) -> Optional[dict]:
        if spec.id in self.failed:
            return None
        try:
            return self.runner.run(spec, prompt, window)
        except Exception as e:  # noqa: BLE001 - only HF's own paths may fail for a model family
            if not spec.runs_hf or self.explicit:
                raise
            self.failed[spec.id] = f"HF generate failed for this model: {type(e).__name__}: {e}"
            if spec.family == "hf_early_exit":
                self.failed[spec.id] += (f" (transformers drafts with the first layers by lowering "
                                         f"config.num_hidden_layers, which the {self.family} decoder does not "
                                         f"honour; Llama's does)")
            log.warning("method %s failed and is skipped: %s", spec.id, self.failed[spec.id])
            return None

    def warmup(self, prompts: Sequence[list[int]]) -> None:
        """Every method on the first samples, results discarded."""
        for w in range(min(self.cfg.eval.warmup_samples, len(prompts))):
            for spec in self.active:
                self.attempt(spec, prompts[w], f"warmup/{spec.id}/{w}")
            if self.ab is not None:
                for c in self.ab[1:]:
                    self.runner._run_loop(MethodSpec("full"), c, prompts[w], f"warmup/ab/{type(c).__name__}/{w}")

    def sample(self, k: int, i: int, sample, prompt: list[int], timed: bool, row_records: Optional[list[dict]]) -> None:
        """Sample ``i`` (position ``k`` in this process's share): timed, every method alone in a fresh seeded
        order (a burst of load on a shared machine lands on random methods, not on neighbours in the list);
        else the loop methods' rows of the batched decode and the methods that run alone."""
        reference = _decode(self.tok, list(sample.reference_ids))
        if timed:
            order = list(self.active)
            random.Random(self.cfg.seed * 1_000_003 + i).shuffle(order)
            got = [(spec, self.attempt(spec, prompt, f"{spec.id}/{i}")) for spec in order]
        else:
            got = list(zip(self.loop_specs, row_records)) if row_records is not None else []
            got += [(s, self.attempt(s, prompt, None)) for s in self.active
                    if (s.runs_hf and s.family in self.cfg.eval.accuracy_only_hf) or s.lossless]
        for spec, rec in got:
            if rec is None:
                continue
            rec.update(index=i, id=str(sample.id), reference=reference, prediction=_decode(self.tok, rec["tokens"]))
            self.records[spec.id].append(rec)
        if self.ab is not None and timed:
            self._ab(k, i, prompt)

    def _ab(self, k: int, i: int, prompt: list[int]) -> None:
        _, pol_ctrl, never = self.ab
        order = [("policy", pol_ctrl), ("full", never)] if k % 2 else [("full", never), ("policy", pol_ctrl)]
        res = {name: self.runner._run_loop(MethodSpec("full"), c, prompt, f"ab/{name}/{i}") for name, c in order}
        self.ab_records.append({"index": i, "decode_time_s_full": res["full"]["counters"]["decode_time_s"],
                                "decode_time_s_policy": res["policy"]["counters"]["decode_time_s"],
                                "controller_time_s": res["policy"]["counters"]["controller_time_s"],
                                "new_tokens": res["full"]["new_tokens"],
                                "same_tokens": res["full"]["tokens"] == res["policy"]["tokens"]})

    def unit(self, samples: Sequence, indices: Sequence[int], prompts: Sequence[list[int]], unit: list[int],
             timed: set) -> None:
        """One work unit: a timed sample, or accuracy-only samples whose (prompt, loop method) pairs are the
        rows of one batched decode."""
        rows = None
        if indices[unit[0]] not in timed and self.loop_specs:
            rows = self.runner.run_rows(self.loop_specs, [prompts[k] for k in unit])
        for u, k in enumerate(unit):
            i = indices[k]
            self.sample(k, i, samples[i], prompts[k], i in timed, rows[u] if rows is not None else None)

    def skipped(self) -> list[dict]:
        """The methods HF failed on, as skipped rows (their records dropped); then the lossless methods checked."""
        out = []
        for mid, reason in self.failed.items():
            spec = next(s for s in self.active if s.id == mid)
            out.append({"id": mid, "family": spec.family, "reason": reason})
            self.records.pop(mid, None)
        _check_lossless(self.records, self.active)
        return out


def _shard_notes(inputs: EvalInputs, active: Sequence[MethodSpec], truncated: int, limit) -> list[str]:
    notes = list(inputs.notes)
    if any(s.family == "hf_early_exit" for s in active):
        notes.append("hf_early_exit: compute_ratio counts every decoder-layer and LM-head row HF runs (drafting, "
                     "the draft's own prompt prefill, verification) minus the full-model prefill; its outputs are "
                     "verified by the full model, so mean_exit_layer is not defined for it")
    if any(s.family == "oracle" for s in active):
        notes.append("oracle: runs every layer to find the first exit agreeing with the final layer; its "
                     "hypothetical_layers_skipped_share is what an exact exit predictor could skip (analysis only)")
    if truncated:
        notes.append(f"{truncated} prompts were cut from the left to fit {limit} positions")
    return notes


def _shard_meta(inputs: EvalInputs, samples: Sequence, cfg: Config, meter, device, notes: list[str]) -> dict:
    model = inputs.model
    return {
        "language": getattr(samples[0], "language", None) or cfg.data.language,
        "num_samples": len(samples),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "num_layers": model.num_layers,
        "final_layer": model.final_layer,
        "exit_layers": list(model.exit_layers),
        "device": str(device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "energy_source": getattr(meter, "source", None),
        "kv_strategy": cfg.decoding.kv_strategy,
        "decode_compile": compile_info(model),
        "policy_temperature": cfg.decoding.policy_temperature,
        "warmup_samples": cfg.eval.warmup_samples,
        "timing_samples": cfg.eval.timing_samples,
        # how the numbers were measured: latency/energy per request at batch 1; the accuracy-only samples
        # decoded in batches of this many prompts x loop methods (same tokens as batch 1, tested)
        "timed_batch_size": 1,
        "accuracy_batch_prompts": cfg.eval.accuracy_batch_prompts,
        "bootstrap_resamples": cfg.eval.bootstrap_resamples,
        "bootstrap_seed": cfg.seed,
        "model": model.fingerprint(),
        "base_model": inputs.base.fingerprint() if inputs.base is not None else None,
        "policy": getattr(inputs.policy, "metadata", None) and {
            k: v for k, v in inputs.policy.metadata.items() if k in ("observation", "exit_layers", "fingerprint")},
        "notes": notes,
    }


def run_methods(inputs: EvalInputs, samples: Sequence, specs: Sequence[MethodSpec], cfg: Config, *,
                explicit: bool = False, indices: Optional[Sequence[int]] = None, rank: int = 0, world_size: int = 1,
                meter=None, device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """Run ``specs`` on ``samples`` (this process's share) and return a shard (see
    :mod:`greencode.eval.summary`). Methods whose inputs are missing are skipped with the
    reason, or raise when ``explicit``."""
    model, tok = inputs.model, inputs.tokenizer
    device = device or model.device
    meter = meter or make_meter(cfg.eval.energy, device)
    runner = Runner(inputs, cfg, meter, tok.eos_token_id, tok.pad_token_id)
    indices = list(indices) if indices is not None else list(range(len(samples)))
    limit = getattr(model.hf.config, "max_position_embeddings", None)

    active, skipped = _runnable(specs, inputs, explicit)
    for spec in active:
        if not spec.runs_hf:
            runner.controller(spec)  # bad layers / mismatched policy fail here, before any generation
    prompts = [prompt_of(samples[i], limit, cfg.eval.max_new_tokens) for i in indices]
    truncated = sum(len(p) < len(samples[i].context_ids) for p, i in zip(prompts, indices))
    if truncated:
        log.warning("%d prompts were cut from the left to fit the model's %s positions", truncated, limit)

    ab = _overhead_ab(cfg, inputs, active)
    run = _MethodRun(runner, cfg, tok, active, explicit, model.family, ab)
    run.warmup(prompts)
    # the timed samples are the first of the whole sample list (the same ones under any sharding)
    timed = set(range(cfg.eval.timing_samples if cfg.eval.timing_samples is not None else len(samples)))
    log.info("%d of this process's %d samples are timed; the rest are decoded for accuracy only "
             "(batched)", sum(i in timed for i in indices), len(prompts))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=f"evaluate (rank {rank})" if world_size > 1 else "evaluate",
                   unit="sample")
    for unit in _work_units(indices, prompts, timed, cfg.eval.accuracy_batch_prompts):
        run.unit(samples, indices, prompts, unit, timed)
        if bar is not None:
            bar.update(len(unit))
    if bar is not None:
        bar.close()
    skipped += run.skipped()

    meta = _shard_meta(inputs, samples, cfg, meter, device, _shard_notes(inputs, active, truncated, limit))
    return {"format": SHARD_FORMAT, "rank": rank, "world_size": world_size, "meta": meta,
            "methods": {s.id: {"spec": s.describe(), "records": run.records[s.id]} for s in active
                        if s.id in run.records},
            "skipped": skipped,
            "overhead_ab": {"threshold": ab[0], "records": run.ab_records} if ab is not None else None}


# --------------------------------------------------------------------------- entry point
def _check_languages(cfg: Config, samples: Sequence) -> None:
    check_language(cfg.data.language)
    for lang in sorted({str(getattr(s, "language", cfg.data.language)) for s in samples}):
        check_language(lang)


def _accuracy_worker(cfg_dict: dict, methods: Optional[list[str]], indices: list[int], rank: int,
                     world_size: int, explicit: Optional[bool] = None) -> dict:
    """One accuracy-only process of :func:`_run_with_workers` (1 torch thread, no timing)."""
    import dataclasses as _dc

    cfg = config_from_dict(cfg_dict)
    cfg = _dc.replace(cfg, hardware=_dc.replace(cfg.hardware, num_threads=1),
                      eval=_dc.replace(cfg.eval, warmup_samples=0, workers=1))
    device, dtype = setup_torch(cfg.hardware)
    names = methods if methods is not None else list(cfg.eval.methods)
    families = {parse_method_name(n)[0] for n in names}
    inputs = load_inputs(cfg, RunPaths.from_config(cfg), device, dtype, need_base="base" in families,
                         need_policy=any(needs(f) for f in families))
    specs = expand_methods(names, cfg.eval, inputs.model.exit_layers, inputs.model.final_layer)
    samples = load_samples(cfg, inputs.tokenizer)
    explicit = (methods is not None) if explicit is None else explicit
    return run_methods(inputs, samples, specs, cfg, explicit=explicit, indices=indices, rank=rank,
                       world_size=world_size, device=device, progress=False)


def _run_with_workers(cfg: Config, methods: Optional[list[str]], inputs: EvalInputs, samples: Sequence,
                      specs: Sequence[MethodSpec], explicit: bool, device) -> list[dict]:
    """The timed samples in this process first (nothing else running), then the accuracy-only
    samples split over ``eval.workers`` fresh processes; one shard each, merged as ranks."""
    import concurrent.futures as cf
    import multiprocessing as mp

    n_timed = len(samples) if cfg.eval.timing_samples is None else min(cfg.eval.timing_samples, len(samples))
    rest = list(range(n_timed, len(samples)))
    workers = min(cfg.eval.workers, max(1, len(rest)))
    world = 1 + workers
    log.info("evaluating %d methods: %d timed samples here, then %d accuracy-only samples on %d processes",
             len(specs), n_timed, len(rest), workers)
    shards = [run_methods(inputs, samples, specs, cfg, explicit=explicit, indices=list(range(n_timed)), rank=0,
                          world_size=world, device=device)]
    if rest:
        chunks = [rest[k::workers] for k in range(workers)]
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_accuracy_worker, cfg.to_dict(), methods, chunk, k + 1, world, explicit)
                       for k, chunk in enumerate(chunks)]
            from tqdm.auto import tqdm

            for f in tqdm(cf.as_completed(futures), total=len(futures), desc="accuracy workers", unit="worker"):
                shards.append(f.result())
    else:
        shards += [{**shards[0], "rank": k + 1, "methods": {m: {**e, "records": []}
                                                            for m, e in shards[0]["methods"].items()},
                    "overhead_ab": None} for k in range(workers)]
    return shards


def _showcase(out_dir: Path, samples: Sequence, cfg: Config) -> None:
    try:
        write_completions(out_dir, samples, seed=cfg.seed)
    except (OSError, ValueError, KeyError) as e:  # a readable extra: never fail a finished evaluation on it
        log.warning("completions.md not written: %s", e)


def _expand_calibrated(cfg: Config, names: list[str], explicit: bool) -> tuple[list[str], Optional[dict]]:
    """``calibrated`` -> the method ids chosen by the calibration stage (every controller at every
    target, results/<name>/calibration/calibration.json); the calibration comes back too."""
    if "calibrated" not in names:
        return names, None
    calibration = load_calibration(cfg)
    rest = [n for n in names if n != "calibrated"]
    if calibration is None:
        msg = (f"no calibration at {RunPaths.from_config(cfg).calibration}; run `python scripts/calibrate.py "
               f"--config {cfg.source_path or '<cfg>'}` (the pipeline's calibrate stage) first")
        if explicit:
            raise FileNotFoundError(msg)
        log.warning("method 'calibrated' skipped: %s", msg)
        return rest, None
    ids = calibrated_ids(calibration)
    log.info("calibrated methods (chosen on the %s split): %s", calibration.get("split"), ", ".join(ids) or "none")
    return rest + [i for i in ids if i not in rest], calibration


def _finish(out_dir: Path, samples: Sequence, cfg: Config, calibration: Optional[dict],
            weights: Optional[dict] = None) -> None:
    _showcase(out_dir, samples, cfg)
    if calibration is not None:
        _calibrated(out_dir, cfg, calibration, weights)
    _hull(out_dir, calibration)


def _calibrated(out_dir: Path, cfg: Config, calibration: dict, weights: Optional[dict]) -> None:
    forced = None
    rows = summary_table(out_dir)
    if "token" in criteria_of(calibration):
        # the calibrated rows and every other loop row (the fixed exits: the static hull's token risk)
        ids = list(dict.fromkeys(calibrated_ids(calibration) + [r["id"] for r in rows]))
        try:
            forced = teacher_forced(cfg, out_dir, ids)
        except FileNotFoundError as e:  # no full-model records: the token criterion's test risk stays unknown
            log.warning("teacher-forced pass skipped: %s", e)
    table = targets_table(calibration, rows, out_dir, forced)
    table["split"] = cfg.eval.split
    table["weights"] = weights
    write_json(out_dir / "calibrated.json", table)
    write_text(out_dir / "calibrated.md", render_targets(table, cfg.eval.split))


def _hull(out_dir: Path, calibration: Optional[dict]) -> None:
    """Every controller against the static exits' hull at matched compute (hull.json, hull.md, summary.json)."""
    try:
        write_hull(out_dir, calibration=calibration)
    except (OSError, ValueError, KeyError) as e:  # a finished evaluation is kept; the hull says why it is missing
        log.warning("static hull not written: %s: %s", type(e).__name__, e)


def _prepare(cfg: Config, names: list[str], paths: RunPaths, dist: Dist):
    """The run's inputs for the methods ``names``: device, loaded inputs, method specs, samples and the weights
    record; fails when the base model was trained on the split's files or a sample is in another language."""
    set_seed(cfg.seed)
    device, dtype = setup_torch(cfg.hardware)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    families = {parse_method_name(n)[0] for n in names}
    inputs = load_inputs(cfg, paths, device, dtype, need_base="base" in families,
                         need_policy=any(needs(f) for f in families))
    specs = expand_methods(names, cfg.eval, inputs.model.exit_layers, inputs.model.final_layer)
    samples = load_samples(cfg, inputs.tokenizer)
    checked = check_split_disjoint(cfg, cfg.eval.split)  # raises when the base was trained on these files
    if checked:
        log.info("the %d %s-split files are disjoint from the base model's training files", checked, cfg.eval.split)
    _check_languages(cfg, samples)
    return device, inputs, specs, samples, weights_record(inputs.model, inputs.base)


def _gather_ranks(shard: dict, shard_dir: Path, dist: Dist, finish) -> None:
    """Several launcher ranks: each writes its shard; the main rank merges them (``finish(shards)``)."""
    try:
        write_json(shard_dir / f"rank{dist.rank}.json", shard)
        dist.barrier()
        if dist.is_main:
            finish([read_json(shard_dir / f"rank{r}.json") for r in range(dist.world_size)])
            shutil.rmtree(shard_dir, ignore_errors=True)
        dist.barrier()
    finally:
        dist.close()


def evaluate(cfg: Config, methods: Union[str, Sequence[str], None] = None) -> Path:
    """Evaluate the methods (``cfg.eval.methods``, or ``methods``: families or ids such as
    ``gc@0.9``) on the config's samples and write ``results/<name>/eval``. Returns that path.

    Methods named explicitly in ``methods`` must run (missing inputs raise); families from
    the config are skipped with a recorded reason when their inputs are missing."""
    explicit = methods is not None
    names = split_names(methods) if explicit else list(cfg.eval.methods)
    names, calibration = _expand_calibrated(cfg, names, explicit)
    for n in names:  # unknown names fail before anything is loaded
        parse_method_name(n)
    check_language(cfg.data.language)
    paths = RunPaths.from_config(cfg)
    out_dir = paths.results_eval
    dist = Dist.from_env()
    check_writable(out_dir)
    device, inputs, specs, samples, weights = _prepare(cfg, names, paths, dist)

    def finish(shards: list[dict], **meta) -> None:
        write_results(merge_shards(shards), out_dir, run_metadata(
            cfg, stage="evaluate", energy_source=shards[0]["meta"]["energy_source"], **meta, weights=weights))
        _finish(out_dir, samples, cfg, calibration, weights)

    if dist.world_size == 1 and cfg.eval.workers > 1:
        finish(_run_with_workers(cfg, names, inputs, samples, specs, explicit, device), world_size=1,
               accuracy_workers=cfg.eval.workers)
        return out_dir
    indices = [i for i in range(len(samples)) if i % dist.world_size == dist.rank]
    log.info("evaluating %d methods on %d samples (rank %d/%d: %d samples)", len(specs), len(samples), dist.rank,
             dist.world_size, len(indices))
    shard = run_methods(inputs, samples, specs, cfg, explicit=explicit, indices=indices, rank=dist.rank,
                        world_size=dist.world_size, device=device)
    if dist.world_size == 1:
        finish([shard], world_size=1)
    else:
        _gather_ranks(shard, paths.results / ".eval-shards", dist,
                      lambda shards: finish(shards, world_size=dist.world_size))
    return out_dir
