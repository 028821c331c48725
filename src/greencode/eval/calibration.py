"""Calibrated targets: every exit controller at the threshold that meets a fidelity target
with the least compute, chosen on the validation split (Learn then Test, as in CALM).

The risk of a threshold is the expected share of a sample's generated tokens that differ
from the full model's at the same position (1 - token agreement, per sample, so the
calibration samples are independent). A user target ``alpha`` (``calibration.targets``:
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
from greencode.eval.methods import MethodSpec
from greencode.eval.tuning import refuse_test_split
from greencode.paths import RunPaths
from greencode.utils import read_json, run_metadata, write_json, write_text

log = logging.getLogger(__name__)

CALIBRATION_SPLIT = "validation"
FORMAT = "greencode-calibration/1"


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
    """Each calibrated family's candidates, most conservative first (an order fixed a priori)."""
    c = cfg.calibration
    out: dict[str, list[MethodSpec]] = {}
    for fam in c.families:
        if fam == "fixed":
            out[fam] = [MethodSpec("fixed", int(layer)) for layer in sorted(exit_layers, reverse=True)]
        elif fam == "entropy":
            out[fam] = [MethodSpec(fam, float(t)) for t in sorted(set(c.entropy_thresholds))]
        else:
            grid = getattr(c, f"{fam}_thresholds")
            out[fam] = [MethodSpec(fam, float(t)) for t in sorted(set(grid), reverse=True)]
    return out


def _per_sample(eval_dir: Path, method_id: str) -> Optional[dict[int, tuple[float, float]]]:
    """{sample index: (disagreement share, compute ratio)} of one evaluated method."""
    f = eval_dir / "methods" / f"{method_id}.json"
    if not f.is_file():
        return None
    out = {}
    for r in read_json(f)["records"]:
        agree = r.get("token_agreement")
        cost = r.get("cost") or {}
        if agree is None or not cost.get("macs_full"):
            continue
        out[int(r["index"])] = (1.0 - float(agree), float(cost["macs_done"]) / float(cost["macs_full"]))
    return out


def choose(cfg: Config, eval_dir: Path, specs: dict[str, list[MethodSpec]]) -> dict[str, Any]:
    """Per family and target: the certified candidates and the cheapest of them."""
    c = cfg.calibration
    per = {s.id: _per_sample(eval_dir, s.id) for fam in specs.values() for s in fam}
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
    exits = EarlyExitModel.from_run_config(cfg, paths.finetuned).exit_layers
    specs = candidate_specs(cfg, exits)
    sub = dataclasses.replace(
        cfg, results_dir=str(out),
        eval=dataclasses.replace(cfg.eval, split=split, num_samples=c.num_samples, timing_samples=0,
                                 overhead_ab=False, warmup_samples=0, bootstrap_resamples=0, accuracy_only_hf=[]))
    ids = ["full"] + [s.id for fam in specs.values() for s in fam]
    needs = {"gc": "policy", "classifier": "classifier"}
    available = []
    for i in ids:
        fam = i.split("@")[0]
        f = getattr(paths, needs[fam]) if fam in needs else None
        if f is None or Path(f).is_file():
            available.append(i)
        else:
            log.warning("calibration: %s skipped (no %s at %s)", i, needs[fam], f)
    evaluate(sub, available)
    families = choose(cfg, out / "eval", specs)
    result = {"format": FORMAT, "split": split, "num_samples": c.num_samples, "delta": c.delta,
              "targets": list(c.targets), "risk": "expected share of a sample's generated tokens that differ from "
              "the full model's at the same position (1 - token agreement)",
              "method": "Learn then Test: Hoeffding-Bentkus p-values, fixed-sequence testing from the most "
                        "conservative candidate; the certified candidate with the least compute",
              "families": families, "policy_sha256": file_sha256(paths.policy),
              "classifier_sha256": file_sha256(paths.classifier), "run": run_metadata(cfg, stage="calibrate")}
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


def calibrated_ids(calibration: dict) -> list[str]:
    """The method ids the calibration chose (every family, every target), without repeats."""
    seen: list[str] = []
    for fam in calibration.get("families", {}).values():
        for t in (fam.get("targets") or {}).values():
            if t.get("chosen") and t["chosen"] not in seen:
                seen.append(t["chosen"])
    return seen


def threshold_for(calibration: dict, family: str, target: float) -> Optional[float]:
    """The calibrated parameter of ``family`` for ``target`` (the largest calibrated target that
    is at most ``target``); None when none is certified at or below it."""
    fam = (calibration.get("families") or {}).get(family) or {}
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
    lines = [f"# Calibrated thresholds ({result['split']} split, {result['num_samples']} samples, "
             f"delta = {result['delta']:g})", "",
             f"Risk: {result['risk']}. {result['method']}.", "",
             "| controller | " + " | ".join(f"≤ {100 * t:g}%" for t in result["targets"]) + " |",
             "|---|" + "---|" * len(result["targets"])]
    for fam, entry in result["families"].items():
        if "skipped" in entry:
            lines.append(f"| {fam} | " + " | ".join("–" for _ in result["targets"]) + f" |  ({entry['skipped']})")
            continue
        cells = []
        for t in result["targets"]:
            e = entry["targets"][f"{t:g}"]
            if e["chosen"] is None:
                cells.append("none certified")
            else:
                cells.append(f"`{e['chosen']}` (compute {e['calibration_compute_ratio']:.3f}, "
                             f"disagree {100 * e['calibration_disagreement']:.1f}%)")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", "Candidates (most conservative first; mean disagreement and compute ratio on the calibration "
              "samples):", ""]
    for fam, entry in result["families"].items():
        if "candidates" in entry:
            lines.append(f"- {fam}: " + ", ".join(f"`{r['id']}` {100 * r['mean_disagreement']:.1f}% / "
                                                  f"{r['compute_ratio']:.3f}" for r in entry["candidates"]))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the test-split table
def targets_table(calibration: dict, summary_rows: Sequence[dict]) -> dict[str, Any]:
    """Each controller at each calibrated target, from the final evaluation's summary rows:
    compute, latency, layers skipped, token agreement (with CIs) and accuracy, and the
    disagreement reached on the evaluated split next to the target."""
    by_id = {r["id"]: r for r in summary_rows}
    keys = ("compute_ratio", "latency_s", "layers_skipped_share", "token_agreement", "token_agreement_ci",
            "token_agreement_diff_ci", "token_agreement_diff_significant", "edit_similarity", "edit_similarity_ci",
            "edit_similarity_diff", "edit_similarity_diff_ci", "edit_similarity_diff_significant", "codebleu",
            "codebleu_ci", "rouge_l", "bleu", "chrf", "exact_match")
    table = []
    for t in calibration["targets"]:
        for fam, entry in calibration["families"].items():
            e = (entry.get("targets") or {}).get(f"{t:g}")
            if e is None:
                continue
            row = {"target": t, "family": fam, "method": e["chosen"],
                   "calibration_disagreement": e["calibration_disagreement"]}
            r = by_id.get(e["chosen"]) if e["chosen"] else None
            if r is not None:
                row.update({k: r.get(k) for k in keys})
                agree = r.get("token_agreement")
                row["achieved_disagreement"] = None if agree is None else 1.0 - float(agree)
                row["meets_target"] = None if agree is None else (1.0 - float(agree)) <= t
            table.append(row)
    return {"targets": calibration["targets"], "delta": calibration["delta"], "rows": table}


def render_targets(result: dict, split: str) -> str:
    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    def ci(v):
        return "" if not v else f" [{v[0]:.3f}, {v[1]:.3f}]"

    lines = [f"# Controllers at calibrated targets ({split} split)", "",
             "Thresholds chosen on the validation split (results/<name>/calibration/calibration.md); the test "
             "split is read here only. Disagreement = 1 - token agreement with the full model.", ""]
    for t in result["targets"]:
        rows = [r for r in result["rows"] if r["target"] == t]
        cheapest = min((r["compute_ratio"] for r in rows if r.get("compute_ratio") is not None), default=None)
        lines += [f"## Target: at most {100 * t:g}% disagreement (risk δ = {result['delta']:g})", "",
                  "| controller | method | compute ratio | latency (s) | layers skipped | token agreement [95% CI] | "
                  "disagreement: calib. / test | edit similarity [95% CI] | CodeBLEU |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["method"] is None:
                lines.append(f"| {r['family']} | none certified (the full model meets it) | – | – | – | – | – | – | – |")
                continue
            best = " **(least)**" if cheapest is not None and r.get("compute_ratio") == cheapest else ""
            sig = "*" if r.get("token_agreement_diff_significant") else ""
            lines.append(
                f"| {r['family']} | `{r['method']}` | {f(r.get('compute_ratio'))}{best} | {f(r.get('latency_s'), '{:.4f}')} | "
                f"{f(r.get('layers_skipped_share'))} | {f(r.get('token_agreement'))}{sig}{ci(r.get('token_agreement_ci'))} | "
                f"{f(r.get('calibration_disagreement'))} / {f(r.get('achieved_disagreement'))} | "
                f"{f(r.get('edit_similarity'), '{:.2f}')}{ci(r.get('edit_similarity_ci'))} | {f(r.get('codebleu'))} |")
        lines.append("")
    lines.append("`*`: the token agreement differs from the full model's with a 95% CI that excludes zero.")
    return "\n".join(lines) + "\n"
