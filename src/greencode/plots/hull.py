"""The static-hull figure: each controller against the convex hull of the static exits at matched
compute (:mod:`greencode.eval.hull`), from ``results/<name>/eval/hull.json`` (or, for an evaluation
written before it existed, computed from that folder's ``summary.json``, ``methods/*.json`` and
``teacher_forced.json``; the files read are recorded as the figure's inputs either way).

One panel per metric (edit similarity, token agreement with the full model, token risk when the
teacher-forced pass exists): the static points, the hull through its vertices (dashed and flat past
the best static point: a static policy reaches that value with less compute), and every judged row
as a point with the 95% paired-bootstrap interval of its difference to the hull drawn around it (the
bar crosses the hull line exactly when the row is on the hull). Rows far costlier than the full
model are listed under the panel instead of squashing the axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from greencode.eval.hull import hull_of_eval_dir
from greencode.plots import inputs as I
from greencode.plots.common import (FAMILY_COLORS, FAMILY_MARKERS, FAMILY_NAMES, MissingInput, new_figure, save_figure,
                                    styled)

NAME = "static_hull"
PANELS = (("edit_similarity", 1.0, "edit similarity (0-100)", "Edit similarity"),
          ("token_agreement", 100.0, "token agreement with the full model (%)", "Token agreement"),
          ("token_risk", 100.0, "token risk, teacher-forced (%)", "Token risk (teacher-forced)"))
X_MARGIN = 1.15  # the axis ends this far past the costliest static point


def load_hull(results_dir: Union[str, Path]) -> dict:
    """``eval/hull.json``, else the hull computed from the evaluation folder (its reads noted)."""
    eval_dir = Path(results_dir) / "eval"
    path = eval_dir / "hull.json"
    if path.is_file():
        return I.read_json(path)
    if not (eval_dir / "summary.json").is_file():
        raise MissingInput(f"no evaluation summary at {str(eval_dir / 'summary.json')!r}; run "
                           "`python scripts/evaluate.py --config <cfg>` (or scripts/reproduce.py)")

    reads: list = []
    block = hull_of_eval_dir(eval_dir, reads=reads)
    for p in reads:
        I._note(p)
    return block


@styled
def plot_static_hull(results_dir: Union[str, Path], figures_dir: Union[str, Path]) -> list[Path]:
    block = load_hull(results_dir)
    metrics = block.get("metrics") or {}
    panels = [p for p in PANELS if p[0] in metrics and metrics[p[0]].get("static_points")]
    if not panels:
        raise MissingInput("the evaluation has no static rows (fixed exits, full model) to build a hull from")
    fig, axes = new_figure(4.3 * len(panels), 5.0, 1, len(panels))
    handles: dict[str, object] = {}
    for ax, (key, scale, ylabel, title) in zip(axes[0], panels):
        res = metrics[key]
        static = res["static_points"]
        xmax = max(p["compute"] for p in static) * X_MARGIN
        xmin = min([p["compute"] for p in static] + [r["compute"] for r in res["rows"]]) * 0.95
        for p in static:
            fam = p.get("family") or p["id"].partition("@")[0]
            h = ax.scatter([100 * p["compute"]], [scale * p["value"]], marker=FAMILY_MARKERS.get(fam, "s"), s=30,
                           color=FAMILY_COLORS.get(fam, "#555555"), alpha=1.0 if p["vertex"] else 0.45, zorder=3,
                           label=FAMILY_NAMES.get(fam, fam) + " (static)")
            handles.setdefault(FAMILY_NAMES.get(fam, fam) + " (static)", h)
        by_id = {p["id"]: p for p in static}
        vx = [100 * by_id[v]["compute"] for v in res["vertices"]]
        vy = [scale * by_id[v]["value"] for v in res["vertices"]]
        (h,) = ax.plot(vx, vy, color="#333333", lw=1.6, zorder=2, label="static hull (randomized mixtures)")
        handles.setdefault("static hull (randomized mixtures)", h)
        ax.plot([vx[-1], 100 * xmax], [vy[-1], vy[-1]], color="#333333", lw=1.2, ls="--", zorder=2)
        off = []
        for r in res["rows"]:
            fam = r.get("family") or r["id"].partition("@")[0]
            if r["compute"] > xmax:
                off.append(f"{r['id']} ({r['compute']:.2f}): {r.get('verdict') or '–'}")
                continue
            color, marker = FAMILY_COLORS.get(fam, "#333333"), FAMILY_MARKERS.get(fam, "o")
            x, y = 100 * r["compute"], scale * r["value"]
            hull, ci, d = r.get("hull") or {}, r.get("diff_ci"), r.get("diff")
            yerr = None
            if ci and d is not None:
                yerr = [[scale * max(0.0, d - ci[0])], [scale * max(0.0, ci[1] - d)]]
            outside = r.get("region") == "below_range"
            h = ax.errorbar([x], [y], yerr=yerr, fmt=marker, color=color, ms=7 if fam == "gc" else 5.5, capsize=2.5,
                            mfc="none" if outside or fam == "oracle" else color, zorder=4,
                            label=FAMILY_NAMES.get(fam, fam))
            handles.setdefault(FAMILY_NAMES.get(fam, fam), h)
            tag = r["id"] + (" (outside)" if outside else "")
            ax.annotate(tag, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6, color=color)
            if hull.get("value") is not None:
                ax.plot([x], [scale * hull["value"]], marker="_", color="#333333", ms=9, mew=1.2, zorder=3)
        ax.set_xlim(100 * xmin, 100 * xmax)
        ax.set_xlabel("decode compute (% of the full model's MACs)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({res['direction']})", fontsize=9)
        if off:
            ax.text(0.98, 0.02 if res["direction"].startswith("higher") else 0.98,
                    "costlier, off the axis:\n" + "\n".join(off), transform=ax.transAxes, fontsize=5.2,
                    va="bottom" if res["direction"].startswith("higher") else "top", ha="right", color="#555555",
                    bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.85})
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, frameon=False)
    fams = ", ".join(block.get("static_families") or [])
    fig.suptitle(f"Controllers against the static hull ({fams}) at matched compute; bars: 95% paired interval of "
                 "the difference to the hull (–: the hull there)")
    return save_figure(fig, Path(figures_dir), NAME)
