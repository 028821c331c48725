"""Statistical power for the summary: token agreement with the full model, and paired
bootstrap 95% confidence intervals of every per-sample accuracy measure and of each
method's difference to the reference row (the fine-tuned full model).

Per-sample values (one per evaluation sample):

- the sentence-level metrics of ``greencode.eval.metrics.sample_metrics`` (CodeBLEU, ROUGE-L,
  BLEU, chrF, exact match, edit similarity), and exact match on the samples whose reference is not
  boilerplate (``exact_match_no_boilerplate``; its interval resamples those samples only);
- ``token_agreement``: the share of the reference method's generated tokens that this method
  generated at the same position (positions past the shorter output count as disagreeing);
- ``prefix_match``: the number of leading tokens equal to the reference method's;
- ``latency_s``: seconds per generation, on the timed samples only (``eval.timing_samples``), so a
  latency difference carries its paired interval too.

The summary's main accuracy columns stay the corpus-level scores the paper reports (corpus
BLEU, CodeBLEU over all pairs); the intervals are those of the *mean per-sample* value, the
quantity a paired bootstrap can resample. A difference is marked significant when its 95%
interval excludes zero. Resampling draws the same sample indices for every method, so the
differences are paired.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np

from greencode.stats import CI_LEVEL, bootstrap_indices, mean_ci  # noqa: F401 - re-exported (their home: greencode.stats)

# exact_match_no_boilerplate: a sample's exact match, None (left out) when its reference is boilerplate;
# the same samples are left out for every method, so its differences stay paired
SAMPLE_KEYS = ("codebleu", "rouge_l", "bleu", "chrf", "exact_match", "exact_match_no_boilerplate", "edit_similarity")
AGREEMENT_KEYS = ("token_agreement", "prefix_match")
# latency: seconds per sample on the timed samples only (paired with the reference on the same samples)
TIMING_KEYS = ("latency_s",)
CI_KEYS = SAMPLE_KEYS + AGREEMENT_KEYS + TIMING_KEYS


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> tuple[float, int]:
    """(share of ``reference``'s positions where ``tokens`` has the same token, length of the
    common prefix). Two empty outputs agree fully."""
    tokens, reference = list(tokens), list(reference)
    prefix = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        prefix += 1
    if not reference:
        return (1.0 if not tokens else 0.0), 0
    same = sum(a == b for a, b in zip(tokens, reference))
    return same / len(reference), prefix


def _per_sample(records: Sequence[dict], key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records:
        v = (r.get("metrics") or {}).get(key) if key in SAMPLE_KEYS else r.get(key)
        if v is not None:
            out[int(r["index"])] = float(v)
    return out


def add_agreement(methods: dict, ref_id: Optional[str]) -> None:
    """Set ``token_agreement`` and ``prefix_match`` on every record (against ``ref_id``'s
    tokens on the same sample); None when there is no reference."""
    ref = {r["index"]: r["tokens"] for r in methods[ref_id]["records"]} if ref_id in methods else {}
    for entry in methods.values():
        for r in entry["records"]:
            if r["index"] in ref:
                r["token_agreement"], r["prefix_match"] = token_agreement(r["tokens"], ref[r["index"]])
            else:
                r["token_agreement"] = r["prefix_match"] = None


def add_confidence(rows: list[dict], methods: dict, ref_id: Optional[str], *, resamples: int = 2000,
                   seed: int = 0, level: float = CI_LEVEL) -> None:
    """Add to each row, for every key in :data:`CI_KEYS`: ``<key>_mean`` and ``<key>_ci``
    ([low, high]); and against ``ref_id``: ``<key>_diff`` (this method minus the reference,
    mean over the samples both have), ``<key>_diff_ci`` and ``<key>_diff_significant`` (the
    interval excludes 0). ``resamples=0`` adds only the means."""
    all_idx = sorted({int(r["index"]) for e in methods.values() for r in e["records"]})
    pos = {i: k for k, i in enumerate(all_idx)}
    idx = bootstrap_indices(len(all_idx), resamples, seed) if resamples and all_idx else None
    ref_vals = {k: _per_sample(methods[ref_id]["records"], k) for k in CI_KEYS} if ref_id in methods else {}
    for row in rows:
        recs = methods[row["id"]]["records"]
        for key in CI_KEYS:
            vals = _per_sample(recs, key)
            row[f"{key}_mean"] = float(np.mean(list(vals.values()))) if vals else None
            row[f"{key}_ci"] = None
            row[f"{key}_diff"] = row[f"{key}_diff_ci"] = row[f"{key}_diff_significant"] = None
            if not vals:
                continue
            if idx is not None:
                row[f"{key}_ci"] = _subset_ci(vals, pos, idx, level)
            ref = ref_vals.get(key) or {}
            if ref_id is None or row["id"] == ref_id or not ref:
                continue
            both = {i: vals[i] - ref[i] for i in vals if i in ref}
            if not both:
                continue
            row[f"{key}_diff"] = float(np.mean(list(both.values())))
            if idx is not None:
                ci = _subset_ci(both, pos, idx, level)
                row[f"{key}_diff_ci"] = ci
                row[f"{key}_diff_significant"] = bool(ci[0] > 0 or ci[1] < 0)


def _subset_ci(vals: dict[int, float], pos: dict[int, int], idx: np.ndarray, level: float) -> list[float]:
    """The bootstrap interval of the mean of ``vals`` (keyed by sample index). With every
    sample present, the shared index matrix is used as is (paired with the other methods);
    otherwise each resample's draws are restricted to the samples present."""
    keys = sorted(vals)
    arr = np.full(len(pos), np.nan)
    for i in keys:
        arr[pos[i]] = vals[i]
    if len(keys) == len(pos):
        _, lo, hi = mean_ci(arr, idx, level)
        return [lo, hi]
    drawn = arr[idx]
    with warnings.catch_warnings():  # a resample that drew none of the samples present: left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(np.where(np.isnan(drawn), np.nan, drawn), axis=1)
    means = means[~np.isnan(means)]
    a = (1.0 - level) / 2.0
    return [float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))]


def significance_marks(row: dict, keys: Sequence[str] = CI_KEYS) -> dict[str, Any]:
    """``{key: "+" | "-" | ""}``: the sign of a significant difference to the reference."""
    out = {}
    for k in keys:
        sig, d = row.get(f"{k}_diff_significant"), row.get(f"{k}_diff")
        out[k] = ("+" if d > 0 else "-") if (sig and d is not None) else ""
    return out
