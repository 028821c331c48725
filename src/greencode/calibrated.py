"""Reading calibrated results: the calibration file (``results/<name>/calibration/calibration.json``)
and what is read from it: the chosen method ids, a family's threshold for a target, the per-sample
losses of each fidelity criterion, and the test-split table of every controller at every target.

Small and light on purpose (numpy and the config, no model, no decoding): the evaluator, the
calibration stage (:mod:`greencode.eval.calibration`, which writes the file) and serving
(:mod:`greencode.serve.engine`) all read it from here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from greencode.config import Config, ConfigError
from greencode.paths import RunPaths
from greencode.utils import read_json

CRITERIA = {
    "sequence": "sequence consistency: expected share of a sample's generated tokens that differ from the full "
                "model's at the same position, each free-running (1 - token agreement)",
    "token": "token consistency: expected share of positions whose token differs from the full model's when the "
             "method is fed the full model's continuation (teacher-forced)",
    "quality": "quality risk: expected loss of edit similarity against the real continuation relative to the full "
               "model, clip((ES_full - ES) / 100, 0, 1)",
}


TEACHER_FORCED_FILE = "teacher_forced.json"


def file_sha256(path) -> Optional[str]:
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def load_calibration(cfg: Config) -> Optional[dict]:
    """The run's calibration file, or None when the calibration stage has not run."""
    f = RunPaths.from_config(cfg).calibration
    return read_json(f) if f.is_file() else None


def criteria_of(calibration: dict) -> dict[str, dict]:
    """{criterion: {"families": ...}}; a format-1 file (one criterion) reads as ``sequence``."""
    return calibration.get("criteria") or {"sequence": {"risk": calibration.get("risk"),
                                                        "families": calibration.get("families", {})}}


def calibrated_ids(calibration: dict) -> list[str]:
    """The method ids the calibration chose (every criterion, family and target), without repeats."""
    seen: list[str] = []
    for crit in criteria_of(calibration).values():
        for fam in crit.get("families", {}).values():
            for t in (fam.get("targets") or {}).values():
                if t.get("chosen") and t["chosen"] not in seen:
                    seen.append(t["chosen"])
    return seen


def threshold_for(calibration: dict, family: str, target: float, criterion: str = "sequence") -> Optional[float]:
    """The calibrated parameter of ``family`` for ``target`` under ``criterion`` (the largest
    calibrated target that is at most ``target``); None when none is certified at or below it."""
    crits = criteria_of(calibration)
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


def load_teacher_forced(eval_dir: Path) -> Optional[dict]:
    """{method id: {sample index: share}} of the teacher-forced pass in ``eval_dir``, or None."""
    f = eval_dir / TEACHER_FORCED_FILE
    return read_json(f)["methods"] if f.is_file() else None


def method_records(eval_dir: Path, method_id: str) -> Optional[list]:
    """The records of ``method_id`` in an evaluation folder (``methods/<id>.json``), or None."""
    f = eval_dir / "methods" / f"{method_id}.json"
    return read_json(f)["records"] if f.is_file() else None


def compute_ratio_of(r: dict) -> Optional[float]:
    """A record's compute ratio (MACs done over the full model's), or None without a cost."""
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
    recs = method_records(eval_dir, method_id)
    if recs is None:
        return None
    full_es = None
    if criterion == "quality":
        full = method_records(eval_dir, "full")
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
        i, k = int(r["index"]), compute_ratio_of(r)
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
    for crit, centry in criteria_of(calibration).items():
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
            "criteria": {k: v.get("risk") for k, v in criteria_of(calibration).items()},
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
