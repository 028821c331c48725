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
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

# what the evaluator reads back from this stage lives in greencode.calibrated and the teacher-forced pass in
# forced.py (both re-exported here): this module imports them, they import nothing of it, so no circle with the
# evaluator
from greencode.calibrated import (CRITERIA, TEACHER_FORCED_FILE, achieved_risk, calibrated_ids,  # noqa: F401
                                  criteria_of, file_sha256, load_calibration, load_teacher_forced,
                                  method_records, render_targets, sample_losses, targets_table, threshold_for)
from greencode.config import Config
from greencode.decoding.registry import get_controller, threshold_grid
from greencode.eval.evaluator import evaluate
from greencode.eval.forced import teacher_forced  # noqa: F401 - re-exported
from greencode.eval.methods import MethodSpec, needs
from greencode.eval.runner import require_finetuned
from greencode.eval.tuning import refuse_test_split
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.provenance import weights_record
from greencode.runinfo import run_metadata
from greencode.utils import read_json, write_json, write_text

log = logging.getLogger(__name__)

CALIBRATION_SPLIT = "validation"
FORMAT = "greencode-calibration/2"
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


def _per_sample(eval_dir: Path, method_id: str) -> Optional[dict[int, tuple[float, float]]]:
    """{sample index: (disagreement share, compute ratio)} of one evaluated method (sequence criterion)."""
    return sample_losses(eval_dir, method_id, "sequence")


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
                recs = {int(r["index"]): r for r in (method_records(eval_dir, s.id) or [])}
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


def _calibration_config(cfg: Config, out: Path, split: str) -> Config:
    """The evaluation of the candidates: ``split`` from ``calibration.sample_offset``, accuracy only (no timing,
    warmup, overhead A/B or bootstrap), into ``out``."""
    c = cfg.calibration
    return dataclasses.replace(
        cfg, results_dir=str(out),
        eval=dataclasses.replace(cfg.eval, split=split, num_samples=c.num_samples, timing_samples=0,
                                 sample_offset=c.sample_offset,
                                 overhead_ab=False, warmup_samples=0, bootstrap_resamples=0, accuracy_only_hf=[]))


def _available(paths: RunPaths, ids: list[str]) -> list[str]:
    """The method ids whose inputs (policy, classifier) the run has; the others are skipped with a warning."""
    available = []
    for i in ids:
        missing = [(n, getattr(paths, n)) for n in needs(i.split("@")[0]) if not Path(getattr(paths, n)).is_file()]
        if not missing:
            available.append(i)
        else:
            log.warning("calibration: %s skipped (no %s at %s)", i, *missing[0])
    return available


def _criteria(cfg: Config, eval_dir: Path, specs: dict, forced, token: Optional[dict]) -> dict:
    """Per criterion: each family's choice at each target, the samples it used and what it can certify."""
    c = cfg.calibration
    compute, skipped, oracle = (token["compute"], token["layers_skipped"], token.get("oracle_layers_skipped")) \
        if token else (None, None, None)
    criteria = {}
    for crit in c.criteria:
        if crit == "token":
            fams = choose(cfg, eval_dir, specs, crit, forced, compute, skipped, oracle)
        else:  # the oracle's tokens are the full model's: its exits on the teacher-forced pass are its free-running ones
            fams = choose(cfg, eval_dir, specs, crit, oracle_skipped=oracle)
        n = max((e.get("samples", 0) for e in fams.values()), default=0)
        criteria[crit] = {"risk": CRITERIA[crit], "families": fams, "samples": n,
                          "certifiable": certifiable(n, c.targets, c.delta)}
    return criteria


def _samples_record(cfg: Config, split: str, full: list[dict], token_n: int) -> dict:
    c = cfg.calibration
    return {"split": split, "sample_seed": cfg.eval.sample_seed, "offset": c.sample_offset,
            "count": len(full), "ids": [r.get("id") for r in sorted(full, key=lambda r: r["index"])],
            "token_count": token_n,
            "note": f"the first {c.sample_offset} samples of this seeded order are the tuning slice "
                    "(grids, knobs); these follow them and chose nothing. The sequence and quality "
                    f"criteria use the first {c.num_samples} (free-running), the token criterion the "
                    f"first {token_n} (one teacher-forced pass each); ids lists the free-running ones"}


def calibrate(cfg: Config, *, split: str = CALIBRATION_SPLIT) -> Path:
    """Evaluate the candidates on ``split`` (validation), choose per family and target, and
    write ``results/<name>/calibration/calibration.{json,md}``. Returns the json path."""
    refuse_test_split(split, "calibration")
    c = cfg.calibration
    paths = RunPaths.from_config(cfg)
    out = paths.calibration.parent
    require_finetuned(cfg, paths)
    loaded = EarlyExitModel.from_run_config(cfg, paths.finetuned)
    exits = loaded.exit_layers
    weights = weights_record(loaded)
    del loaded
    specs = candidate_specs(cfg, exits)
    sub = _calibration_config(cfg, out, split)
    available = _available(paths, ["full"] + [s.id for fam in specs.values() for s in fam])
    t0 = time.perf_counter()
    evaluate(sub, available)
    eval_dir = out / "eval"
    free_s = time.perf_counter() - t0
    full = method_records(eval_dir, "full") or []
    token_n = c.token_samples()
    forced = token = None
    if "token" in c.criteria:
        # the token criterion on its own (larger) slice: the same seeded order from the same offset, so its first
        # num_samples are the free-running ones (their full continuations reused); one simulated pass per sample
        tsub = dataclasses.replace(sub, eval=dataclasses.replace(sub.eval, num_samples=token_n))
        known = {int(r["index"]): [int(t) for t in r["tokens"]] for r in full if r.get("tokens")}
        forced = teacher_forced(tsub, eval_dir, available, full_tokens=known, oracle=True)
        token = read_json(eval_dir / TEACHER_FORCED_FILE)
    token_s = time.perf_counter() - t0 - free_s
    criteria = _criteria(cfg, eval_dir, specs, forced, token)
    result = {"format": FORMAT, "split": split, "num_samples": c.num_samples, "token_num_samples": token_n,
              "delta": c.delta, "targets": list(c.targets), "risk": CRITERIA["sequence"],
              "seconds": {"free_running": round(free_s, 1), "token_teacher_forced": round(token_s, 1)},
              "method": "Learn then Test: Hoeffding-Bentkus p-values, fixed-sequence testing from the most "
                        "conservative candidate; the certified candidate with the least compute",
              "samples": _samples_record(cfg, split, full, token_n),
              "families": criteria["sequence"]["families"] if "sequence" in criteria else {},
              "criteria": criteria, "policy_sha256": file_sha256(paths.policy),
              "classifier_sha256": file_sha256(paths.classifier),
              "run": run_metadata(cfg, stage="calibrate", weights=weights)}
    result["run"].pop("config", None)
    write_json(paths.calibration, result)
    write_text(out / "calibration.md", render(result))
    log.info("calibration on %d %s samples -> %s", c.num_samples, split, paths.calibration)
    return paths.calibration


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
    for crit, entry in criteria_of(result).items():
        fams = entry.get("families", {})
        lines += [f"## Criterion: {crit}", "", f"Risk: {entry.get('risk')}.", ""]
        cert = entry.get("certifiable")
        if cert and cert.get("smallest_certifiable_risk") is not None:
            most = ", ".join(f"≤ {100 * float(t):g}%: " + ("never" if v is None else f"{100 * v:.2f}%")
                             for t, v in cert["max_observed_risk"].items())
            lines += [f"n = {cert['n']} samples: the smallest risk Hoeffding-Bentkus can certify at δ = {cert['delta']:g} "
                      f"is **{100 * cert['smallest_certifiable_risk']:.2f}%** (at observed risk 0); each target is "
                      f"certified only at an observed risk up to ({most}).", ""]
        lines += ["| controller | " + " | ".join(f"≤ {100 * t:g}%" for t in result["targets"]) + " |",
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

