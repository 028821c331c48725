"""From per-sample records to the summary table: aggregation, deltas, shard merging, files.

Everything here is pure arithmetic over plain dicts (JSON-ready), so it is tested without
a model and it is what merges the shards written by ``accelerate launch`` processes.

A *record* is one generation (one method on one sample)::

    index, id, prediction, reference, new_tokens, tokens, exit_layers (0-based, per token or null),
    finish_reason, prompt_tokens, latency_s, energy_j (or null), gpu_energy_j, cpu_energy_j,
    energy_note, counters (decoding-loop counters or null),
    cost = {decode_steps, layers_run, layer_steps_full, macs_done, macs_full}

A *shard* is what one process produced: ``{"format", "rank", "world_size", "meta", "methods":
{id: {"spec", "records"}}, "skipped": [...], "overhead_ab": {...} or null}``.

Same samples for every row: :func:`common_samples` restricts every method to the samples all of
them decoded before anything is computed, so each row of the table (and each point of a figure
drawn from it) is scored on the same samples; ``sample_set`` (a hash of the sample ids) shows it
per row. The evaluator decodes every method on every sample, so the set is normally all of them;
when a config leaves HF-generate families to the timed samples (``eval.accuracy_only_hf``), every
row is scored on those, with a note.

Exact match with its boilerplate separated: ``exact_match_boilerplate_share`` (share of the
matches whose reference is licence-header text or blank, :func:`greencode.eval.metrics.is_boilerplate`)
and ``exact_match_no_boilerplate`` (exact match on the other samples, with its paired CI).

Units and scales: seconds, joules, tokens per second; shares in [0, 1]; ``*_delta_pct`` in
percent of the reference row (``full``, the fine-tuned model with all layers in our loop;
``full_hf`` when ``full`` was not run). Accuracy scales are in ``scales`` (CodeBLEU, ROUGE-L
and EM 0-1; BLEU, chrF and edit similarity 0-100).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from greencode.eval.metrics import SCALES, compute_metrics, exact_match_breakdown, is_boilerplate, sample_metrics
from greencode.eval.stats import CI_KEYS, add_agreement, add_confidence
from greencode.utils import read_json, write_json, write_text

log = logging.getLogger(__name__)

SHARD_FORMAT = "greencode-eval-shard/1"
SUMMARY_FORMAT = "greencode-eval-summary/1"

METRIC_KEYS = ("codebleu", "codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax", "codebleu_dataflow",
               "rouge_l", "bleu", "chrf", "exact_match", "edit_similarity")
# exact match with its boilerplate separated (greencode.eval.metrics.exact_match_breakdown)
EXACT_MATCH_KEYS = ("exact_match_boilerplate_share", "exact_match_no_boilerplate", "boilerplate_reference_share",
                    "num_samples_no_boilerplate")
EFFICIENCY_KEYS = ("latency_s", "tokens_per_s", "energy_j", "mean_exit_layer", "layers_skipped_share",
                   "compute_ratio", "controller_overhead_share", "controller_overhead_share_ab")
DELTA_KEYS = METRIC_KEYS + ("latency_s", "tokens_per_s", "energy_j", "compute_ratio")

def _ci_columns() -> tuple[str, ...]:
    cols: list[str] = []
    for k in CI_KEYS:
        cols += [f"{k}_mean", f"{k}_ci_low", f"{k}_ci_high", f"{k}_diff", f"{k}_diff_ci_low", f"{k}_diff_ci_high",
                 f"{k}_diff_significant"]
    return tuple(cols)


CSV_COLUMNS = (("id", "family", "param", "num_samples", "timed_samples", "sample_set") + METRIC_KEYS
               + EXACT_MATCH_KEYS + EFFICIENCY_KEYS
               + ("latency_s_median", "new_tokens_mean", "energy_source", "energy_null_reason", "analysis_only",
                  "hypothetical_layers_skipped_share", "same_output_as_reference_share")
               + tuple(f"{k}_delta_pct" for k in DELTA_KEYS) + _ci_columns())
UNITS = {
    "latency_s": "seconds per sample (one generation: prefill + decode), mean over samples",
    "tokens_per_s": "new tokens / second = sum(new_tokens) / sum(latency_s)",
    "energy_j": "joules per sample, mean over samples; null when no energy counter was readable (reason given)",
    "mean_exit_layer": "0-based layer that produced each token, mean over decode-step tokens (the first token "
                       "of every method comes from the full-model prefill and is excluded)",
    "layers_skipped_share": "1 - decoder layers run / (decode steps x num_layers); negative = extra layer work",
    "compute_ratio": "hardware-independent: multiply-accumulates of the decode steps (layers run, K/V "
                     "propagation, LM-head calls, exit checks) over the fine-tuned full model's for the same steps",
    "controller_overhead_share": "time inside the exit controller / decode time (aggregated loop timers)",
    "controller_overhead_share_ab": "A/B run: (decode time with the policy evaluated but ignored - without it) / "
                                    "without it, same samples, interleaved",
    "*_delta_pct": "100 x (value - reference) / |reference|, reference = the fine-tuned all-layers row",
    "exact_match_boilerplate_share": "share of this method's exact matches whose reference is boilerplate "
                                     "(licence/copyright header text or blank; greencode.eval.metrics.is_boilerplate)",
    "exact_match_no_boilerplate": "exact match (0-1) on the samples whose reference is not boilerplate",
    "sample_set": "hash of the sample ids the row is scored on (the same for every row)",
    "token_agreement": "share of the reference method's generated tokens that this method generated at the same "
                       "position, mean over samples (the primary fidelity measure)",
    "prefix_match": "number of leading generated tokens equal to the reference method's, mean over samples",
    "*_mean / *_ci": "mean per-sample value and its 95% paired-bootstrap interval (sentence-level scores for "
                     "BLEU, chrF and CodeBLEU; the accuracy table's columns are corpus-level)",
    "*_diff / *_diff_ci / *_diff_significant": "this method minus the reference, mean over paired samples, its "
                                               "95% paired-bootstrap interval, and whether that interval excludes 0",
}


# --------------------------------------------------------------------------- arithmetic
def delta_pct(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """Relative change in percent; None when either side is missing or the reference is 0."""
    if value is None or reference is None or reference == 0 or _nan(value) or _nan(reference):
        return None
    return 100.0 * (float(value) - float(reference)) / abs(float(reference))


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den else None


def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def aggregate_efficiency(records: Sequence[dict]) -> dict[str, Any]:
    """Efficiency numbers of one method from its records (no accuracy metrics)."""
    n = len(records)
    if n == 0:
        raise ValueError("no records to aggregate; the method produced no generations")
    # latency and energy come from the timed samples only (eval.timing_samples); the rest were
    # decoded for accuracy with a shared prefill and carry no timing
    timed = [r for r in records if r.get("latency_s") is not None]
    latencies = [float(r["latency_s"]) for r in timed]
    timed_tokens = sum(int(r["new_tokens"]) for r in timed)
    new_tokens = sum(int(r["new_tokens"]) for r in records)
    energies = [r.get("energy_j") for r in timed]
    energy_ok = bool(timed) and all(e is not None for e in energies)
    reason = None
    if not energy_ok:
        reason = next((r.get("energy_note") for r in timed if r.get("energy_j") is None and r.get("energy_note")),
                      "energy not measured" if timed else "no timed samples")
    costs = [r.get("cost") or {} for r in records]
    steps_full = sum(c.get("layer_steps_full", 0) for c in costs)
    layers_run = sum(c.get("layers_run", 0) for c in costs)
    macs_full = sum(c.get("macs_full", 0) for c in costs)
    macs_done = sum(c.get("macs_done", 0) for c in costs)
    decode_exits = [e for r in records if r.get("exit_layers") for e in r["exit_layers"][1:]]
    counters = [r["counters"] for r in timed if r.get("counters")]  # batched rows share their timers: left out
    controller_share = None
    if counters and len(counters) == len(timed):
        controller_share = _ratio(sum(c.get("controller_time_s", 0.0) for c in counters),
                                  sum(c.get("decode_time_s", 0.0) for c in counters))
    has_cost = all("macs_full" in c for c in costs)
    spec_counters = [r["counters"] for r in records if (r.get("counters") or {}).get("rounds") is not None]
    drafted = sum(c.get("drafted", 0) for c in spec_counters)
    lossless = {"acceptance_rate": _ratio(sum(c.get("accepted", 0) for c in spec_counters), drafted),
                "mean_draft_length": _ratio(drafted, sum(c.get("rounds", 0) for c in spec_counters))} \
        if spec_counters else {}
    return {
        **lossless,
        "num_samples": n,
        "timed_samples": len(timed),
        "latency_s": _mean(latencies),
        "latency_s_median": float(statistics.median(latencies)) if latencies else None,
        "tokens_per_s": _ratio(timed_tokens, sum(latencies)) if latencies else None,
        "new_tokens_mean": new_tokens / n,
        "energy_j": _mean([float(e) for e in energies]) if energy_ok else None,
        "energy_null_reason": reason,
        "mean_exit_layer": _mean(decode_exits) if decode_exits else None,
        "layers_skipped_share": (1.0 - layers_run / steps_full) if (has_cost and steps_full) else None,
        "compute_ratio": _ratio(macs_done, macs_full) if has_cost else None,
        "controller_overhead_share": controller_share,
    }


def overhead_ab_summary(ab: Optional[dict]) -> Optional[dict]:
    """Summarise the A/B run: decode time with the policy evaluated but ignored vs. not evaluated."""
    if not ab or not ab.get("records"):
        return None
    recs = ab["records"]
    t_full = sum(r["decode_time_s_full"] for r in recs)
    t_pol = sum(r["decode_time_s_policy"] for r in recs)
    paired = [r["decode_time_s_policy"] / r["decode_time_s_full"] - 1.0 for r in recs if r["decode_time_s_full"] > 0]
    return {
        "threshold": ab.get("threshold"),
        "num_samples": len(recs),
        "decode_time_s_full": t_full,
        "decode_time_s_policy_ignored": t_pol,
        "controller_time_s": sum(r.get("controller_time_s", 0.0) for r in recs),
        "overhead_share": (t_pol - t_full) / t_full if t_full else None,
        "overhead_share_median_paired": float(statistics.median(paired)) if paired else None,
        "same_tokens": all(r.get("same_tokens", True) for r in recs),
        "note": "PolicyExit(ignore_decision=True) vs NeverExit on the same samples, order alternating per sample; "
                "decode time only (the prefill is identical)",
    }


def sample_set_id(records: Sequence[dict]) -> str:
    """A short hash of the sample indices and ids of some records: equal for two rows scored on the
    same samples."""
    import hashlib

    keys = sorted((int(r["index"]), str(r.get("id"))) for r in records)
    return hashlib.sha256(repr(keys).encode()).hexdigest()[:12]


def common_samples(methods: dict) -> Optional[str]:
    """Restrict every method's records (in place) to the samples every method decoded, so every row
    is scored on the same samples. Returns a note when samples were left out, else None."""
    if not methods:
        return None
    sets = {mid: {int(r["index"]) for r in e["records"]} for mid, e in methods.items()}
    common = set.intersection(*sets.values())
    dropped = {mid: len(s - common) for mid, s in sets.items() if s - common}
    if not dropped:
        return None
    for e in methods.values():
        e["records"] = [r for r in e["records"] if int(r["index"]) in common]
    short = sorted((mid for mid in sets if len(sets[mid]) == len(common)))
    note = (f"every row is scored on the {len(common)} samples all methods decoded (the others left out: "
            + ", ".join(f"{mid} {n}" for mid, n in dropped.items()) + "); decoded on fewer: "
            + ", ".join(short) + " (eval.accuracy_only_hf lists the HF-generate families decoded on every sample)")
    log.warning(note)
    return note


def build_rows(merged: dict, metrics_fn=None, sample_metrics_fn=None) -> list[dict]:
    """One summary row per evaluated method (accuracy + efficiency + deltas vs the reference), every
    row on the same samples (:func:`common_samples`; a note in ``merged["meta"]["notes"]`` when some
    were left out). Fills each record's per-sample ``metrics`` and ``boilerplate_reference`` in place."""
    if metrics_fn is None or sample_metrics_fn is None:
        metrics_fn = metrics_fn or compute_metrics
        sample_metrics_fn = sample_metrics_fn or sample_metrics
    meta = merged["meta"]
    language = meta["language"]
    note = common_samples(merged["methods"])
    if note:
        meta["notes"] = list(meta.get("notes") or []) + [note]
    ab = overhead_ab_summary(merged.get("overhead_ab"))
    rows = []
    for mid, entry in merged["methods"].items():
        spec, records = entry["spec"], entry["records"]
        for r in records:
            r["metrics"] = sample_metrics_fn(r["prediction"], r["reference"], language)
            r["boilerplate_reference"] = is_boilerplate(r["reference"])
            if "exact_match" in r["metrics"]:
                r["metrics"]["exact_match_no_boilerplate"] = (None if r["boilerplate_reference"]
                                                              else r["metrics"]["exact_match"])
        acc = metrics_fn([r["prediction"] for r in records], [r["reference"] for r in records], language)
        row: dict[str, Any] = {"id": mid, "family": spec["family"],
                               "param": spec.get("layer", spec.get("threshold")),
                               "description": spec.get("description")}
        row.update({k: acc.get(k) for k in METRIC_KEYS})
        row["codebleu_dataflow_counted_as_one"] = acc.get("codebleu_dataflow_counted_as_one")
        if all("exact_match" in r["metrics"] for r in records):
            row.update(exact_match_breakdown([r["metrics"]["exact_match"] for r in records],
                                             [r["boilerplate_reference"] for r in records]))
        else:
            row.update({k: None for k in EXACT_MATCH_KEYS})
        row.update(aggregate_efficiency(records))
        row["sample_set"] = sample_set_id(records)
        row["energy_source"] = meta.get("energy_source")
        row["controller_overhead_share_ab"] = ab["overhead_share"] if (ab and spec["family"] == "gc") else None
        row["analysis_only"] = spec["family"] == "oracle"
        row["hypothetical_layers_skipped_share"] = None
        if spec["family"] == "oracle":
            num_layers = int(meta["num_layers"])
            exits = [e for r in records for e in (r.get("exit_layers") or [])[1:]]
            if exits:
                row["hypothetical_layers_skipped_share"] = 1.0 - sum(e + 1 for e in exits) / (len(exits) * num_layers)
        rows.append(row)
    ref_id = add_deltas(rows, merged["methods"])

    add_agreement(merged["methods"], ref_id)
    add_confidence(rows, merged["methods"], ref_id, resamples=int(meta.get("bootstrap_resamples", 2000) or 0),
                   seed=int(meta.get("bootstrap_seed", 0) or 0))
    for row in rows:
        row["token_agreement"] = row.get("token_agreement_mean")
        row["prefix_match"] = row.get("prefix_match_mean")
    return rows


def reference_id(ids: Iterable[str]) -> Optional[str]:
    ids = list(ids)
    return next((r for r in ("full", "full_hf") if r in ids), None)


def add_deltas(rows: list[dict], methods: Optional[dict] = None) -> Optional[str]:
    """Add ``<key>_delta_pct`` against the reference row (``full``, else ``full_hf``) and, when
    records are given, ``same_output_as_reference_share``. Returns the reference id."""
    ref_id = reference_id(r["id"] for r in rows)
    ref = next((r for r in rows if r["id"] == ref_id), None)
    ref_tokens = None
    if methods is not None and ref_id is not None:
        ref_tokens = {rec["index"]: rec["tokens"] for rec in methods[ref_id]["records"]}
    for row in rows:
        row["reference_method"] = ref_id
        for k in DELTA_KEYS:
            row[f"{k}_delta_pct"] = delta_pct(row.get(k), ref.get(k)) if ref is not None else None
        row["same_output_as_reference_share"] = None
        if ref_tokens is not None:
            recs = methods[row["id"]]["records"]
            same = [rec["tokens"] == ref_tokens.get(rec["index"]) for rec in recs]
            row["same_output_as_reference_share"] = sum(same) / len(same) if same else None
    return ref_id


GOAL = {"min_compute_saving_pct": 40.0, "min_latency_saving_pct": 30.0, "max_codebleu_loss_pct": 2.0}


def goal_check(rows: Sequence[dict], goal: Optional[dict] = None) -> Optional[dict]:
    """The issue's goal, checked on the table: a GC threshold saving >= 40% of the compute and
    >= 30% of the latency of the fine-tuned all-layers model while losing <= 2% CodeBLEU
    (relative); and GC ahead of the confidence and entropy exits at equal accuracy: no
    confidence/entropy row reaches at least a GC row's CodeBLEU with no more compute."""
    goal = dict(goal or GOAL)
    gc_rows = [r for r in rows if r.get("family") == "gc"]
    if not gc_rows:
        return None
    baselines = [r for r in rows if r.get("family") in ("confidence", "entropy")]
    per_row = []
    for r in gc_rows:
        c, lat, cb = r.get("compute_ratio_delta_pct"), r.get("latency_s_delta_pct"), r.get("codebleu_delta_pct")
        meets = (c is not None and lat is not None and cb is not None and c <= -goal["min_compute_saving_pct"]
                 and lat <= -goal["min_latency_saving_pct"] and cb >= -goal["max_codebleu_loss_pct"])
        dominated_by = [b["id"] for b in baselines
                        if None not in (b.get("codebleu"), r.get("codebleu"), b.get("compute_ratio"),
                                        r.get("compute_ratio"))
                        and b["codebleu"] >= r["codebleu"] and b["compute_ratio"] <= r["compute_ratio"]]
        per_row.append({"id": r["id"], "compute_saving_pct": None if c is None else -c,
                        "latency_saving_pct": None if lat is None else -lat,
                        "codebleu_change_pct": cb, "meets_goal": meets, "dominated_by": dominated_by})
    return {"goal": goal, "rows": per_row, "met_by": [x["id"] for x in per_row if x["meets_goal"]],
            "gc_ahead_of_confidence_entropy": all(not x["dominated_by"] for x in per_row) if baselines else None,
            "note": "dominated_by: confidence/entropy rows with CodeBLEU >= this GC row's and compute_ratio <= it"}


# --------------------------------------------------------------------------- shards
def merge_shards(shards: Sequence[dict]) -> dict:
    """Merge the shards of all processes (sample ``i`` went to rank ``i % world_size``) into
    one shard-shaped dict with rank None and records sorted by sample index."""
    if not shards:
        raise ValueError("no shards to merge")
    for s in shards:
        if s.get("format") != SHARD_FORMAT:
            raise ValueError(f"not an evaluation shard (format {s.get('format')!r}, expected {SHARD_FORMAT!r})")
    world = {s["world_size"] for s in shards}
    if len(world) != 1:
        raise ValueError(f"shards disagree on the number of processes: {sorted(world)}")
    (n,) = world
    ranks = sorted(s["rank"] for s in shards)
    if ranks != list(range(n)):
        raise ValueError(f"expected shards of ranks 0..{n - 1}, got ranks {ranks}; a process failed or its shard "
                         "is missing")
    method_sets = {tuple(s["methods"]) for s in shards}
    if len(method_sets) != 1:
        raise ValueError(f"shards evaluated different methods: {[list(m) for m in method_sets]}")
    first = min(shards, key=lambda s: s["rank"])
    methods: dict[str, dict] = {}
    for mid in first["methods"]:
        records = [r for s in shards for r in s["methods"][mid]["records"]]
        records.sort(key=lambda r: r["index"])
        idx = [r["index"] for r in records]
        if len(set(idx)) != len(idx):
            raise ValueError(f"method {mid!r}: sample indices appear in more than one shard")
        methods[mid] = {"spec": first["methods"][mid]["spec"], "records": records}
    skipped: dict[str, dict] = {}
    for s in shards:
        for item in s.get("skipped", []):
            skipped.setdefault(item["id"], item)
    for mid in [m for m, e in methods.items() if not e["records"]]:  # e.g. a timed-only method, timing_samples=0
        spec = methods.pop(mid)["spec"]
        skipped.setdefault(mid, {"id": mid, "family": spec.get("family"),
                                 "reason": "no sample was decoded with it (HF's full model and assistant_early_exit "
                                           "run on the timed samples only, and eval.timing_samples=0; list them in "
                                           "eval.accuracy_only_hf to decode them on every sample)"})
    ab = None
    abs_ = [s.get("overhead_ab") for s in shards if s.get("overhead_ab")]
    if abs_:
        recs = sorted((r for a in abs_ for r in a["records"]), key=lambda r: r["index"])
        ab = {**{k: v for k, v in abs_[0].items() if k != "records"}, "records": recs}
    meta = dict(first["meta"])
    meta["world_size"] = n
    return {"format": SHARD_FORMAT, "rank": None, "world_size": n, "meta": meta, "methods": methods,
            "skipped": list(skipped.values()), "overhead_ab": ab}


# --------------------------------------------------------------------------- files
def check_writable(directory: Union[str, Path]) -> Path:
    """Fail early, before any work, when ``directory`` cannot be created or written."""
    directory = Path(directory)
    parent = directory.parent
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"results path {str(directory)!r} exists and is not a directory; remove it or set "
                                 "results_dir to another location")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write results under {str(parent)!r} ({e.strerror or e}); set results_dir to a "
                              "writable location (e.g. results_dir=/tmp/greencode-results)") from e
    if directory.exists() and not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"results directory {str(directory)!r} is not writable; fix its permissions or set "
                              "results_dir to a writable location")
    return directory


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:+.1f}%"


def render_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat = dict(r)
        for k, v in r.items():  # [low, high] intervals -> two columns
            if k.endswith("_ci") and isinstance(v, (list, tuple)) and len(v) == 2:
                flat[f"{k}_low"], flat[f"{k}_high"] = v
        w.writerow({k: ("" if flat.get(k) is None else flat.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in rows]


def _accuracy_section(summary: dict) -> list[str]:
    rows = summary["rows"]
    head = ["method"] + list(METRIC_KEYS) + ["EM: boilerplate share", "EM w/o boilerplate", "Δ codebleu"]
    lines = ["## Accuracy", ""] + _table(head, (
        [f"`{r['id']}`"] + [_fmt(r.get(k)) for k in METRIC_KEYS]
        + [_fmt(r.get("exact_match_boilerplate_share")), _fmt(r.get("exact_match_no_boilerplate")),
           _pct(r.get("codebleu_delta_pct"))] for r in rows))
    lines += ["", "Scales: " + ", ".join(f"{k} {v}" for k, v in summary.get("scales", {}).items()) + "."]
    bp = next((r for r in rows if r.get("boilerplate_reference_share") is not None), None)
    if bp is not None:
        lines.append(f"Exact match: {_fmt(100 * bp['boilerplate_reference_share'], 3)}% of the references are "
                     "boilerplate (licence/copyright header text or blank); `EM: boilerplate share` is the share of a "
                     "method's exact matches on them, `EM w/o boilerplate` the exact match on the other "
                     f"{bp.get('num_samples_no_boilerplate')} samples. Every row is scored on the same "
                     f"{summary['num_samples']} samples.")
    return lines + _ci_section(rows, summary.get("reference_method"), summary.get("bootstrap"))


def _efficiency_cells(r: dict) -> list[str]:
    name = f"`{r['id']}`" + (" (analysis only)" if r.get("analysis_only") else "")
    skipped_cell = _fmt(r.get("layers_skipped_share"))
    if r.get("hypothetical_layers_skipped_share") is not None:
        skipped_cell += f" (hypothetical {_fmt(r['hypothetical_layers_skipped_share'])})"
    return [name, _fmt(r.get("latency_s")), _fmt(r.get("tokens_per_s")), _fmt(r.get("energy_j")),
            _fmt(r.get("mean_exit_layer")), skipped_cell, _fmt(r.get("compute_ratio")),
            _fmt(r.get("controller_overhead_share")), _fmt(r.get("controller_overhead_share_ab")),
            _pct(r.get("latency_s_delta_pct")), _pct(r.get("tokens_per_s_delta_pct")),
            _pct(r.get("energy_j_delta_pct")), _pct(r.get("compute_ratio_delta_pct"))]


def _efficiency_section(summary: dict) -> list[str]:
    head = ["method", "latency_s", "tokens_per_s", "energy_j", "mean_exit_layer", "layers_skipped_share",
            "compute_ratio", "controller_overhead_share", "controller_overhead_share_ab", "Δ latency", "Δ tokens/s",
            "Δ energy", "Δ compute"]
    lines = ["## Efficiency", ""] + _table(head, (_efficiency_cells(r) for r in summary["rows"]))
    lines += ["", "Units:"] + [f"- `{k}`: {v}" for k, v in UNITS.items()]
    ab = summary.get("overhead_ab")
    if ab:
        lines.append("")
        lines.append(f"Controller overhead A/B at GC threshold {ab['threshold']}: decode time "
                     f"{ab['decode_time_s_policy_ignored']:.4f} s with the policy evaluated (decision ignored) vs "
                     f"{ab['decode_time_s_full']:.4f} s without, over {ab['num_samples']} samples: overhead share "
                     f"{_fmt(ab['overhead_share'])} (median paired {_fmt(ab['overhead_share_median_paired'])}).")
    return lines


def _goal_and_notes(summary: dict) -> list[str]:
    lines = []
    goal, ref = summary.get("goal_check"), summary.get("reference_method")
    if goal:
        g = goal["goal"]
        lines.append("")
        lines.append(f"Goal (>= {g['min_compute_saving_pct']:g}% compute and >= {g['min_latency_saving_pct']:g}% "
                     f"latency saved vs `{ref}`, <= {g['max_codebleu_loss_pct']:g}% CodeBLEU lost): "
                     + (f"met by {', '.join(f'`{m}`' for m in goal['met_by'])}" if goal["met_by"] else "not met")
                     + ". GC ahead of confidence/entropy at equal accuracy: "
                     + {True: "yes", False: "no", None: "not compared"}[goal["gc_ahead_of_confidence_entropy"]] + ".")
        for x in goal["rows"]:
            if x["dominated_by"]:
                lines.append(f"- `{x['id']}` is matched or beaten (CodeBLEU >=, compute <=) by "
                             + ", ".join(f"`{d}`" for d in x["dominated_by"]))
    notes = summary.get("notes") or []
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if summary.get("skipped"):
        lines += ["", "## Skipped methods", ""] + [f"- `{s['id']}`: {s['reason']}" for s in summary["skipped"]]
    return lines


def render_markdown(summary: dict) -> str:
    """``summary.md``: the run, the accuracy table with its CIs, the efficiency table, the overhead A/B,
    the goal check, notes and skipped methods."""
    meta = summary["run_metadata"]
    lines = [f"# Evaluation: {meta.get('config_name')}", ""]
    lines.append(f"{summary['num_samples']} samples ({summary['language']}), greedy, max_new_tokens="
                 f"{summary['max_new_tokens']}, seed {meta.get('seed')}, git {meta.get('git_commit')}, "
                 f"device {summary.get('device')}, energy source: {summary.get('energy_source')}"
                 + (f" ({summary['energy_null_reason']})" if summary.get("energy_null_reason") else "") + ".")
    lines.append(f"Deltas are relative to `{summary.get('reference_method')}` (the fine-tuned model with all layers). "
                 "Layers are 0-based.")
    lines.append("")
    lines += _accuracy_section(summary) + [""] + _efficiency_section(summary) + _goal_and_notes(summary)
    return "\n".join(lines) + "\n"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively: result files are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _summary(merged: dict, rows: list[dict], run_meta: dict, extra: Optional[dict]) -> dict:
    """``summary.json``: the run's setting, every row, skipped methods, the overhead A/B, the goal check, the
    bootstrap's settings, notes and the run's metadata."""
    meta = merged["meta"]
    return {
        "format": SUMMARY_FORMAT,
        "reference_method": reference_id(r["id"] for r in rows),
        "num_samples": rows[0]["num_samples"] if rows else meta.get("num_samples"),  # every row's (the same)
        "num_samples_drawn": meta.get("num_samples"),
        "language": meta.get("language"),
        "max_new_tokens": meta.get("max_new_tokens"),
        "device": meta.get("device"),
        "energy_source": meta.get("energy_source"),
        "energy_null_reason": next((r.get("energy_null_reason") for r in rows if r.get("energy_null_reason")), None),
        "world_size": merged.get("world_size", 1),
        "scales": dict(SCALES),
        "units": UNITS,
        "rows": rows,
        "skipped": merged.get("skipped", []),
        "overhead_ab": overhead_ab_summary(merged.get("overhead_ab")),
        "goal_check": goal_check(rows),
        "bootstrap": {"resamples": meta.get("bootstrap_resamples", 2000), "seed": meta.get("bootstrap_seed", 0),
                      "level": 0.95, "method": "paired percentile bootstrap over samples"},
        "notes": meta.get("notes", []),
        "model": meta.get("model"),
        "run_metadata": run_meta,
        **(extra or {}),
    }


def _write_files(tmp: Path, merged: dict, rows: list[dict], summary: dict, run_meta: dict) -> None:
    """Every method's records, the overhead A/B, ``summary.{json,csv,md}``, into ``tmp``."""
    for row in rows:
        entry = merged["methods"][row["id"]]
        write_json(tmp / "methods" / f"{row['id']}.json",
                   {"method": entry["spec"], "summary": row, "records": entry["records"],
                    "run_metadata": {k: v for k, v in run_meta.items() if k != "config"}})
    if summary["overhead_ab"]:
        write_json(tmp / "overhead_ab.json", {"summary": summary["overhead_ab"], **merged["overhead_ab"],
                                              "weights": run_meta.get("weights")})
    write_json(tmp / "summary.json", summary)
    write_text(tmp / "summary.csv", render_csv(rows))
    write_text(tmp / "summary.md", render_markdown(summary))


def write_results(merged: dict, out_dir: Union[str, Path], run_meta: dict, *, metrics_fn=None,
                  sample_metrics_fn=None, extra: Optional[dict] = None) -> Path:
    """Write ``methods/<id>.json``, ``summary.json``, ``summary.csv`` and ``summary.md`` into a
    temporary directory next to ``out_dir`` and move it into place only when all are written."""
    out_dir = Path(out_dir)
    check_writable(out_dir)
    if not merged.get("methods"):
        reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in merged.get("skipped", [])) or "none selected"
        raise ValueError(f"no method could run ({reasons}); nothing was written to {str(out_dir)!r}")
    rows = _finite(build_rows(merged, metrics_fn, sample_metrics_fn))
    merged = _finite(merged)
    summary = _summary(merged, rows, run_meta, extra)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the results folder is not
        _write_files(tmp, merged, rows, summary, run_meta)
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d method results and the summary to %s", len(rows), out_dir)
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary_table(results_dir: Union[str, Path]) -> list[dict]:
    """The rows of ``summary.json`` in ``results_dir`` (the eval folder, or the run's results
    folder holding ``eval/``): one dict per evaluated method."""
    d = Path(results_dir)
    path = d / "summary.json"
    if not path.is_file() and (d / "eval" / "summary.json").is_file():
        path = d / "eval" / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json in {str(d)!r}; run `python scripts/evaluate.py --config <cfg>` "
                                "first (it writes results/<name>/eval/)")
    data = read_json(path)
    if data.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"{str(path)!r} is not an evaluation summary (format {data.get('format')!r})")
    return list(data["rows"])


def ci_cell(row: dict, key: str, digits: int = 3) -> str:
    d, ci, sig = row.get(f"{key}_diff"), row.get(f"{key}_diff_ci"), row.get(f"{key}_diff_significant")
    if d is None:
        return "–"
    text = f"{d:+.{digits}f}"
    if ci:
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return text + (" *" if sig else "")


def mean_cell(row: dict, key: str, digits: int = 3) -> str:
    m, ci = row.get(f"{key}_mean"), row.get(f"{key}_ci")
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _ci_section(rows: Sequence[dict], ref: Optional[str], boot: Optional[dict]) -> list[str]:
    """The markdown table of per-sample means and paired differences with 95% intervals."""
    if not any(r.get("token_agreement_mean") is not None or r.get("edit_similarity_mean") is not None for r in rows):
        return []
    n = (boot or {}).get("resamples")
    lines = ["", "## Fidelity and accuracy with 95% confidence intervals", "",
             f"Mean per-sample values and the difference to `{ref}` (method − `{ref}`) with paired-bootstrap 95% "
             f"intervals{f' ({n} resamples)' if n else ''}; `*` marks a difference whose interval excludes zero. "
             "Token agreement is the share of the full model's tokens reproduced at the same position.", ""]
    head = ["method", "token agreement", "prefix match (tokens)", "Δ edit similarity", "Δ exact match",
            "Δ exact match w/o boilerplate", "Δ ROUGE-L", "Δ CodeBLEU (sentence)", "Δ chrF (sentence)"]
    return lines + _table(head, ([f"`{r['id']}`", mean_cell(r, "token_agreement"), mean_cell(r, "prefix_match", 2),
                                  ci_cell(r, "edit_similarity", 2), ci_cell(r, "exact_match"),
                                  ci_cell(r, "exact_match_no_boilerplate"), ci_cell(r, "rouge_l"),
                                  ci_cell(r, "codebleu"), ci_cell(r, "chrf", 2)] for r in rows))
