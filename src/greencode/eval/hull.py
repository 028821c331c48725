"""Every controller judged against the convex hull of the static exits at matched compute.

A learned exit decision earns its place only if it does better than a *static* policy that spends
the same compute. The static policies are the fixed exits (``fixed@L``), the full model (the
compute-1.0 end) and, by default, hidden-state saturation (``STATIC_FAMILIES``; a parameter).
Mixing two static policies at random, running A on a share ``w`` of the samples and B on the rest,
costs ``w cA + (1 - w) cB`` compute and scores ``w mA + (1 - w) mB`` in expectation, so every point
of the convex hull of the static points is reachable; and since a static policy may always spend
more compute than it needs, the frontier at compute ``c`` is the best hull point at compute ``<= c``
(free disposal): the **upper** hull (for a metric where higher is better: edit similarity, token
agreement with the full model, CodeBLEU) or the **lower** hull (token risk: the teacher-forced share
of positions whose token differs from the full model's), from the cheapest static point up to the
best one, and flat after it.

For each judged row at compute ``c`` (every family not static and not in ``NOT_JUDGED``: GC, the
confidence, entropy and classifier exits, the calibrated rows, the oracle as a reference):

* ``c`` below the cheapest static point: **outside the hull's range**, not extrapolated;
* between two hull vertices A (cheaper) and B: ``w = (cB - c) / (cB - cA)``, so the mixture's
  compute equals the row's; at or past the best static point: that point (``w = 1``, less compute);
* the paired per-sample difference ``d_i = m_row_i - (w mA_i + (1 - w) mB_i)`` on the samples all
  three decoded, its mean and its 95% paired-bootstrap interval with the summary's own resampling
  indices (:func:`greencode.eval.stats.bootstrap_indices`, same resamples and seed, so the interval
  pairs with every other interval of the summary);
* the verdict: **above the hull** (interval > 0), **below the hull** (interval < 0), **on the
  hull** (the interval holds 0); ``better`` translates it by the metric's direction (below the
  token-risk hull is better).

Compute is the summary's ``compute_ratio`` of each row: multiply-accumulates of the decode steps
(layers run, K/V propagation, LM-head calls, exit checks: a controller's checks and heads are
counted) over the full model's for the same steps. It is a ratio of sums over the samples; the
mixture's compute is the mixture of the rows' ratios (exact when the methods decode equally many
steps per sample, as they do with a fixed ``max_new_tokens`` and no early EOS).

Token risk needs the teacher-forced pass (``teacher_forced.json``, written next to the summary by
the evaluation when a calibration has the token criterion); the full model's risk is 0 by
definition. Without per-sample values (the calibration report's validation means), rows are
compared with the hull of the means and carry no interval.

``write_hull(eval_dir)`` writes ``hull.json`` and ``hull.md`` (and a ``hull`` block in
``summary.json`` when written in place); the figure is :func:`greencode.plots.figures.plot_static_hull`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from greencode.eval.stats import _subset_ci, bootstrap_indices
from greencode.provenance import find_weights
from greencode.utils import read_json, write_json, write_text

log = logging.getLogger(__name__)

HULL_FORMAT = "greencode-static-hull/1"
STATIC_FAMILIES = ("full", "fixed", "saturation")
# not controllers of the fine-tuned model in our loop: the base model, HF generate's full model and HF's
# self-speculative early exit (lossless: the full model's tokens, at the compute of every row HF runs)
NOT_JUDGED = ("base", "full_hf", "hf_early_exit")
# metric -> +1 (higher is better, upper hull) or -1 (lower is better, lower hull)
DIRECTIONS = {"edit_similarity": +1, "token_agreement": +1, "codebleu": +1, "chrf": +1, "token_risk": -1}
METRICS = ("edit_similarity", "token_agreement", "codebleu", "token_risk")
METRIC_NAMES = {"edit_similarity": "edit similarity (0-100)", "token_agreement": "token agreement with the full model",
                "codebleu": "CodeBLEU (sentence-level, 0-1)", "chrf": "chrF (sentence-level, 0-100)",
                "token_risk": "token risk (teacher-forced disagreement with the full model)"}
EPS = 1e-9
ABOVE, BELOW, ON, OUTSIDE = "above the hull", "below the hull", "on the hull", "outside the hull's compute range"


# --------------------------------------------------------------------------- geometry
def hull_vertices(points: Sequence[tuple[float, float]], direction: int = +1) -> list[int]:
    """Indices of the frontier's vertices, sorted by compute: the upper (``direction=+1``) or lower
    (``-1``) convex hull of ``(compute, metric)`` points, from the cheapest point (the best one among
    equally cheap points) to the best point (the cheapest among equally good ones). A point inside
    the hull or on a segment between two vertices is not a vertex."""
    pts = [(float(c), direction * float(m), i) for i, (c, m) in enumerate(points)
           if c is not None and m is not None and np.isfinite(c) and np.isfinite(m)]
    if not pts:
        return []
    best = max(p[1] for p in pts)
    peak_x = min(p[0] for p in pts if p[1] >= best - EPS)
    pts = sorted((p for p in pts if p[0] <= peak_x + EPS), key=lambda p: (p[0], -p[1], p[2]))
    dedup: list[tuple[float, float, int]] = []
    for p in pts:  # equally cheap: keep the best
        if not dedup or p[0] > dedup[-1][0] + EPS:
            dedup.append(p)
    chain: list[tuple[float, float, int]] = []
    for p in dedup:
        while len(chain) >= 2:
            (x1, y1, _), (x2, y2, _) = chain[-2], chain[-1]
            # drop the middle point unless the chain turns right (strictly concave) at it
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= -EPS * max(1.0, abs(y1), abs(p[1])):
                chain.pop()
            else:
                break
        chain.append(p)
    # slopes fall along the chain and the last one rises to the best point: the frontier rises throughout
    return [p[2] for p in chain]


def hull_at(vertices: Sequence[tuple[float, float]], compute: float) -> dict[str, Any]:
    """Where ``compute`` falls on a frontier given by its vertices ``[(compute, metric), ...]`` (sorted
    by compute, as :func:`hull_vertices` returns them): ``region`` (``below_range``: cheaper than the
    cheapest static point; ``between``: between vertices ``a`` and ``b``, or at one; ``past_best``: at
    or past the best static point, which it is compared with), the vertex positions ``a`` and ``b``,
    the weight ``w`` of ``a`` (``w ca + (1 - w) cb == compute`` when between) and the frontier's
    ``value`` there (None below the range)."""
    if not vertices:
        raise ValueError("no static points: the hull needs at least one fixed exit or the full model")
    xs = [float(v[0]) for v in vertices]
    ys = [float(v[1]) for v in vertices]
    c = float(compute)
    if c < xs[0] - EPS:
        return {"region": "below_range", "a": None, "b": None, "w": None, "value": None}
    if c >= xs[-1] - EPS:
        k = len(xs) - 1
        return {"region": "past_best" if c > xs[-1] + EPS or k == 0 else "between", "a": k, "b": k, "w": 1.0,
                "value": ys[k]}
    for k in range(len(xs) - 1):
        if xs[k] - EPS <= c <= xs[k + 1] + EPS:
            if abs(c - xs[k]) <= EPS:
                return {"region": "between", "a": k, "b": k, "w": 1.0, "value": ys[k]}
            if abs(c - xs[k + 1]) <= EPS:
                return {"region": "between", "a": k + 1, "b": k + 1, "w": 1.0, "value": ys[k + 1]}
            w = (xs[k + 1] - c) / (xs[k + 1] - xs[k])
            return {"region": "between", "a": k, "b": k + 1, "w": w, "value": w * ys[k] + (1.0 - w) * ys[k + 1]}
    raise AssertionError("unreachable: compute inside the range but between no two vertices")  # pragma: no cover


# --------------------------------------------------------------------------- statistics
def verdict(ci: Optional[Sequence[float]]) -> Optional[str]:
    """``above the hull`` (interval > 0), ``below the hull`` (< 0), ``on the hull`` (holds 0)."""
    if not ci:
        return None
    lo, hi = float(ci[0]), float(ci[1])
    return ABOVE if lo > 0 else BELOW if hi < 0 else ON


def better(v: Optional[str], direction: int) -> Optional[str]:
    """The verdict read by the metric's direction: ``better``, ``worse`` or ``level``."""
    if v not in (ABOVE, BELOW, ON):
        return None
    if v == ON:
        return "level"
    return "better" if (v == ABOVE) == (direction > 0) else "worse"


def paired_difference(row: dict[int, float], a: dict[int, float], b: dict[int, float], w: float,
                      pos: Optional[dict[int, int]] = None, idx: Optional[np.ndarray] = None,
                      level: float = 0.95) -> dict[str, Any]:
    """``d_i = row_i - (w a_i + (1 - w) b_i)`` on the samples all three have: its mean, its paired
    bootstrap interval (``idx``: the summary's ``[resamples, n]`` indices over the samples ``pos``
    maps to columns; None: no interval) and the number of samples."""
    keys = sorted(set(row) & set(a) & set(b))
    if not keys:
        return {"diff": None, "diff_ci": None, "n": 0}
    mix = {i: w * float(a[i]) + (1.0 - w) * float(b[i]) for i in keys}
    d = {i: float(row[i]) - mix[i] for i in keys}
    ci = None
    if idx is not None and pos is not None and all(i in pos for i in keys):
        ci = _subset_ci(d, pos, idx, level)
    return {"diff": float(np.mean(list(d.values()))), "diff_ci": ci, "n": len(keys),
            "value": float(np.mean([float(row[i]) for i in keys])), "hull_value": float(np.mean(list(mix.values())))}


# --------------------------------------------------------------------------- one metric
def judge(points: dict[str, dict], static_ids: Sequence[str], judged_ids: Sequence[str], direction: int,
          per_sample: Optional[dict[str, dict[int, float]]] = None, pos: Optional[dict[int, int]] = None,
          idx: Optional[np.ndarray] = None, level: float = 0.95) -> dict[str, Any]:
    """The hull of ``static_ids`` and each of ``judged_ids`` against it, for one metric.

    ``points``: ``{id: {"family", "compute", "value"}}`` (value: the mean of the per-sample values,
    or a reported mean); ``per_sample``: ``{id: {sample index: value}}`` for the paired intervals
    (None: means only, no interval, no verdict)."""
    static = [s for s in static_ids if s in points and points[s].get("value") is not None
              and points[s].get("compute") is not None]
    verts = hull_vertices([(points[s]["compute"], points[s]["value"]) for s in static], direction)
    vids = [static[i] for i in verts]
    vxy = [(points[v]["compute"], points[v]["value"]) for v in vids]
    out_static = [{"id": s, "family": points[s].get("family"), "compute": points[s]["compute"],
                   "value": points[s]["value"], "vertex": s in vids} for s in
                  sorted(static, key=lambda s: points[s]["compute"])]
    rows = []
    for rid in judged_ids:
        p = points.get(rid)
        if not p or p.get("value") is None or p.get("compute") is None:
            continue
        entry: dict[str, Any] = {"id": rid, "family": p.get("family"), "compute": p["compute"], "value": p["value"]}
        if not vxy:
            entry.update({"region": "no_static_points", "verdict": None, "better": None})
            rows.append(entry)
            continue
        at = hull_at(vxy, p["compute"])
        entry["region"] = at["region"]
        if at["region"] == "below_range":
            entry.update({"hull": None, "diff": None, "diff_ci": None, "n": None, "verdict": OUTSIDE,
                          "better": None})
            rows.append(entry)
            continue
        a, b, w = vids[at["a"]], vids[at["b"]], at["w"]
        entry["hull"] = {"a": a, "b": b, "w_a": w, "compute": w * points[a]["compute"] + (1 - w) * points[b]["compute"],
                         "value": at["value"]}
        if per_sample is not None and rid in per_sample and a in per_sample and b in per_sample:
            paired = paired_difference(per_sample[rid], per_sample[a], per_sample[b], w, pos, idx, level)
            if paired["n"]:  # the row and the mixture on the samples the difference is taken over
                entry["value"] = paired.pop("value")
                entry["hull"]["value_all_samples"] = entry["hull"]["value"]
                entry["hull"]["value"] = paired.pop("hull_value")
            entry.update(paired)
        else:
            entry.update({"diff": float(p["value"]) - float(at["value"]), "diff_ci": None, "n": None})
        entry["verdict"] = verdict(entry.get("diff_ci"))
        entry["better"] = better(entry["verdict"], direction)
        rows.append(entry)
    return {"direction": "higher is better" if direction > 0 else "lower is better",
            "hull": "upper" if direction > 0 else "lower", "static_points": out_static, "vertices": vids,
            "rows": rows}


# --------------------------------------------------------------------------- from the summary
def _sample_value(key: str) -> Callable[[dict], Optional[float]]:
    def get(r: dict) -> Optional[float]:
        v = r.get(key) if key in ("token_agreement", "prefix_match") else (r.get("metrics") or {}).get(key)
        return None if v is None else float(v)

    return get


def per_sample_values(methods: dict, key: str, forced: Optional[dict] = None,
                      reference: str = "full") -> dict[str, dict[int, float]]:
    """``{method id: {sample index: value}}`` of one metric from the records (``methods``: ``{id:
    {"records": [...]}}``; ``forced``: the teacher-forced disagreements for ``token_risk``, where the
    reference model's risk is 0 on every sample it decoded)."""
    out: dict[str, dict[int, float]] = {}
    if key == "token_risk":
        if not forced:
            return out
        for mid, vals in forced.items():
            out[mid] = {int(i): float(v) for i, v in vals.items() if v is not None}
        if reference in methods:
            out[reference] = {int(r["index"]): 0.0 for r in methods[reference]["records"] if r.get("tokens") is not None}
        return out
    get = _sample_value(key)
    for mid, e in methods.items():
        vals = {int(r["index"]): get(r) for r in e["records"]}
        out[mid] = {i: v for i, v in vals.items() if v is not None}
    return out


def static_hull(rows: Sequence[dict], methods: dict, *, static_families: Sequence[str] = STATIC_FAMILIES,
                not_judged: Sequence[str] = NOT_JUDGED, metrics: Sequence[str] = METRICS,
                forced: Optional[dict] = None, resamples: int = 2000, seed: int = 0, level: float = 0.95,
                reference: str = "full") -> dict[str, Any]:
    """The ``hull`` block of an evaluation: for each metric, the static points, the hull's vertices and
    every judged row against it (see the module docstring). ``rows``: the summary's rows (``id``,
    ``family``, ``compute_ratio``); ``methods``: ``{id: {"records": [...]}}`` with per-sample
    ``metrics`` and ``token_agreement``; ``forced``: teacher-forced disagreements (``token_risk``)."""
    static_families = tuple(static_families)
    all_idx = sorted({int(r["index"]) for e in methods.values() for r in e["records"]})
    pos = {i: k for k, i in enumerate(all_idx)}
    idx = bootstrap_indices(len(all_idx), resamples, seed) if resamples and all_idx else None
    fam = {r["id"]: r.get("family") or str(r["id"]).partition("@")[0] for r in rows}
    compute = {r["id"]: r.get("compute_ratio") for r in rows}
    static_ids = [r["id"] for r in rows if fam[r["id"]] in static_families and r["id"] in methods]
    judged = [r["id"] for r in rows if fam[r["id"]] not in static_families and fam[r["id"]] not in not_judged
              and r["id"] in methods]
    block: dict[str, Any] = {
        "format": HULL_FORMAT, "static_families": list(static_families), "not_judged": list(not_judged),
        "compute": "compute_ratio of each row (decode multiply-accumulates, controller checks and LM heads "
                   "included, over the full model's)",
        "mixture": "between hull vertices A (cheaper) and B: a static policy running A on a share w_a of the "
                   "samples and B on the rest, w_a chosen so its compute equals the row's; past the best static "
                   "point: that point",
        "difference": "per sample: row - (w_a A + (1 - w_a) B), mean and 95% paired-bootstrap interval",
        "bootstrap": {"resamples": int(resamples or 0), "seed": int(seed), "level": level,
                      "samples": len(all_idx), "indices": "greencode.eval.stats.bootstrap_indices, as the summary"},
        "metrics": {}}
    for key in metrics:
        vals = per_sample_values(methods, key, forced, reference)
        if not any(vals.get(s) for s in static_ids):
            continue
        points = {mid: {"family": fam.get(mid), "compute": compute.get(mid),
                        "value": float(np.mean(list(v.values()))) if v else None}
                  for mid, v in vals.items() if mid in compute}
        res = judge(points, static_ids, judged, DIRECTIONS.get(key, +1), vals, pos, idx, level)
        res["name"] = METRIC_NAMES.get(key, key)
        res["samples"] = {"static": {s: len(vals.get(s) or {}) for s in static_ids if vals.get(s)}}
        if key == "token_risk":
            missing = [s for s in static_ids if s not in vals]
            res["note"] = ("teacher-forced on the test split (teacher_forced.json); the full model's risk is 0 by "
                           "definition" + (f"; static rows without a teacher-forced pass: {', '.join(missing)}"
                                           if missing else ""))
        block["metrics"][key] = res
    return block


def calibration_hull(calibration: dict, *, static_families: Sequence[str] = STATIC_FAMILIES) -> dict[str, Any]:
    """Each criterion of a calibration report (validation split): the hull of the static candidates'
    mean risk against their mean compute (the full model: risk 0 at compute 1), and every other
    candidate's risk against it. Means only (the report keeps no per-sample losses): no interval."""
    out: dict[str, Any] = {"split": calibration.get("split"), "num_samples": calibration.get("num_samples"),
                           "static_families": list(static_families), "criteria": {}}
    crits = calibration.get("criteria") or {"sequence": {"families": calibration.get("families") or {}}}
    for crit, centry in crits.items():
        points: dict[str, dict] = {"full": {"family": "full", "compute": 1.0, "value": 0.0}}
        samples = {}
        for fam, entry in (centry.get("families") or {}).items():
            for c in entry.get("candidates") or []:
                points[c["id"]] = {"family": fam, "compute": c.get("compute_ratio"),
                                   "value": c.get("mean_disagreement")}
            samples[fam] = entry.get("samples")
        static = [k for k, p in points.items() if p["family"] in static_families]
        judged = [k for k, p in points.items() if p["family"] not in static_families]
        res = judge(points, static, judged, -1)
        res["risk"] = centry.get("risk")
        res["samples"] = samples
        out["criteria"][crit] = res
    return out


# --------------------------------------------------------------------------- files
def load_eval_dir(eval_dir: Union[str, Path], reads: Optional[list] = None) -> tuple[dict, dict, Optional[dict]]:
    """``(summary, methods, forced)`` of an evaluation folder: ``summary.json``, each row's
    ``methods/<id>.json`` records and ``teacher_forced.json`` (None when absent). The paths read
    are appended to ``reads``."""
    eval_dir = Path(eval_dir)
    path = eval_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json in {str(eval_dir)!r}; run `python scripts/evaluate.py --config "
                                "<cfg>` first (it writes results/<name>/eval/)")
    summary = read_json(path)
    if reads is not None:
        reads.append(path)
    methods = {}
    for r in summary["rows"]:
        f = eval_dir / "methods" / f"{r['id']}.json"
        if f.is_file():
            methods[r["id"]] = {"records": read_json(f)["records"]}
            if reads is not None:
                reads.append(f)
        else:
            log.warning("no per-sample records for %s (%s): left out of the hull", r["id"], f)
    forced = None
    tf = eval_dir / "teacher_forced.json"
    if tf.is_file():
        forced = read_json(tf).get("methods")
        if reads is not None:
            reads.append(tf)
    return summary, methods, forced


def hull_of_eval_dir(eval_dir: Union[str, Path], *, static_families: Sequence[str] = STATIC_FAMILIES,
                     calibration: Optional[dict] = None, resamples: Optional[int] = None,
                     seed: Optional[int] = None, reads: Optional[list] = None) -> dict[str, Any]:
    """The ``hull`` block of an evaluation folder (:func:`static_hull`, with the summary's bootstrap
    resamples and seed unless given), plus the calibration report's validation view when given."""
    summary, methods, forced = load_eval_dir(eval_dir, reads)
    boot = summary.get("bootstrap") or {}
    resamples = int(boot.get("resamples", 2000) if resamples is None else resamples)
    seed = int(boot.get("seed", 0) if seed is None else seed)
    block = static_hull(summary["rows"], methods, static_families=static_families, forced=forced,
                        resamples=resamples, seed=seed, level=float(boot.get("level", 0.95)),
                        reference=summary.get("reference_method") or "full")
    block["num_samples"] = summary.get("num_samples")
    if calibration is not None:
        block["calibration"] = calibration_hull(calibration, static_families=static_families)
    return block


def write_hull(eval_dir: Union[str, Path], out_dir: Union[str, Path, None] = None, *,
               static_families: Sequence[str] = STATIC_FAMILIES, calibration: Optional[dict] = None,
               resamples: Optional[int] = None, seed: Optional[int] = None) -> dict[str, Any]:
    """Compute the hull block of ``eval_dir`` and write ``hull.json`` and ``hull.md`` into ``out_dir``
    (default: ``eval_dir``; then ``summary.json`` gets the block as ``hull`` too). ``eval_dir`` is
    only read when ``out_dir`` is another folder."""
    eval_dir = Path(eval_dir)
    out = Path(out_dir) if out_dir is not None else eval_dir
    block = hull_of_eval_dir(eval_dir, static_families=static_families, calibration=calibration,
                             resamples=resamples, seed=seed)
    # the hull is computed from the evaluation's rows, so it names the weights they came from

    weights = find_weights(read_json(eval_dir / "summary.json").get("run_metadata") or {})
    if weights:
        block = {**block, "weights": weights[0]}
    write_json(out / "hull.json", block)
    write_text(out / "hull.md", render_hull(block))
    if out.resolve() == eval_dir.resolve():
        summary = read_json(eval_dir / "summary.json")
        summary["hull"] = block
        write_json(eval_dir / "summary.json", summary)
    log.info("static hull: %s", "; ".join(f"{r['id']} {r['verdict']}" for r in
                                          (block["metrics"].get("edit_similarity") or {}).get("rows", [])))
    return block


# --------------------------------------------------------------------------- markdown
def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _diff(e: dict, digits: int) -> str:
    if e.get("diff") is None:
        return "–"
    text = f"{e['diff']:+.{digits}f}"
    ci = e.get("diff_ci")
    return text + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def _mix(e: dict) -> str:
    h = e.get("hull")
    if not h:
        return "–"
    if h["a"] == h["b"]:
        return f"`{h['a']}`" + (" (less compute)" if e.get("region") == "past_best" else "")
    return f"{h['w_a']:.2f} `{h['a']}` + {1 - h['w_a']:.2f} `{h['b']}`"


def metric_table(res: dict, digits: int = 3) -> list[str]:
    lines = ["| method | compute | value | hull at this compute (mixture) | hull value | Δ vs hull [95% CI] | n | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for e in res["rows"]:
        verdict_ = e.get("verdict") or "no interval"
        if e.get("better") in ("better", "worse"):
            verdict_ += f" ({e['better']})"
        lines.append(f"| `{e['id']}` | {_f(e['compute'], 3)} | {_f(e['value'], digits)} | {_mix(e)} | "
                     f"{_f((e.get('hull') or {}).get('value'), digits)} | {_diff(e, digits)} | {e.get('n') or '–'} | "
                     f"{verdict_} |")
    return lines


def _static_line(res: dict, digits: int) -> str:
    return ", ".join(f"`{p['id']}` ({_f(p['compute'], 3)}, {_f(p['value'], digits)})" + ("" if p["vertex"] else " not a vertex")
                     for p in res["static_points"])


def render_hull(block: dict) -> str:
    boot = block.get("bootstrap") or {}
    lines = ["# Controllers against the static hull at matched compute", "",
             f"Static policies: {', '.join(f'`{f}`' for f in block['static_families'])} (their rows' convex hull in "
             "(compute, metric): a static policy that runs vertex A on a share w of the samples and vertex B on the "
             "rest has compute w·cA + (1−w)·cB and metric w·mA + (1−w)·mB in expectation; past the best static point, "
             "that point). Compute: " + block.get("compute", "compute_ratio") + ". "
             f"Δ = the row − the mixture, per sample, paired; 95% bootstrap interval ({boot.get('resamples')} "
             f"resamples, seed {boot.get('seed')}, the summary's indices). Verdict: above the hull (interval > 0), "
             "below (< 0), on the hull (holds 0); 'outside the hull's compute range': cheaper than every static "
             "point, not extrapolated.", ""]
    for key, res in block.get("metrics", {}).items():
        digits = 2 if key in ("edit_similarity", "chrf") else 3
        lines += [f"## {res.get('name', key)} ({res['direction']}; {res['hull']} hull)", "",
                  "Static points (compute, value): " + _static_line(res, digits) + ".", ""]
        if res.get("note"):
            lines += [res["note"] + ".", ""]
        lines += metric_table(res, digits) + [""]
    cal = block.get("calibration")
    if cal:
        lines += [f"## Calibration report ({cal.get('split')} split, {cal.get('num_samples')} samples): risk against "
                  "the static lower hull", "",
                  "Mean risk and mean compute of each candidate as the report gives them (the full model: risk 0 at "
                  "compute 1); no per-sample losses, so no interval: Δ is the difference of means.", ""]
        for crit, res in cal["criteria"].items():
            lines += [f"### {crit}", "", "Static points: " + _static_line(res, 4) + ".", ""]
            lines += metric_table(res, 4) + [""]
    return "\n".join(lines).rstrip() + "\n"
