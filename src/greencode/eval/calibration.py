"""Calibrated targets: every exit controller at the threshold that meets a fidelity target
with the least compute, chosen on the validation split (Learn then Test, as in CALM).

Three fidelity criteria, each a per-sample loss in [0, 1] (per sample, so the calibration
samples are independent), each calibrated on its own (``calibration.criteria``):

* ``sequence`` (sequence consistency): the share of a sample's generated tokens that differ
  from the full model's at the same position, each method free-running on its own output
  (1 - token agreement). One wrong exit changes everything after it, so this is the strictest;
* ``token`` (token consistency): teacher-forced, the share of positions whose token differs
  from the full model's when the method is fed the full model's continuation (the full
  model's prefix at every position; its own exits still shape its cache). No cascade;
* ``quality`` (quality risk, CALM's risk consistency): the loss of quality against the real
  continuation relative to the full model, ``clip((ES_full - ES_method) / 100, 0, 1)`` with
  ES the edit similarity (0-100) of the sample's completion.

The risk of a threshold under a criterion is the expected loss. A user target ``alpha`` (``calibration.targets``:
1%, 2%, 5%, 10%) is met at risk ``delta`` when the null hypothesis "risk > alpha" is
rejected at level ``delta``:

* p-value: Hoeffding-Bentkus for a mean of losses in [0, 1] (Bates et al. 2021, Angelopoulos
  et al. 2021), ``min(exp(-n h(min(r, alpha), alpha)), e P(Bin(n, alpha) <= ceil(n r)))``;
* multiple thresholds: fixed-sequence testing over candidates ordered from the most
  conservative (deepest fixed layer, highest probability or cosine threshold, lowest entropy
  threshold) to the least, an order fixed before any data is seen; testing stops at the first
  candidate that is not certified, and every candidate before it is valid at level ``delta``
  jointly;
* the choice: among the certified candidates, the one with the least mean compute ratio on the
  calibration samples. None certified: the controller cannot meet the target on this model
  (reported; the full model is what meets it).

The candidate grids are fixed before calibration (in the config, from a tuning slice of
validation: the first ``calibration.sample_offset`` samples); the calibration samples are the
next ``calibration.num_samples`` of the same seeded order, disjoint from the tuning slice, and
their ids are written into the report.

``calibrate(cfg)`` evaluates the full model and every candidate on ``calibration.num_samples``
validation samples (accuracy only, all candidates as rows of one batched decode per sample)
into ``results/<name>/calibration/eval`` and writes ``results/<name>/calibration/calibration.json``
and ``calibration.md``. The final evaluation's ``calibrated`` method reads that file, and
:func:`targets_table` reports each controller at each target on the test split, next to the
disagreement it reached there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from greencode.config import Config, ConfigError
from greencode.decoding.registry import get_controller, threshold_grid
from greencode.eval.methods import MethodSpec, needs, param_kind
from greencode.eval.tuning import refuse_test_split
from greencode.paths import RunPaths
from greencode.utils import read_json, run_metadata, write_json, write_text

log = logging.getLogger(__name__)

CALIBRATION_SPLIT = "validation"
FORMAT = "greencode-calibration/2"
CRITERIA = {
    "sequence": "sequence consistency: expected share of a sample's generated tokens that differ from the full "
                "model's at the same position, each free-running (1 - token agreement)",
    "token": "token consistency: expected share of positions whose token differs from the full model's when the "
             "method is fed the full model's continuation (teacher-forced)",
    "quality": "quality risk: expected loss of edit similarity against the real continuation relative to the full "
               "model, clip((ES_full - ES) / 100, 0, 1)",
}
TEACHER_FORCED_FILE = "teacher_forced.json"


# --------------------------------------------------------------------------- Learn then Test
def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (n up to a few thousand)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(v - m) for v in logs))


def _kl_bernoulli(a: float, b: float) -> float:
    """h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hb_pvalue(mean_loss: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0: E[loss] > alpha, for ``n`` i.i.d. losses in [0, 1] with
    empirical mean ``mean_loss``."""
    if n <= 0:
        return 1.0
    if mean_loss >= alpha:
        return 1.0
    hoeffding = math.exp(-n * _kl_bernoulli(mean_loss, alpha))
    bentkus = math.e * _binom_cdf(math.ceil(n * mean_loss), n, alpha)
    return min(1.0, hoeffding, bentkus)


def fixed_sequence(losses: Sequence[np.ndarray], alpha: float, delta: float) -> tuple[list[bool], list[float]]:
    """Fixed-sequence testing: ``losses[k]`` are the per-sample losses of candidate ``k`` in the
    pre-set order (most conservative first). Returns (certified flags, p-values); testing stops
    at the first candidate whose p-value exceeds ``delta`` (those after it are not certified and
    their p-values are still reported)."""
    pvals = [hb_pvalue(float(np.mean(x)) if len(x) else 1.0, len(x), alpha) for x in losses]
    certified, going = [], True
    for p in pvals:
        going = going and p <= delta
        certified.append(going)
    return certified, pvals


# --------------------------------------------------------------------------- candidates
def candidate_specs(cfg: Config, exit_layers: Sequence[int]) -> dict[str, list[MethodSpec]]:
    """Each calibrated family's candidates, most conservative first (an order fixed a priori by the
    controller's registry entry: the deepest exit layer first, or from the conservative end of its
    grid, ``calibration.thresholds.<name>`` / ``calibration.<name>_thresholds`` / its default)."""
    c = cfg.calibration
    out: dict[str, list[MethodSpec]] = {}
    for fam in c.families:
        info = get_controller(fam, "calibration.families")
        grid = threshold_grid(c, fam, calibration=True)[1] if info.param == "threshold" else []
        out[fam] = [MethodSpec(fam, p) for p in info.candidates(grid, exit_layers)]
    return out


def _records(eval_dir: Path, method_id: str) -> Optional[list]:
    f = eval_dir / "methods" / f"{method_id}.json"
    return read_json(f)["records"] if f.is_file() else None


def _compute(r: dict) -> Optional[float]:
    cost = r.get("cost") or {}
    return float(cost["macs_done"]) / float(cost["macs_full"]) if cost.get("macs_full") else None


def sample_losses(eval_dir: Path, method_id: str, criterion: str = "sequence",
                  forced: Optional[dict] = None,
                  forced_compute: Optional[dict] = None) -> Optional[dict[int, tuple[float, float]]]:
    """{sample index: (loss under ``criterion``, compute ratio)} of one evaluated method.
    ``forced``: the teacher-forced disagreements ({method id: {index: share}}) for ``token``;
    ``forced_compute`` ({method id: {index: compute ratio}}): the teacher-forced pass's own compute,
    so the token criterion needs no free-running record (its samples may be more than those)."""
    if criterion == "token" and forced_compute is not None and method_id in forced_compute:
        tf, kc = (forced or {}).get(method_id) or {}, forced_compute[method_id]
        out = {}
        for i, share in tf.items():
            k = kc.get(i, kc.get(str(i)))
            if share is not None and k is not None:
                out[int(i)] = (float(share), float(k))
        return out or None
    recs = _records(eval_dir, method_id)
    if recs is None:
        return None
    full_es = None
    if criterion == "quality":
        full = _records(eval_dir, "full")
        if full is None:
            return None
        full_es = {int(r["index"]): (r.get("metrics") or {}).get("edit_similarity") for r in full}
    tf = None
    if criterion == "token":
        tf = (forced or {}).get(method_id)
        if tf is None:
            return None
    out = {}
    for r in recs:
        i, k = int(r["index"]), _compute(r)
        if k is None:
            continue
        if criterion == "sequence":
            if r.get("token_agreement") is None:
                continue
            loss = 1.0 - float(r["token_agreement"])
        elif criterion == "quality":
            es, ref = (r.get("metrics") or {}).get("edit_similarity"), full_es.get(i)
            if es is None or ref is None:
                continue
            loss = min(1.0, max(0.0, (float(ref) - float(es)) / 100.0))
        else:
            if str(i) not in tf and i not in tf:
                continue
            loss = float(tf.get(str(i), tf.get(i)))
        out[i] = (loss, k)
    return out


def _per_sample(eval_dir: Path, method_id: str) -> Optional[dict[int, tuple[float, float]]]:
    """{sample index: (disagreement share, compute ratio)} of one evaluated method (sequence criterion)."""
    return sample_losses(eval_dir, method_id, "sequence")


def teacher_forced(cfg: Config, eval_dir: Path, method_ids: Sequence[str], *,
                   full_tokens: Optional[dict[int, list[int]]] = None, oracle: bool = False) -> dict[str, dict[int, float]]:
    """Token consistency of loop methods: each is fed the full model's greedy continuation of each
    sample (``full_tokens``, else ``eval_dir/methods/full.json``; samples with neither get theirs
    generated here, batched) and its own choice at each position is compared with it. One
    teacher-forced pass per sample for every candidate at once (:func:`greencode.rl.simulate.simulate_forced`:
    the prompt prefilled once, every controller's exits simulated over the continuation's positions,
    equal to the decoding loop's teacher-forced rows, tested); controllers that carry state from
    token to token go through the loop (``generate(..., forced_tokens=...)``). Returns and writes
    ``eval_dir/teacher_forced.json``: {method id: {sample index: share of positions that differ}},
    with each row's compute ratio and layers skipped per sample (``compute``, ``layers_skipped``)
    and, with ``oracle``, the oracle's hypothetical layers skipped on the same continuations."""
    import time

    import torch

    from greencode.decoding import NeverExit, compute_cost, generate
    from greencode.eval.evaluator import Runner, _prompt_of, load_inputs, load_samples
    from greencode.eval.methods import parse_method_name
    from greencode.rl.simulate import simulate_forced, token_local
    from greencode.utils import setup_torch

    t0 = time.perf_counter()
    forced_of = dict(full_tokens or {})
    if not forced_of:
        full = _records(eval_dir, "full")
        if full is None:
            raise FileNotFoundError(f"no full-model records in {eval_dir}/methods/full.json; the teacher-forced pass "
                                    "feeds the full model's continuation, so evaluate method 'full' first")
        forced_of = {int(r["index"]): [int(t) for t in r["tokens"]] for r in full if r.get("tokens")}
    specs = []
    for mid in method_ids:
        fam, param = parse_method_name(mid)
        spec = MethodSpec(fam, param)
        if spec.runs_hf or spec.lossless or param_kind(fam) is None:  # HF rows, lossless rows, full, oracle
            continue
        specs.append(spec)
    paths = RunPaths.from_config(cfg)
    device, dtype = setup_torch(cfg.hardware)
    inputs = load_inputs(cfg, paths, device, dtype, need_base=False, need_policy=any(needs(s.family) for s in specs))
    samples = load_samples(cfg, inputs.tokenizer)
    model, tok = inputs.model, inputs.tokenizer
    runner = Runner(inputs, cfg, None, tok.eos_token_id, tok.pad_token_id)
    specs = [s for s in specs if all(getattr(inputs, n) is not None for n in needs(s.family))]
    ctrls = [runner.controller(s) for s in specs]
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    max_new = cfg.eval.max_new_tokens
    prompts = {i: _prompt_of(samples[i], limit, max_new) for i in range(len(samples))}
    per_batch = max(1, int(cfg.eval.accuracy_batch_prompts))
    from tqdm.auto import tqdm

    missing = sorted((i for i in prompts if i not in forced_of), key=lambda i: (len(prompts[i]), i))
    with torch.inference_mode():  # the full model's continuations not decoded yet: batched, sorted by length
        for start in tqdm(range(0, len(missing), 2 * per_batch), desc="full continuations", unit="batch",
                          disable=None if missing else True):
            chunk = missing[start:start + 2 * per_batch]
            res = generate(model, [prompts[i] for i in chunk], [NeverExit() for _ in chunk], max_new,
                           eos_token_id=tok.eos_token_id, kv_strategy=cfg.decoding.kv_strategy)
            forced_of.update({i: r.tokens for i, r in zip(chunk, res)})
    if cfg.decoding.kv_strategy != "propagate":
        raise ConfigError(f"decoding.kv_strategy={cfg.decoding.kv_strategy!r}: the teacher-forced simulation "
                          "propagates K/V from the exit state (the default strategy); use propagate")
    fast = [k for k, c in enumerate(ctrls) if token_local(c)]
    slow = [k for k in range(len(ctrls)) if k not in fast]
    out: dict[str, dict[int, float]] = {s.id: {} for s in specs}
    compute: dict[str, dict[int, Optional[float]]] = {s.id: {} for s in specs}
    skipped: dict[str, dict[int, Optional[float]]] = {s.id: {} for s in specs}
    oracle_skip: dict[int, float] = {}
    idx = [i for i in range(len(samples)) if forced_of.get(i)]

    def keep(i, k, res):
        f = forced_of[i]
        spec = specs[k]
        out[spec.id][i] = sum(a != b for a, b in zip(res.own_tokens, f)) / len(f)
        cost = compute_cost(model, [res], ctrls[k])
        compute[spec.id][i] = cost["compute_ratio"]
        skipped[spec.id][i] = cost["layers_skipped_share"]

    with torch.inference_mode():
        for i in tqdm(idx, desc="teacher-forced (simulated)", unit="sample", disable=None):
            rows, oex = simulate_forced(model, prompts[i], forced_of[i], [ctrls[k] for k in fast], oracle=oracle)
            for k, res in zip(fast, rows):
                keep(i, k, res)
            if oracle and oex:
                layers = [model.exit_points[e] for e in oex]
                oracle_skip[i] = 1.0 - sum(x + 1 for x in layers) / (len(layers) * model.num_layers)
        for start in tqdm(range(0, len(idx), per_batch) if slow else [], desc="teacher-forced (loop)", unit="batch",
                          disable=None):
            chunk = idx[start:start + per_batch]
            rows = [(i, k) for i in chunk for k in slow]
            res = generate(model, [prompts[i] for i, _ in rows], [ctrls[k] for _, k in rows], max_new,
                           eos_token_id=tok.eos_token_id, kv_strategy=cfg.decoding.kv_strategy,
                           forced_tokens=[forced_of[i] for i, _ in rows])
            for (i, k), r in zip(rows, res):
                keep(i, k, r)
    from greencode.provenance import weights_record

    seconds = time.perf_counter() - t0
    write_json(eval_dir / TEACHER_FORCED_FILE, {
        "format": "greencode-teacher-forced/2", "split": cfg.eval.split, "what": CRITERIA["token"],
        "how": "one teacher-forced pass per sample: the prompt prefilled once, every candidate's exits simulated over "
               "the full model's continuation (greencode.rl.simulate.simulate_forced, equal to the decoding loop's "
               "teacher-forced rows); controllers with state across tokens through the loop",
        "simulated": [specs[k].id for k in fast], "loop": [specs[k].id for k in slow],
        "num_samples": len(idx), "seconds": round(seconds, 1),
        "methods": out, "compute": compute, "layers_skipped": skipped,
        "oracle_layers_skipped": oracle_skip if oracle else None, "weights": weights_record(model)})
    log.info("teacher-forced pass: %d samples x %d methods (%d simulated) in %.0f s", len(idx), len(specs), len(fast),
             seconds)
    return out


def load_teacher_forced(eval_dir: Path) -> Optional[dict]:
    f = eval_dir / TEACHER_FORCED_FILE
    return read_json(f)["methods"] if f.is_file() else None


def smallest_certifiable_risk(n: int, delta: float) -> Optional[float]:
    """The smallest target the Hoeffding-Bentkus test can certify with ``n`` samples at level ``delta``:
    even at observed risk 0 a smaller target is never certified. At risk 0 both bounds are powers of
    ``1 - alpha`` (Hoeffding ``(1 - alpha)^n``, Bentkus ``e (1 - alpha)^n``), so it is
    ``1 - delta^(1/n)`` (n = 240, delta = 0.1: 0.95%; n = 1,500: 0.15%)."""
    if n <= 0:
        return None
    return 1.0 - delta ** (1.0 / n)


def max_certified_risk(n: int, alpha: float, delta: float) -> Optional[float]:
    """The largest observed mean risk at which target ``alpha`` is still certified with ``n`` samples at
    level ``delta`` (None: not even at observed risk 0). The p-value grows with the observed risk, so
    a bisection over it (to 1e-6)."""
    if n <= 0 or hb_pvalue(0.0, n, alpha) > delta:
        return None
    lo, hi = 0.0, alpha
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hb_pvalue(mid, n, alpha) <= delta else (lo, mid)
    return lo


def certifiable(n: int, targets: Sequence[float], delta: float) -> dict[str, Any]:
    """What ``n`` samples can certify at ``delta``: the smallest certifiable risk and, per target, the
    largest observed risk that still certifies it."""
    return {"n": n, "delta": delta, "smallest_certifiable_risk": smallest_certifiable_risk(n, delta),
            "max_observed_risk": {f"{t:g}": max_certified_risk(n, t, delta) for t in targets}}


def _layers_skipped(r: dict) -> Optional[float]:
    cost = r.get("cost") or {}
    full = cost.get("layer_steps_full")
    return 1.0 - float(cost["layers_run"]) / float(full) if full and cost.get("layers_run") is not None else None


def choose(cfg: Config, eval_dir: Path, specs: dict[str, list[MethodSpec]], criterion: str = "sequence",
           forced: Optional[dict] = None, forced_compute: Optional[dict] = None,
           layers_skipped: Optional[dict] = None, oracle_skipped: Optional[dict] = None) -> dict[str, Any]:
    """Per family and target: the certified candidates and the cheapest of them, under one criterion.
    ``layers_skipped`` ({method id: {index: share}}; default: the free-running records') and
    ``oracle_skipped`` ({index: the oracle's hypothetical share}) add each candidate's share of the
    oracle's savings (its layers skipped over the oracle's, on the same samples)."""
    c = cfg.calibration
    per = {s.id: sample_losses(eval_dir, s.id, criterion, forced, forced_compute)
           for fam in specs.values() for s in fam}
    families: dict[str, Any] = {}
    for fam, cands in specs.items():
        ran = [s for s in cands if per.get(s.id)]
        if not ran:
            families[fam] = {"skipped": "no candidate was evaluated (missing input, e.g. no classifier or policy)"}
            continue
        common = sorted(set.intersection(*(set(per[s.id]) for s in ran)))
        loss = [np.array([per[s.id][i][0] for i in common]) for s in ran]
        cost = [float(np.mean([per[s.id][i][1] for i in common])) for s in ran]
        rows = [{"id": s.id, "param": s.param, "mean_disagreement": float(x.mean()), "compute_ratio": k}
                for s, x, k in zip(ran, loss, cost)]
        oracle = [oracle_skipped.get(i, oracle_skipped.get(str(i))) for i in common] if oracle_skipped else []
        oracle_mean = float(np.mean(oracle)) if oracle and None not in oracle else None
        for s, row in zip(ran, rows):
            if layers_skipped is not None:
                got = layers_skipped.get(s.id) or {}
                sk = [got.get(i, got.get(str(i))) for i in common]
            else:
                recs = {int(r["index"]): r for r in (_records(eval_dir, s.id) or [])}
                sk = [_layers_skipped(recs[i]) if i in recs else None for i in common]
            row["layers_skipped_share"] = float(np.mean(sk)) if sk and None not in sk else None
            row["oracle_savings_share"] = (row["layers_skipped_share"] / oracle_mean
                                           if row["layers_skipped_share"] is not None and oracle_mean else None)
        targets = {}
        for alpha in c.targets:
            ok, pvals = fixed_sequence(loss, alpha, c.delta)
            certified = [i for i, flag in enumerate(ok) if flag]
            best = min(certified, key=lambda i: (cost[i], i)) if certified else None
            targets[f"{alpha:g}"] = {
                "target": alpha, "certified": [ran[i].id for i in certified],
                "p_values": {ran[i].id: pvals[i] for i in range(len(ran))},
                "chosen": ran[best].id if best is not None else None,
                "chosen_param": ran[best].param if best is not None else None,
                "calibration_disagreement": rows[best]["mean_disagreement"] if best is not None else None,
                "calibration_compute_ratio": cost[best] if best is not None else None,
                "oracle_savings_share": rows[best]["oracle_savings_share"] if best is not None else None}
        families[fam] = {"order": [s.id for s in ran], "samples": len(common), "candidates": rows,
                         "targets": targets, "oracle_layers_skipped_share": oracle_mean,
                         "certifiable": certifiable(len(common), c.targets, c.delta)}
    return families


def calibrate(cfg: Config, *, split: str = CALIBRATION_SPLIT) -> Path:
    """Evaluate the candidates on ``split`` (validation), choose per family and target, and
    write ``results/<name>/calibration/calibration.{json,md}``. Returns the json path."""
    from greencode.eval import evaluate
    from greencode.models import EarlyExitModel

    refuse_test_split(split, "calibration")
    c = cfg.calibration
    paths = RunPaths.from_config(cfg)
    out = paths.calibration.parent
    if not (paths.finetuned / "config.json").is_file():
        raise FileNotFoundError(f"no fine-tuned model in {str(paths.finetuned)!r}; run the finetune stage first "
                                "(scripts/finetune.py or scripts/reproduce.py)")
    loaded = EarlyExitModel.from_run_config(cfg, paths.finetuned)
    exits = loaded.exit_layers
    from greencode.provenance import weights_record

    weights = weights_record(loaded)
    del loaded
    specs = candidate_specs(cfg, exits)
    sub = dataclasses.replace(
        cfg, results_dir=str(out),
        eval=dataclasses.replace(cfg.eval, split=split, num_samples=c.num_samples, timing_samples=0,
                                 sample_offset=c.sample_offset,
                                 overhead_ab=False, warmup_samples=0, bootstrap_resamples=0, accuracy_only_hf=[]))
    ids = ["full"] + [s.id for fam in specs.values() for s in fam]
    available = []
    for i in ids:
        missing = [(n, getattr(paths, n)) for n in needs(i.split("@")[0]) if not Path(getattr(paths, n)).is_file()]
        if not missing:
            available.append(i)
        else:
            log.warning("calibration: %s skipped (no %s at %s)", i, *missing[0])
    import time

    t0 = time.perf_counter()
    evaluate(sub, available)
    eval_dir = out / "eval"
    free_s = time.perf_counter() - t0
    full = _records(eval_dir, "full") or []
    token_n = c.token_samples()
    forced = compute = skipped = oracle = None
    if "token" in c.criteria:
        # the token criterion on its own (larger) slice: the same seeded order from the same offset, so its first
        # num_samples are the free-running ones (their full continuations reused); one simulated pass per sample
        tsub = dataclasses.replace(sub, eval=dataclasses.replace(sub.eval, num_samples=token_n))
        known = {int(r["index"]): [int(t) for t in r["tokens"]] for r in full if r.get("tokens")}
        forced = teacher_forced(tsub, eval_dir, available, full_tokens=known, oracle=True)
        tf = read_json(eval_dir / TEACHER_FORCED_FILE)
        compute, skipped, oracle = tf["compute"], tf["layers_skipped"], tf.get("oracle_layers_skipped")
    token_s = time.perf_counter() - t0 - free_s
    criteria = {}
    for crit in c.criteria:
        if crit == "token":
            fams = choose(cfg, eval_dir, specs, crit, forced, compute, skipped, oracle)
        else:  # the oracle's tokens are the full model's: its exits on the teacher-forced pass are its free-running ones
            fams = choose(cfg, eval_dir, specs, crit, oracle_skipped=oracle)
        n = max((e.get("samples", 0) for e in fams.values()), default=0)
        criteria[crit] = {"risk": CRITERIA[crit], "families": fams, "samples": n,
                          "certifiable": certifiable(n, c.targets, c.delta)}
    families = criteria["sequence"]["families"] if "sequence" in criteria else {}
    result = {"format": FORMAT, "split": split, "num_samples": c.num_samples, "token_num_samples": token_n,
              "delta": c.delta, "targets": list(c.targets), "risk": CRITERIA["sequence"],
              "seconds": {"free_running": round(free_s, 1), "token_teacher_forced": round(token_s, 1)},
              "method": "Learn then Test: Hoeffding-Bentkus p-values, fixed-sequence testing from the most "
                        "conservative candidate; the certified candidate with the least compute",
              "samples": {"split": split, "sample_seed": cfg.eval.sample_seed, "offset": c.sample_offset,
                          "count": len(full), "ids": [r.get("id") for r in sorted(full, key=lambda r: r["index"])],
                          "token_count": token_n,
                          "note": f"the first {c.sample_offset} samples of this seeded order are the tuning slice "
                                  "(grids, knobs); these follow them and chose nothing. The sequence and quality "
                                  f"criteria use the first {c.num_samples} (free-running), the token criterion the "
                                  f"first {token_n} (one teacher-forced pass each); ids lists the free-running ones"},
              "families": families, "criteria": criteria, "policy_sha256": file_sha256(paths.policy),
              "classifier_sha256": file_sha256(paths.classifier),
              "run": run_metadata(cfg, stage="calibrate", weights=weights)}
    result["run"].pop("config", None)
    write_json(paths.calibration, result)
    write_text(out / "calibration.md", render(result))
    log.info("calibration on %d %s samples -> %s", c.num_samples, split, paths.calibration)
    return paths.calibration


def file_sha256(path) -> Optional[str]:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def load_calibration(cfg: Config) -> Optional[dict]:
    f = RunPaths.from_config(cfg).calibration
    return read_json(f) if f.is_file() else None


def _criteria(calibration: dict) -> dict[str, dict]:
    """{criterion: {"families": ...}}; a format-1 file (one criterion) reads as ``sequence``."""
    return calibration.get("criteria") or {"sequence": {"risk": calibration.get("risk"),
                                                        "families": calibration.get("families", {})}}


def calibrated_ids(calibration: dict) -> list[str]:
    """The method ids the calibration chose (every criterion, family and target), without repeats."""
    seen: list[str] = []
    for crit in _criteria(calibration).values():
        for fam in crit.get("families", {}).values():
            for t in (fam.get("targets") or {}).values():
                if t.get("chosen") and t["chosen"] not in seen:
                    seen.append(t["chosen"])
    return seen


def threshold_for(calibration: dict, family: str, target: float, criterion: str = "sequence") -> Optional[float]:
    """The calibrated parameter of ``family`` for ``target`` under ``criterion`` (the largest
    calibrated target that is at most ``target``); None when none is certified at or below it."""
    crits = _criteria(calibration)
    if criterion not in crits:
        raise ConfigError(f"fidelity criterion {criterion!r} was not calibrated for this run; calibrated: "
                          f"{', '.join(crits)} (calibration.criteria)")
    fam = (crits[criterion].get("families") or {}).get(family) or {}
    best = None
    for t in (fam.get("targets") or {}).values():
        if t["target"] <= target + 1e-12 and t.get("chosen_param") is not None:
            if best is None or t["target"] > best[0]:
                best = (t["target"], t["chosen_param"])
    if best is None and fam.get("targets"):
        known = sorted(t["target"] for t in fam["targets"].values())
        if target < known[0]:
            raise ConfigError(f"max_disagreement={target:g} is below the smallest calibrated target {known[0]:g} "
                              f"for {family}; use a target in {known} or a raw threshold")
    return None if best is None else float(best[1])


def render(result: dict) -> str:
    samples = result.get("samples") or {}
    token_n = result.get("token_num_samples")
    size = f"{result['num_samples']} samples" + (f"; token criterion {token_n}" if token_n and token_n != result[
        "num_samples"] else "")
    lines = [f"# Calibrated thresholds ({result['split']} split, {size}, delta = {result['delta']:g})", "",
             f"{result['method']}.", ""]
    if samples:
        lines += [f"Calibration samples: {samples.get('count')} of the {result['split']} split's seeded order (seed "
                  f"{samples.get('sample_seed')}), from position {samples.get('offset')} on: {samples.get('note')}. "
                  "Their ids are in calibration.json.", ""]
    for crit, entry in _criteria(result).items():
        fams = entry.get("families", {})
        lines += [f"## Criterion: {crit}", "", f"Risk: {entry.get('risk')}.", ""]
        cert = entry.get("certifiable")
        if cert and cert.get("smallest_certifiable_risk") is not None:
            most = ", ".join(f"≤ {100 * float(t):g}%: " + ("never" if v is None else f"{100 * v:.2f}%")
                             for t, v in cert["max_observed_risk"].items())
            lines += [f"n = {cert['n']} samples: the smallest risk Hoeffding-Bentkus can certify at δ = {cert['delta']:g} "
                      f"is **{100 * cert['smallest_certifiable_risk']:.2f}%** (at observed risk 0); each target is "
                      f"certified only at an observed risk up to ({most}).", ""]
        lines += [
                  "| controller | " + " | ".join(f"≤ {100 * t:g}%" for t in result["targets"]) + " |",
                  "| controller | " + " | ".join(f"≤ {100 * t:g}%" for t in result["targets"]) + " |",
                  "|---|" + "---|" * len(result["targets"])]
        for fam, e in fams.items():
            if "skipped" in e:
                lines.append(f"| {fam} | " + " | ".join("–" for _ in result["targets"]) + f" |  ({e['skipped']})")
                continue
            cells = []
            for t in result["targets"]:
                x = e["targets"][f"{t:g}"]
                if x["chosen"] is None:
                    cells.append("none certified")
                else:
                    share = x.get("oracle_savings_share")
                    cells.append(f"`{x['chosen']}` (compute {x['calibration_compute_ratio']:.3f}, "
                                 f"risk {100 * x['calibration_disagreement']:.1f}%"
                                 + ("" if share is None else f", {100 * share:.0f}% of the oracle's savings") + ")")
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
        oracles = {e.get("oracle_layers_skipped_share") for e in fams.values() if "candidates" in e} - {None}
        if oracles:
            lines += ["", f"Oracle's hypothetical layers skipped on these samples: {max(oracles):.3f}; a controller's "
                      "share of the oracle's savings = its layers skipped / the oracle's."]
        lines += ["", "Candidates (most conservative first; mean risk and compute ratio on the calibration samples):", ""]
        for fam, e in fams.items():
            if "candidates" in e:
                lines.append(f"- {fam}: " + ", ".join(f"`{r['id']}` {100 * r['mean_disagreement']:.1f}% / "
                                                      f"{r['compute_ratio']:.3f}" for r in e["candidates"]))
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the test-split table
def achieved_risk(eval_dir: Optional[Path], method_id: str, criterion: str, summary_row: Optional[dict],
                  forced: Optional[dict] = None) -> Optional[float]:
    """The mean loss of ``method_id`` under ``criterion`` on the evaluated split."""
    if criterion == "sequence":
        agree = (summary_row or {}).get("token_agreement")
        return None if agree is None else 1.0 - float(agree)
    if eval_dir is None:
        return None
    per = sample_losses(eval_dir, method_id, criterion, forced)
    return float(np.mean([v[0] for v in per.values()])) if per else None


def targets_table(calibration: dict, summary_rows: Sequence[dict], eval_dir: Optional[Path] = None,
                  forced: Optional[dict] = None) -> dict[str, Any]:
    """Each controller at each calibrated target under each criterion, from the final evaluation's
    summary rows: compute, latency, layers skipped (and the share of the oracle's), token agreement
    (with CIs) and accuracy, and the risk reached on the evaluated split next to the target
    (``token`` needs the teacher-forced pass ``forced``; ``quality`` reads ``eval_dir``'s records)."""
    by_id = {r["id"]: r for r in summary_rows}
    keys = ("compute_ratio", "latency_s", "layers_skipped_share", "token_agreement", "token_agreement_ci",
            "token_agreement_diff_ci", "token_agreement_diff_significant", "edit_similarity", "edit_similarity_ci",
            "edit_similarity_diff", "edit_similarity_diff_ci", "edit_similarity_diff_significant", "codebleu",
            "codebleu_ci", "rouge_l", "bleu", "chrf", "exact_match")
    oracle = by_id.get("oracle") or {}
    oracle_skip = oracle.get("hypothetical_layers_skipped_share")
    table = []
    for crit, centry in _criteria(calibration).items():
        for t in calibration["targets"]:
            for fam, entry in centry.get("families", {}).items():
                e = (entry.get("targets") or {}).get(f"{t:g}")
                if e is None:
                    continue
                row = {"criterion": crit, "target": t, "family": fam, "method": e["chosen"],
                       "calibration_disagreement": e["calibration_disagreement"]}
                r = by_id.get(e["chosen"]) if e["chosen"] else None
                if r is not None:
                    row.update({k: r.get(k) for k in keys})
                    risk = achieved_risk(eval_dir, e["chosen"], crit, r, forced)
                    row["achieved_disagreement"] = risk
                    row["meets_target"] = None if risk is None else risk <= t
                    skip = r.get("layers_skipped_share")
                    row["oracle_savings_share"] = (float(skip) / float(oracle_skip)
                                                   if skip is not None and oracle_skip else None)
                table.append(row)
    return {"targets": calibration["targets"], "delta": calibration["delta"],
            "criteria": {k: v.get("risk") for k, v in _criteria(calibration).items()},
            "oracle_layers_skipped_share": oracle_skip, "rows": table}


def render_targets(result: dict, split: str) -> str:
    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    def ci(v):
        return "" if not v else f" [{v[0]:.3f}, {v[1]:.3f}]"

    lines = [f"# Controllers at calibrated targets ({split} split)", "",
             "Thresholds chosen on the validation split (results/<name>/calibration/calibration.md); the test "
             "split is read here only. Each criterion is calibrated on its own; risk = the criterion's mean loss. "
             f"Oracle's hypothetical layers skipped: {f(result.get('oracle_layers_skipped_share'))}; "
             "'of oracle' = the controller's layers skipped / the oracle's.", ""]
    criteria = result.get("criteria") or {"sequence": None}
    for crit, what in criteria.items():
        lines += [f"# Criterion: {crit}", "", f"{what or ''}", ""]
        for t in result["targets"]:
            rows = [r for r in result["rows"] if r.get("criterion", "sequence") == crit and r["target"] == t]
            cheapest = min((r["compute_ratio"] for r in rows if r.get("compute_ratio") is not None), default=None)
            lines += [f"## {crit}: at most {100 * t:g}% risk (δ = {result['delta']:g})", "",
                      "| controller | method | compute ratio | latency (s) | layers skipped (of oracle) | "
                      "token agreement [95% CI] | risk: calib. / test | edit similarity [95% CI] | CodeBLEU |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                if r["method"] is None:
                    lines.append(f"| {r['family']} | none certified (the full model meets it) | – | – | – | – | – | – | – |")
                    continue
                best = " **(least)**" if cheapest is not None and r.get("compute_ratio") == cheapest else ""
                sig = "*" if r.get("token_agreement_diff_significant") else ""
                lines.append(
                    f"| {r['family']} | `{r['method']}` | {f(r.get('compute_ratio'))}{best} | "
                    f"{f(r.get('latency_s'), '{:.4f}')} | {f(r.get('layers_skipped_share'))} "
                    f"({f(r.get('oracle_savings_share'), '{:.0%}')}) | "
                    f"{f(r.get('token_agreement'))}{sig}{ci(r.get('token_agreement_ci'))} | "
                    f"{f(r.get('calibration_disagreement'))} / {f(r.get('achieved_disagreement'))} | "
                    f"{f(r.get('edit_similarity'), '{:.2f}')}{ci(r.get('edit_similarity_ci'))} | {f(r.get('codebleu'))} |")
            lines.append("")
    lines.append("`*`: the token agreement differs from the full model's with a 95% CI that excludes zero.")
    return "\n".join(lines) + "\n"
