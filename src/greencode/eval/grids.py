"""Candidate grids that span compute, chosen on the tuning slice (issue 30, item 4).

A controller's threshold is a knob only where it moves compute. ``tune_grids`` measures, on the
tuning slice (the first ``calibration.sample_offset`` samples of the seeded validation order; the
calibration starts after them, so it chose nothing), every calibrated family at a dense grid of
its parameter with one teacher-forced pass per sample (:func:`greencode.eval.forced.teacher_forced`:
token risk = the share of positions whose token differs from the full model's, and the compute
ratio, MACs done over the full model's, checks included). For each family it then picks, for each
compute level in ``levels`` (default 0.5 ... 0.95), the dense candidate whose mean compute is
nearest, so the calibration's candidates cover the range the issue asks for (a level a family
cannot reach is reported, not faked). Every candidate is also placed against the fixed exits' lower
hull of token risk at its compute (on the same samples), which says, before any test sample is
read, whether a controller can beat a static exit at all.

Writes ``results/<name>/tune/grids.{json,md}`` with the YAML lines to paste into the config's
``calibration`` section. The test split is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from greencode.calibrated import TEACHER_FORCED_FILE
from greencode.config import CalibrationConfig, Config, ConfigError
from greencode.decoding import registry
from greencode.eval.forced import teacher_forced
from greencode.eval.hull import hull_at, hull_vertices
from greencode.eval.methods import MethodSpec, controller_of, param_kind, parse_method_name
from greencode.eval.tuning import TUNE_SPLIT
from greencode.models.schedule import resolve_exit_layers
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import read_json, write_json, write_text

log = logging.getLogger(__name__)

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# a probability threshold's dense grid (confidence, the agent's P(exit), the classifier's P(agree), ...); the
# thresholds below 0.2 and above 0.999 are there for the agent, whose P(exit) PPO sharpens: on the default its
# thresholds >= 0.2 reached no lower than 0.69 of the full model's compute (results/default/tune/low_thresholds/
# grids.md), with the low_rank candidates 0.999 reached no higher than 0.81, and 0.9999 no higher than 0.86
# (results/default/tune/high_thresholds/grids.md: 0.99999 0.92, 0.999995 0.94, 0.999999 0.98)
PROB_DENSE = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97,
              0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 0.999995, 0.999999)
# the static family the hull is drawn from (with the full model)
STATIC = "fixed"


def dense_grid(family: str) -> list[float]:
    """The dense candidates of a threshold family: ``PROB_DENSE`` for a parameter in [0, 1], else the
    registry's calibration and evaluation grids with the midpoints between neighbours added."""
    info = registry.get_controller(controller_of(family))
    if tuple(info.bounds) == (0.0, 1.0):
        return list(PROB_DENSE)
    g = sorted(set(info.calibration_grid) | set(info.grid))
    return sorted(set(g) | {round((a + b) / 2, 6) for a, b in zip(g, g[1:])})


def pick_levels(points: dict[float, float], levels: Sequence[float], tolerance: float = 0.05) -> dict[str, dict]:
    """For each compute level, the candidate (``{param: mean compute}``) nearest to it, used once: a level
    whose nearest unused candidate is more than ``tolerance`` away is unreachable (``param`` None)."""
    used: set = set()
    out = {}
    for level in levels:
        best = None
        for param, c in sorted(points.items(), key=lambda kv: (abs(kv[1] - level), kv[0])):
            if param not in used:
                best = (param, c)
                break
        if best is None or abs(best[1] - level) > tolerance:
            out[f"{level:g}"] = {"level": level, "param": None, "compute": None if best is None else best[1],
                                 "reachable": False}
        else:
            used.add(best[0])
            out[f"{level:g}"] = {"level": level, "param": best[0], "compute": best[1], "reachable": True}
    return out


def against_hull(rows: dict[str, dict], static_ids: Sequence[str]) -> dict[str, Optional[float]]:
    """Each row's token risk minus the fixed exits' lower hull of token risk at its compute (negative: below
    the hull, better than any mix of static exits); None outside the hull's compute range."""
    ids = [i for i in static_ids if i in rows]
    # the full model is a static point by definition: all the compute, no disagreement with itself
    pts = [(rows[i]["compute"], rows[i]["token_risk"]) for i in ids] + [(1.0, 0.0)]
    verts = [pts[k] for k in hull_vertices(pts, direction=-1)]
    out = {}
    for mid, r in rows.items():
        if not verts or r["compute"] is None:
            out[mid] = None
            continue
        at = hull_at(verts, r["compute"])
        out[mid] = None if at["value"] is None else float(r["token_risk"] - at["value"])
    return out


def _yaml_lines(chosen: dict) -> list[str]:
    """The calibration section's lines for the chosen grids: ``<family>_thresholds`` where the section has that
    key, ``thresholds: {family: [...]}`` for any other registered controller, and a comment for a family none
    of whose candidates reaches a level (an empty grid would calibrate nothing)."""
    named = {f.name for f in dataclasses.fields(CalibrationConfig)}
    lines, other = [], []
    for fam, c in chosen.items():
        picked = [v["param"] for v in sorted(c.values(), key=lambda v: -v["level"]) if v["param"] is not None]
        grid = "[" + ", ".join(f"{t:g}" for t in picked) + "]"
        if not picked:
            lines.append(f"  # {fam}: no candidate reaches a compute level; leave it out of calibration.families")
        elif f"{fam}_thresholds" in named:
            lines.append(f"  {fam}_thresholds: {grid}")
        else:
            other.append(f"{fam}: {grid}")
    if other:
        lines.append("  thresholds: {" + ", ".join(other) + "}")
    return lines


def tune_grids(cfg: Config, *, num_samples: Optional[int] = None, levels: Sequence[float] = LEVELS,
               families: Optional[Sequence[str]] = None) -> Path:
    """Measure every family's dense grid on the tuning slice, choose the grids, write ``tune/grids.*``;
    returns the folder."""
    size = int(cfg.calibration.sample_offset)
    n = int(num_samples or size)
    if size < 1 or n > size:
        raise ConfigError(f"the tuning slice is the first calibration.sample_offset={size} validation samples; "
                          f"{n} asked (use --samples <= {size}, or raise calibration.sample_offset)")
    fams = list(families or cfg.calibration.families)
    paths = RunPaths.from_config(cfg)
    out = paths.results / "tune"
    eval_dir = out / "grids_pass"
    sub = dataclasses.replace(cfg, results_dir=str(out / "grids_pass_results"),
                              eval=dataclasses.replace(cfg.eval, split=TUNE_SPLIT, sample_offset=0, num_samples=n,
                                                       timing_samples=0))
    exit_layers = _exit_layers(cfg, paths)
    ids: dict[str, list[str]] = {}
    for fam in fams:
        if param_kind(fam) == "layer":
            ids[fam] = [MethodSpec(fam, int(x)).id for x in exit_layers]
        else:
            ids[fam] = [MethodSpec(fam, float(t)).id for t in dense_grid(fam)]
    if STATIC not in ids:
        ids[STATIC] = [MethodSpec(STATIC, int(x)).id for x in exit_layers]
    flat = [i for v in ids.values() for i in v]
    teacher_forced(sub, eval_dir, flat, full_tokens={})

    tf = read_json(eval_dir / TEACHER_FORCED_FILE)
    rows: dict[str, dict] = {}
    for mid in flat:
        risk, comp = tf["methods"].get(mid) or {}, tf["compute"].get(mid) or {}
        keys = [k for k in risk if risk[k] is not None and comp.get(k) is not None]
        if not keys:
            continue
        rows[mid] = {"token_risk": float(np.mean([risk[k] for k in keys])),
                     "compute": float(np.mean([comp[k] for k in keys])), "samples": len(keys)}
    vs_hull = against_hull(rows, ids[STATIC])
    chosen, table = {}, {}
    for fam in fams:
        pts = {}
        for mid in ids[fam]:
            if mid in rows:
                pts[MethodSpec(fam, _param(mid)).param] = rows[mid]["compute"]
        table[fam] = [{"id": mid, **rows[mid], "risk_minus_fixed_hull": vs_hull.get(mid)}
                      for mid in ids[fam] if mid in rows]
        if param_kind(fam) != "layer":
            chosen[fam] = pick_levels(pts, levels)
    yaml = _yaml_lines(chosen)
    model_weights = read_json(eval_dir / TEACHER_FORCED_FILE).get("weights")
    result = {"what": "candidate grids spanning compute, chosen on the tuning slice (validation samples "
                      f"0-{n - 1} of the seeded order; calibration starts at {size})",
              "levels": list(levels), "samples": n, "families": fams, "rows": table, "chosen": chosen,
              "yaml": yaml, "meta": run_metadata(cfg, stage="tune_grids",
                                                 **({"weights": model_weights} if model_weights else {}))}
    write_json(out / "grids.json", result)
    write_text(out / "grids.md", render(result))
    log.info("grids on %d tuning samples -> %s", n, out / "grids.json")
    return out


def _exit_layers(cfg: Config, paths: RunPaths) -> list[int]:
    """The run's early exit layers, from its LITE model's config (no weights loaded)."""
    f = paths.finetuned / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"no LITE model at {paths.finetuned}; run the pipeline's finetune stage first")
    hf = read_json(f)
    n = int(hf.get("num_hidden_layers") or hf.get("num_layers"))
    return resolve_exit_layers(n, cfg.model.exit_layers, cfg.model.exit_schedule)


def _param(mid: str):
    return parse_method_name(mid)[1]


def _f(v, fmt="{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(result: dict) -> str:
    lines = ["# Candidate grids chosen on the tuning slice", "", result["what"] + ".", "",
             "Token risk: the share of positions whose token differs from the full model's when fed its continuation "
             "(teacher forced); compute: MACs done over the full model's, the checks' own cost included. "
             "'vs fixed hull': token risk minus the fixed exits' lower hull at the same compute on the same samples "
             "(negative = better than any mix of static exits; '–' = outside the hull's range).", ""]
    for fam, rows in result["rows"].items():
        lines += [f"## {fam}", "", "| method | compute | token risk | vs fixed hull |", "|---|---|---|---|"]
        lines += [f"| `{r['id']}` | {_f(r['compute'])} | {_f(r['token_risk'])} | "
                  f"{_f(r['risk_minus_fixed_hull'], '{:+.3f}')} |" for r in rows]
        if fam in result["chosen"]:
            picks = ", ".join(f"{k}: {_f(v['param'], '{:g}')} ({_f(v['compute'])})" if v["reachable"]
                              else f"{k}: unreachable (nearest {_f(v['compute'])})" for k, v in result["chosen"][fam].items())
            lines += ["", f"Chosen per compute level: {picks}."]
        lines.append("")
    lines += ["## For the config's `calibration` section", "", "```yaml"] + result["yaml"] + ["```", ""]
    return "\n".join(lines)


__all__ = ["LEVELS", "PROB_DENSE", "against_hull", "dense_grid", "pick_levels", "tune_grids"]
