"""Two evaluations of one method side by side, on the samples both decoded (matched by sample id): the
paired difference of a per-sample metric with its bootstrap interval. What tells whether a new base
(or any change upstream of the evaluation) moved a method's quality, rather than two tables' means
read side by side: e.g. the full model's edit similarity on the 500 test samples, new base vs old.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from greencode.calibrated import method_records
from greencode.provenance import identity_of, weights_of_file
from greencode.stats import CI_LEVEL, bootstrap_indices, mean_ci


def _per_sample(eval_dir: Path, method: str, metric: str) -> dict[str, float]:
    recs = method_records(eval_dir, method)
    if recs is None:
        raise FileNotFoundError(f"no records of method {method!r} in {eval_dir}/methods/{method}.json")
    out = {}
    for r in recs:
        v = (r.get("metrics") or {}).get(metric, r.get(metric))
        if v is not None and r.get("id") is not None:
            out[str(r["id"])] = float(v)
    return out


def compare_evaluations(old: Union[str, Path], new: Union[str, Path], method: str = "full",
                        metric: str = "edit_similarity", *, resamples: int = 2000, seed: int = 0,
                        new_method: Optional[str] = None) -> dict[str, Any]:
    """``new`` minus ``old`` for ``metric`` of ``method`` (``new_method`` in ``new`` when it is named
    otherwise there), paired by sample id over the samples both hold, with a percentile bootstrap."""
    a = _per_sample(Path(old), method, metric)
    b = _per_sample(Path(new), new_method or method, metric)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"the two evaluations share no sample id ({len(a)} and {len(b)} samples); they must be "
                         "drawn from the same split with the same seed")
    x, y = np.array([a[i] for i in common]), np.array([b[i] for i in common])
    idx = bootstrap_indices(len(common), resamples, seed)
    d, lo, hi = mean_ci(y - x, idx)
    _, old_lo, old_hi = mean_ci(x, idx)
    _, new_lo, new_hi = mean_ci(y, idx)
    # the result is the new evaluation's (its weights); the earlier one's are named as compared, not as weights
    new_w = weights_of_file(Path(new) / "summary.json")
    old_w = weights_of_file(Path(old) / "summary.json")
    weights = dict(new_w[0], compared={"old": identity_of(old_w[0])[0] if old_w else None}) if new_w else None
    return {"weights": weights, "method": method, "new_method": new_method or method, "metric": metric,
            "samples": len(common),
            "only_old": len(a) - len(common), "only_new": len(b) - len(common),
            "old": {"dir": str(old), "mean": float(x.mean()), "ci": [old_lo, old_hi]},
            "new": {"dir": str(new), "mean": float(y.mean()), "ci": [new_lo, new_hi]},
            "difference": {"mean": d, "ci": [lo, hi], "level": CI_LEVEL, "resamples": int(resamples),
                           "seed": int(seed), "excludes_zero": bool(lo > 0 or hi < 0)}}


def render_comparison(r: dict) -> str:
    d = r["difference"]
    return "\n".join([
        f"# {r['metric']} of `{r['new_method']}` (new) against `{r['method']}` (old), paired by sample", "",
        f"{r['samples']} samples in both (only old: {r['only_old']}, only new: {r['only_new']}).", "",
        "| | mean | 95% CI |", "|---|---|---|",
        f"| old (`{r['old']['dir']}`) | {r['old']['mean']:.3f} | [{r['old']['ci'][0]:.3f}, {r['old']['ci'][1]:.3f}] |",
        f"| new (`{r['new']['dir']}`) | {r['new']['mean']:.3f} | [{r['new']['ci'][0]:.3f}, {r['new']['ci'][1]:.3f}] |",
        f"| new − old | **{d['mean']:+.3f}** | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |", "",
        f"Paired percentile bootstrap over samples ({d['resamples']} resamples, seed {d['seed']}); the interval "
        + ("excludes zero." if d["excludes_zero"] else "includes zero."), ""])
