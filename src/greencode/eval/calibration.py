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
                  forced: Optional[dict] = None) -> Optional[dict[int, tuple[float, float]]]:
    """{sample index: (loss under ``criterion``, compute ratio)} of one evaluated method.
    ``forced``: the teacher-forced disagreements ({method id: {index: share}}) for ``token``."""
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


def teacher_forced(cfg: Config, eval_dir: Path, method_ids: Sequence[str]) -> dict[str, dict[int, float]]:
    """Token consistency of loop methods: each is fed the full model's greedy continuation of each
    sample (``eval_dir/methods/full.json``) and its own choice at each position is compared with
    it. Returns and writes ``eval_dir/teacher_forced.json``: {method id: {sample index: share of
    positions that differ}}. Prompts x methods run as the rows of one batched decode."""
    import torch

    from greencode.decoding import generate
    from greencode.eval.evaluator import Runner, _prompt_of, load_inputs, load_samples
    from greencode.eval.methods import parse_method_name
    from greencode.utils import setup_torch

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
    out: dict[str, dict[int, float]] = {s.id: {} for s in specs}
    idx = [i for i in range(len(samples)) if i in forced_of]
    per_batch = max(1, int(cfg.eval.accuracy_batch_prompts))
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(idx), per_batch), desc="teacher-forced", unit="batch", disable=None):
        chunk = idx[start:start + per_batch]
        rows = [(i, s, c) for i in chunk for s, c in zip(specs, ctrls)]
        if not rows:
            continue
        prompts = [_prompt_of(samples[i], limit, cfg.eval.max_new_tokens) for i, _, _ in rows]
        with torch.inference_mode():
            res = generate(model, prompts, [c for _, _, c in rows], cfg.eval.max_new_tokens, eos_token_id=tok.eos_token_id,
                           kv_strategy=cfg.decoding.kv_strategy, forced_tokens=[forced_of[i] for i, _, _ in rows])
        for (i, s, _), r in zip(rows, res):
            f = forced_of[i]
            out[s.id][i] = sum(a != b for a, b in zip(r.own_tokens, f)) / len(f)
    from greencode.provenance import weights_record

    write_json(eval_dir / TEACHER_FORCED_FILE, {"format": "greencode-teacher-forced/1", "split": cfg.eval.split,
                                                 "what": CRITERIA["token"], "methods": out,
                                                 "weights": weights_record(model)})
    return out


def load_teacher_forced(eval_dir: Path) -> Optional[dict]:
    f = eval_dir / TEACHER_FORCED_FILE
    return read_json(f)["methods"] if f.is_file() else None


def choose(cfg: Config, eval_dir: Path, specs: dict[str, list[MethodSpec]], criterion: str = "sequence",
           forced: Optional[dict] = None) -> dict[str, Any]:
    """Per family and target: the certified candidates and the cheapest of them, under one criterion."""
    c = cfg.calibration
    per = {s.id: sample_losses(eval_dir, s.id, criterion, forced) for fam in specs.values() for s in fam}
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
                "calibration_compute_ratio": cost[best] if best is not None else None}
        families[fam] = {"order": [s.id for s in ran], "samples": len(common), "candidates": rows,
                         "targets": targets}
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
    evaluate(sub, available)
    eval_dir = out / "eval"
    forced = teacher_forced(sub, eval_dir, available) if "token" in c.criteria else None
    criteria = {crit: {"risk": CRITERIA[crit], "families": choose(cfg, eval_dir, specs, crit, forced)}
                for crit in c.criteria}
    families = criteria["sequence"]["families"] if "sequence" in criteria else {}
    full = _records(eval_dir, "full") or []
    result = {"format": FORMAT, "split": split, "num_samples": c.num_samples, "delta": c.delta,
              "targets": list(c.targets), "risk": CRITERIA["sequence"],
              "method": "Learn then Test: Hoeffding-Bentkus p-values, fixed-sequence testing from the most "
                        "conservative candidate; the certified candidate with the least compute",
              "samples": {"split": split, "sample_seed": cfg.eval.sample_seed, "offset": c.sample_offset,
                          "count": len(full), "ids": [r.get("id") for r in sorted(full, key=lambda r: r["index"])],
                          "note": f"the first {c.sample_offset} samples of this seeded order are the tuning slice "
                                  "(grids, knobs); these follow them and chose nothing"},
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
    lines = [f"# Calibrated thresholds ({result['split']} split, {result['num_samples']} samples, "
             f"delta = {result['delta']:g})", "",
             f"{result['method']}.", ""]
    if samples:
        lines += [f"Calibration samples: {samples.get('count')} of the {result['split']} split's seeded order (seed "
                  f"{samples.get('sample_seed')}), from position {samples.get('offset')} on: {samples.get('note')}. "
                  "Their ids are in calibration.json.", ""]
    for crit, entry in _criteria(result).items():
        fams = entry.get("families", {})
        lines += [f"## Criterion: {crit}", "", f"Risk: {entry.get('risk')}.", "",
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
                    cells.append(f"`{x['chosen']}` (compute {x['calibration_compute_ratio']:.3f}, "
                                 f"risk {100 * x['calibration_disagreement']:.1f}%)")
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
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
