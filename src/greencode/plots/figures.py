"""One function per figure. Each reads result files from ``results_dir`` only, writes
``<figures_dir>/<name>.png`` and ``.pdf`` and returns the two paths; it raises
:class:`~greencode.plots.common.MissingInput` when its inputs are absent.

Layer indices are 0-based everywhere; accuracy is shown in percent (0-1 metrics x 100),
latency in seconds per sample, energy in joules per sample, throughput in new tokens/s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from greencode.plots import inputs as I
from greencode.plots.common import (ACCURACY_METRICS, ENERGY_NOTE, FAMILY_COLORS, FAMILY_MARKERS, FAMILY_NAMES,
                                    MissingInput, as_percent, bar_value_labels, family_of, method_label,
                                    new_figure, note_panel, save_figure, styled)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# figure file names (without extension)
NAMES = {
    "fixed_exits": "fig1_fixed_exits",
    "exit_report": "exit_report_base_vs_lite",
    "lite_weights": "fig3_lite_weights",
    "finetune_loss": "fig4_finetune_loss",
    "pretrain_loss": "pretrain_loss",
    "ppo_reward": "fig6_ppo_reward",
    "optimal_exits": "fig7_optimal_exits",
    "agent_exit_accuracy": "agent_exit_accuracy",
    "accuracy_by_method": "fig8_accuracy_by_method",
    "cost_by_method": "fig10_cost_by_method",
    "agent_overhead": "table4_agent_overhead",
    "pareto": "pareto_accuracy_vs_cost",
    "calibrated_targets": "calibrated_targets",
    "static_hull": "static_hull",
    "signals_auc": "signals_auc",
}


def _layer_ticks(ax, layers: Sequence[int], final: Optional[int] = None, axis: str = "x") -> None:
    labels = [f"{L}\n(final)" if final is not None and L == final else str(L) for L in layers]
    if axis == "x":
        ax.set_xticks(list(layers), labels)
    else:
        ax.set_yticks(list(layers), labels)


def _samples(summary: dict) -> str:
    n = summary.get("num_samples")
    return f"{n} sample" + ("" if n == 1 else "s")


def _pct_rows(rows: list[dict], key: str, scales: dict) -> list[Optional[float]]:
    return [as_percent(r.get(key), key, scales) for r in rows]


# --------------------------------------------------------------------------- Fig. 1
def _accuracy_panel(ax, rows: list[dict], layers: list[int], final: Optional[int], scales: dict) -> None:
    for key, label in ACCURACY_METRICS:
        vals = _pct_rows(rows, key, scales)
        pts = [(L, v) for L, v in zip(layers, vals) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, lw=1.4, label=label)
    ax.set_xlabel("exit layer (0-based)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per exit layer")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
    _layer_ticks(ax, layers, final)


def _latency_panel(ax, rows: list[dict], layers: list[int], final: Optional[int]) -> None:
    """Latency per exit layer, with the decode compute on a second axis when every row has it."""
    ax.plot(layers, [r.get("latency_s") for r in rows], marker="o", color="#1f77b4", lw=1.6, label="latency")
    ax.set_xlabel("exit layer (0-based)")
    ax.set_ylabel("latency (s per sample)")
    ax.set_title("Latency per exit layer")
    ax.set_ylim(bottom=0)
    _layer_ticks(ax, layers, final)
    comp = [r.get("compute_ratio") for r in rows]
    if all(I.is_value(c) for c in comp):
        tw = ax.twinx()
        tw.plot(layers, [100 * c for c in comp], marker="s", ms=3.5, ls="--", color="#8c564b", lw=1.2,
                label="compute (% of full)")
        tw.set_ylabel("decode compute (% of full model)", color="#8c564b")
        tw.set_ylim(bottom=0)
        tw.grid(False)
        tw.spines["right"].set_visible(True)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = tw.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right", frameon=False)


def _energy_panel(ax, rows: list[dict], layers: list[int], final: Optional[int]) -> None:
    if not I.energy_measured(rows):
        note_panel(ax, ENERGY_NOTE, "Energy per exit layer")
        return
    ax.plot(layers, [r["energy_j"] for r in rows], marker="o", color="#d62728", lw=1.6)
    ax.set_xlabel("exit layer (0-based)")
    ax.set_ylabel("energy (J per sample)")
    ax.set_title("Energy per exit layer")
    ax.set_ylim(bottom=0)
    _layer_ticks(ax, layers, final)


@styled
def plot_fixed_exits(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Paper Fig. 1: accuracy, latency (and energy when measured) of fixed exits, one point per
    exit layer, with the fine-tuned all-layers model at the final layer."""
    summary = I.load_summary(results_dir)
    fixed = sorted(I.rows_of(summary, "fixed"), key=lambda r: r["param"])
    if not fixed:
        raise MissingInput("the evaluation summary has no fixed@L rows; evaluate the 'fixed' method family")
    ref = I.reference_row(summary)
    n_layers = I.num_layers_of(summary)
    final = n_layers - 1 if n_layers else None
    rows = list(fixed)
    layers = [int(r["param"]) for r in fixed]
    if ref is not None and final is not None:
        rows.append(ref)
        layers.append(final)
    fig, axes = new_figure(15.0, 3.6, 1, 4)
    _accuracy_panel(axes[0, 0], rows, layers, final, summary.get("scales") or {})
    _latency_panel(axes[0, 1], rows, layers, final)
    _energy_panel(axes[0, 2], rows, layers, final)
    _fidelity_panel(axes[0, 3], rows, layers, final)
    fig.suptitle(f"Fixed exits: every token leaves at one layer ({_samples(summary)}, {summary.get('language')})")
    return save_figure(fig, Path(figures_dir), NAMES["fixed_exits"])


def _fidelity_panel(ax, rows: list[dict], layers: list[int], final: Optional[int]) -> None:
    """Token agreement with the full model and edit similarity per exit layer, with 95%
    bootstrap intervals; a filled marker: the difference to the full model is significant."""
    drawn = False
    for key, label, color in (("token_agreement", "token agreement", "#2ca02c"),
                              ("edit_similarity", "edit similarity", "#9467bd")):
        scale = 1.0 if key == "edit_similarity" else 100.0  # edit similarity is already 0-100
        pts = [(L, r[f"{key}_mean"] * scale, r.get(f"{key}_ci"), bool(r.get(f"{key}_diff_significant")))
               for L, r in zip(layers, rows) if I.is_value(r.get(f"{key}_mean"))]
        if not pts:
            continue
        drawn = True
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo = [p[1] - p[2][0] * scale if p[2] else 0.0 for p in pts]
        hi = [p[2][1] * scale - p[1] if p[2] else 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], color=color, lw=1.3, capsize=2.5, label=label)
        for x, y, _, sig in pts:
            ax.plot([x], [y], marker="o", ms=5, color=color, markerfacecolor=color if sig else "white", zorder=4)
    if not drawn:
        note_panel(ax, "no per-sample intervals in this summary (rerun the evaluation)", "Fidelity per exit layer")
        return
    ax.set_xlabel("exit layer (0-based)")
    ax.set_ylabel("% (mean per sample, 95% CI)")
    ax.set_title("Fidelity per exit layer")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", frameon=False, title="filled: differs from full (CI excl. 0)",
              title_fontsize=6.5)
    _layer_ticks(ax, layers, final)


# --------------------------------------------------------------------------- per-exit report
def _report_entries(report: dict) -> dict[str, list[dict]]:
    """``{"base": [...], "finetuned": [...]}`` from ``finetune/exit_report.json``
    (:mod:`greencode.training.report`): every layer (``per_layer``, exit points flagged) when
    present, else the exit points; each entry has ``layer``, ``is_exit_point``, ``accuracy``,
    ``agreement`` and ``loss`` (None where absent)."""
    out: dict[str, list[dict]] = {}
    models = report.get("models") if isinstance(report.get("models"), dict) else {}
    exit_points = set(report.get("exit_points") or [])
    for key in ("base", "finetuned"):
        block = models.get(key)
        if not isinstance(block, dict):
            continue
        items = block.get("per_layer") or block.get("per_exit") or []
        entries = [{"layer": int(it["layer"]),
                    "is_exit_point": bool(it.get("is_exit_point", not exit_points or it["layer"] in exit_points)),
                    "accuracy": it.get("accuracy"), "agreement": it.get("agreement_with_final"),
                    "loss": it.get("ce_loss")} for it in items if it.get("layer") is not None]
        if entries:
            out[key] = sorted(entries, key=lambda e: e["layer"])
    return out


@styled
def plot_exit_report(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """What LITE buys (the paper's motivation figure): next-token accuracy, agreement with the
    final layer and cross-entropy at every layer, base model vs LITE fine-tuned, on held-out
    tokens. Exit points are the filled markers."""
    report = I.load_exit_report(results_dir)
    entries = _report_entries(report)
    if not entries:
        raise MissingInput("finetune/exit_report.json has no per-layer entries for the base or the fine-tuned model")
    panels = [("accuracy", "next-token accuracy (%)", "Next-token accuracy", 100.0),
              ("agreement", "agreement with the final layer (%)", "Agreement with the final layer", 100.0),
              ("loss", "cross-entropy (nats / token)", "Cross-entropy", 1.0)]
    panels = [p for p in panels if any(e.get(p[0]) is not None for es in entries.values() for e in es)]
    if not panels:
        raise MissingInput("the per-exit report has no accuracy, agreement or loss values")
    styles = {"base": ("#7f7f7f", "s", "base model (before LITE)"),
              "finetuned": ("#d62728", "o", "LITE fine-tuned")}
    fig, axes = new_figure(4.3 * len(panels) + 0.4, 3.7, 1, len(panels))
    all_layers = sorted({e["layer"] for es in entries.values() for e in es})
    exit_layers = sorted({e["layer"] for es in entries.values() for e in es if e["is_exit_point"]})
    for ax, (key, ylabel, title, scale) in zip(axes[0], panels):
        for model, es in entries.items():
            c, m, label = styles[model]
            pts = [(e["layer"], scale * float(e[key]), e["is_exit_point"]) for e in es if e.get(key) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1.4, marker=m, ms=5.5, label=label,
                    markevery=[i for i, p in enumerate(pts) if p[2]])
            ex = [p for p in pts if p[2]]
            other = [p for p in pts if not p[2]]
            if other:
                ax.plot([p[0] for p in other], [p[1] for p in other], ls="none", marker=m, mfc="white", color=c,
                        ms=4)
            if model == "finetuned" and key != "loss" and len(ex) <= 12:
                for x, y, _ in ex:
                    ax.annotate(f"{y:.0f}", (x, y), xytext=(0, 5), textcoords="offset points", ha="center",
                                fontsize=7, color=c)
        ax.set_xlabel("layer (0-based; filled = exit point)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if scale == 100.0:
            ax.set_ylim(0, 108)
        ticks = exit_layers if len(all_layers) > 16 else all_layers
        _layer_ticks(ax, ticks, all_layers[-1])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    tokens = report.get("tokens")
    fig.suptitle("Per-layer quality on held-out tokens, base model vs LITE"
                 + (f" ({tokens} {report.get('split', 'held-out')} tokens)" if tokens else ""))
    return save_figure(fig, Path(figures_dir), NAMES["exit_report"])


# --------------------------------------------------------------------------- Fig. 3
def _recorded_weights(results_dir: Path) -> Optional[tuple[list[int], list[float], str]]:
    """LITE weights as recorded by the training stage, when it records them."""
    for name in ("summary.json", "lite_weights.json", "exit_report.json"):
        p = results_dir / "finetune" / name
        if not p.is_file():
            continue
        try:
            d = I.read_json(p)
        except (OSError, ValueError):
            continue
        for block in (d, d.get("lite") if isinstance(d, dict) else None, d.get("finetune") if isinstance(d, dict)
                      else None):
            if not isinstance(block, dict):
                continue
            w = block.get("lite_weights", block.get("weights"))
            pts = block.get("exit_points", block.get("loss_layers"))
            if isinstance(w, list) and isinstance(pts, list) and len(w) == len(pts) and w and \
                    all(isinstance(x, (int, float)) for x in w):
                return [int(p_) for p_ in pts], [float(x) for x in w], str(p)
    return None


@styled
def plot_lite_weights(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Paper Fig. 3: the LITE loss weight of every exit point and the final layer."""
    from greencode.models.schedule import lite_weights, split_halves

    results_dir = Path(results_dir)
    cfg, cfg_src = I.recorded_config(results_dir)
    ft = cfg.get("finetune") or {}
    recorded = _recorded_weights(results_dir)
    if recorded is not None:
        points, weights, src = recorded
        num_layers = points[-1] + 1
        exits = points[:-1]
    else:
        num_layers, exits, src = I.model_geometry(results_dir, cfg)
        weights = lite_weights(exits, num_layers, ft.get("weights", "geometric"),
                               ft.get("budgets", (0.7, 0.2, 0.1)), ft.get("ratio", 0.9))
        points = exits + [num_layers - 1]
        src = f"computed from {cfg_src} (finetune.weights / budgets / ratio) and the exit layers in {src}"
    first, second = split_halves(exits, num_layers)
    groups = [("first half", "#1f77b4", set(first)), ("second half", "#ff7f0e", set(second))]
    fig, axes = new_figure(max(5.0, 0.55 * len(points) + 2.5), 3.6)
    ax = axes[0, 0]
    xs = np.arange(len(points))
    colors = []
    for p_ in points:
        if p_ == num_layers - 1:
            colors.append("#2ca02c")
        else:
            colors.append(next(c for _, c, s in groups if p_ in s))
    bars = ax.bar(xs, weights, color=colors, width=0.7)
    bar_value_labels(ax, bars, weights, fmt="{:.3f}", horizontal=False, fontsize=7 if len(points) < 12 else 6)
    ax.set_xticks(xs, [str(p_) if p_ != num_layers - 1 else f"{p_}\n(final)" for p_ in points])
    ax.set_xlabel("exit point: layer (0-based)")
    ax.set_ylabel("loss weight $w_i$")
    ax.set_ylim(0, max(weights) * 1.45)  # room for the legend above the bars
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=f"{n} (Σ = {sum(w for p_, w in zip(points, weights) if p_ in s):.2f})")
               for n, c, s in groups if s]
    handles.append(Patch(color="#2ca02c", label=f"final layer (w = {weights[-1]:.2f})"))
    ax.legend(handles=handles, loc="upper right", frameon=False, ncols=1)
    scheme = ft.get("weights", "geometric")
    desc = (f"{scheme}, budgets {ft.get('budgets', [0.7, 0.2, 0.1])}, r = {ft.get('ratio', 0.9)}"
            if isinstance(scheme, str) else "explicit list")
    ax.set_title(f"LITE loss weights, {num_layers}-layer model\n({desc})")
    log.debug("LITE weights from %s", src)
    return save_figure(fig, Path(figures_dir), NAMES["lite_weights"])


# --------------------------------------------------------------------------- Fig. 4 + pretraining
def _plot_loss(ax, rows: list[dict], step: str, col: Optional[str], **kw) -> bool:
    if not col:
        return False
    xs, ys = I.series(rows, step, col)
    if xs:
        ax.plot(xs, ys, **kw)
    return bool(xs)


def _total_loss_panel(ax, log_: dict, what: str) -> bool:
    step = log_["step"]
    (train, tcol, _), (evals, ecol, _) = log_["train"], log_["eval"]
    drawn = _plot_loss(ax, train, step, tcol, color="#1f77b4", lw=1.4, label=f"train{what}")
    drawn |= _plot_loss(ax, evals, step, ecol, color="#d62728", lw=1.2, ls=":", marker="o", ms=4,
                        label=f"validation{what}")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    if drawn:
        ax.legend(frameon=False, loc="upper right")
    return drawn


@styled
def plot_finetune_loss(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Paper Fig. 4: LITE fine-tuning loss per optimisation step, the weighted total and
    every exit point's own cross-entropy (train: lines; validation: dotted with markers)."""
    log_ = I.load_loss_log(Path(results_dir) / "finetune")
    step = log_["step"]
    (train, _, t_exits), (evals, _, e_exits) = log_["train"], log_["eval"]
    layers = sorted(set(t_exits) | set(e_exits))
    fig, axes = new_figure(11.0 if layers else 5.5, 3.9, 1, 2 if layers else 1)
    if not _total_loss_panel(axes[0, 0], log_, " (weighted total)"):
        raise MissingInput(f"{str(log_['path'])!r} has no numeric total loss values")
    axes[0, 0].set_title("LITE weighted total loss")
    if layers:
        import matplotlib

        ax = axes[0, 1]
        cmap = matplotlib.colormaps["viridis"]
        final = max(layers)
        for i, L in enumerate(layers):
            c = cmap(0.9 * i / max(len(layers) - 1, 1))
            name = f"layer {L}" + (" (final)" if L == final else "")
            has_train = _plot_loss(ax, train, step, t_exits.get(L), color=c, lw=1.3, label=name)
            _plot_loss(ax, evals, step, e_exits.get(L), color=c, lw=1.0, ls=":", marker="o", ms=3.5,
                       label=None if has_train else name)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("cross-entropy loss (nats / token)")
        ax.set_title("Loss of each exit point (solid: train, dotted: validation)")
        ax.legend(title="exit (0-based)", frameon=False, ncols=2 if len(layers) > 6 else 1, loc="upper right")
    fig.suptitle("LITE fine-tuning")
    return save_figure(fig, Path(figures_dir), NAMES["finetune_loss"])


@styled
def plot_pretrain_loss(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Base-model pretraining loss per step (embedded default only)."""
    log_ = I.load_loss_log(Path(results_dir) / "pretrain")
    fig, axes = new_figure(5.5, 3.6)
    if not _total_loss_panel(axes[0, 0], log_, ""):
        raise MissingInput(f"{str(log_['path'])!r} has no numeric loss values")
    axes[0, 0].set_title("Base-model pretraining (causal LM)")
    return save_figure(fig, Path(figures_dir), NAMES["pretrain_loss"])


# --------------------------------------------------------------------------- Fig. 6
@styled
def plot_ppo_reward(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Paper Fig. 6: PPO mean step reward per episode (reward / length) over training."""
    rows = I.load_episode_rewards(results_dir)
    x_key = "timesteps" if all(I.is_value(r.get("timesteps")) for r in rows) else "episode"
    xs = np.array([float(r[x_key]) for r in rows])
    ys = np.array([float(r["mean_step_reward"]) for r in rows])
    binned = any((r.get("episodes_in_bin") or 1) > 1 for r in rows)
    episodes = int(sum(r.get("episodes_in_bin") or 1 for r in rows))
    fig, axes = new_figure(6.0, 3.6)
    ax = axes[0, 0]
    ax.plot(xs, ys, color="#1f77b4", alpha=0.35 if len(xs) > 20 else 0.9, lw=0.8, marker="o" if len(xs) <= 40 else None,
            ms=3, label="per episode" + (" (binned mean)" if binned else ""))
    if len(xs) > 20:
        w = max(len(xs) // 12, 3)
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(xs[w - 1:], smooth, color="#d62728", lw=1.8, label=f"moving mean ({w} points)")
    ax.set_xlabel("PPO timesteps (environment steps)" if x_key == "timesteps" else "episode")
    ax.set_ylabel("mean step reward per episode")
    ax.set_title(f"PPO training: {episodes} episodes")
    ax.axhline(0, color="#555555", lw=0.6)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return save_figure(fig, Path(figures_dir), NAMES["ppo_reward"])


# --------------------------------------------------------------------------- Fig. 7
def _exit_point_labels(hist: dict) -> list[str]:
    layers = hist.get("layer")
    n = len(hist["count"])
    if layers and len(layers) == n and all(L is not None for L in layers):
        return [str(L) if i < n - 1 else f"{L}\n(final)" for i, L in enumerate(layers)]
    return [str(i) if i < n - 1 else f"{i}\n(final)" for i in range(n)]


@styled
def plot_optimal_exits(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Paper Fig. 7: how often each exit point is the optimal exit ℓ_opt (the first exit
    agreeing with the final layer) in the trajectory bank."""
    a = I.load_rl_analysis(results_dir)
    hists = {k: v for k, v in (a.get("optimal_exit_histogram") or {}).items() if v}
    if not hists:
        raise MissingInput("rl/analysis.json has no optimal_exit_histogram")
    first = next(iter(hists.values()))
    labels = _exit_point_labels(first)
    n = len(labels)
    fig, axes = new_figure(max(5.5, 0.6 * n + 3), 3.6)
    ax = axes[0, 0]
    width = 0.8 / len(hists)
    colors = {"train": "#1f77b4", "heldout": "#ff7f0e"}
    for i, (name, h) in enumerate(hists.items()):
        share = [100 * s for s in h["share"]]
        xs = np.arange(n) + (i - (len(hists) - 1) / 2) * width
        bars = ax.bar(xs, share, width=width * 0.95, color=colors.get(name), label=f"{name} ({h['num_tokens']} tokens)")
        bar_value_labels(ax, bars, share, fmt="{:.0f}", horizontal=False, fontsize=6.5)
    ax.set_xticks(np.arange(n), labels)
    ax.set_xlabel("optimal exit ℓ_opt: layer (0-based)")
    ax.set_ylabel("share of tokens (%)")
    ax.set_ylim(0, max(100 * max(h["share"]) for h in hists.values()) * 1.15 + 1)
    ax.set_title("Occurrences of the optimal exit point (trajectory bank)")
    ax.legend(frameon=False, loc="upper right")
    return save_figure(fig, Path(figures_dir), NAMES["optimal_exits"])


@styled
def plot_agent_exit_accuracy(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """The agent's exit accuracy on the held-out bank at each threshold: share of tokens
    exiting early / at ℓ_opt / late, and agreement with the final layer."""
    a = I.load_rl_analysis(results_dir)
    ea = a.get("exit_accuracy") or {}
    rows = [(f"T = {r['threshold']:g}", r) for r in ea.get("thresholds") or []]
    if not rows:
        raise MissingInput("rl/analysis.json has no exit_accuracy.thresholds")
    if ea.get("oracle"):
        rows.append(("oracle (exit at ℓ_opt)", ea["oracle"]))
    if ea.get("full_model"):
        rows.append(("full model (final layer)", ea["full_model"]))
    labels = [r[0] for r in rows]
    ys = np.arange(len(rows))[::-1]
    fig, axes = new_figure(10.5, 0.42 * len(rows) + 1.8, 1, 2, sharey=True)
    ax = axes[0, 0]
    left = np.zeros(len(rows))
    for key, label, c in (("share_early", "early: before ℓ_opt (wrong token)", "#d62728"),
                          ("share_at_l_opt", "at ℓ_opt", "#2ca02c"), ("share_late", "late: after ℓ_opt", "#ff7f0e")):
        vals = np.array([100 * float(r[1].get(key) or 0.0) for r in rows])
        ax.barh(ys, vals, left=left, color=c, label=label, height=0.65)
        for y, l_, v in zip(ys, left, vals):
            if v >= 8:
                ax.text(l_ + v / 2, y, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
        left += vals
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of tokens (%)")
    ax.set_title("Exit position relative to ℓ_opt")
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=3)
    ax = axes[0, 1]
    h = 0.38
    agree = [100 * float(r[1].get("agreement_with_final") or 0.0) for r in rows]
    before = [100 * float(r[1].get("share_exit_before_final") or 0.0) for r in rows]
    b1 = ax.barh(ys + h / 2, agree, height=h, color="#1f77b4", label="agrees with the final layer")
    b2 = ax.barh(ys - h / 2, before, height=h, color="#9467bd", label="exits before the final layer")
    bar_value_labels(ax, b1, agree, fmt="{:.0f}")
    bar_value_labels(ax, b2, before, fmt="{:.0f}")
    ax.set_xlim(0, 112)
    ax.set_xlabel("share of tokens (%)")
    ax.set_title("Agreement and early exits")
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=2)
    bank = str(ea.get("bank", "held-out")).replace("heldout", "held-out")
    fig.suptitle(f"Exit agent on the {bank} bank (policy temperature {ea.get('temperature', 1.0):g}), "
                 f"{ea.get('thresholds', [{}])[0].get('num_tokens', '?')} tokens")
    return save_figure(fig, Path(figures_dir), NAMES["agent_exit_accuracy"])


# --------------------------------------------------------------------------- Figs. 8-11
def _method_rows(summary: dict, exclude_families: Sequence[str]) -> list[dict]:
    rows = [r for r in summary["rows"] if family_of(r) not in exclude_families]
    if not rows:
        raise MissingInput("the evaluation summary has no rows to compare")
    return rows


def _hbar_panel(ax, rows: list[dict], values: list[Optional[float]], ref: Optional[float], xlabel: str,
                title: str, fmt: str = "{:.3g}", deltas: Optional[list[Optional[float]]] = None,
                min_hi: float = 1.0, marks: Optional[list[str]] = None) -> None:
    ys = np.arange(len(rows))[::-1]
    vals = [v if v is not None else 0.0 for v in values]
    colors = [FAMILY_COLORS.get(family_of(r), "#333333") for r in rows]
    bars = ax.barh(ys, vals, color=colors, height=0.7)
    for b, v in zip(bars, values):
        if v is None:
            b.set_alpha(0.0)
    labels = []
    for i, v in enumerate(values):
        if v is None:
            labels.append(None)
            continue
        d = deltas[i] if deltas else None
        labels.append((fmt.format(v) + (f" ({d:+.0f}%)" if d is not None and abs(d) >= 0.5 else ""))
                      + (marks[i] if marks else ""))
    for b, lab, v in zip(bars, labels, values):
        x = b.get_width()
        txt = lab if lab is not None else "n/a"
        ax.annotate(txt, (x if v is not None else 0, b.get_y() + b.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=6.5, zorder=4,
                    color="#222222" if v is not None else "#888888",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    if ref is not None:
        ax.axvline(ref, color="#1f77b4", lw=0.8, ls="--", zorder=3)
    finite = [v for v in values if v is not None]
    hi = max(max(finite, default=0.0), min_hi)
    ax.set_xlim(min(0.0, min(finite, default=0.0)), hi * (1.45 if deltas else 1.28))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", visible=False)


@styled
def plot_accuracy_by_method(results_dir: PathLike, figures_dir: PathLike,
                            exclude_families: Sequence[str] = ("fixed",)) -> list[Path]:
    """Paper Figs. 8-9: every accuracy metric per method, side by side (fixed exits are in
    Fig. 1 and left out by default). Dashed line: the fine-tuned all-layers model."""
    summary = I.load_summary(results_dir)
    rows = _method_rows(summary, exclude_families)
    scales = summary.get("scales") or {}
    ref = I.reference_row(summary)
    metrics = [(k, n) for k, n in ACCURACY_METRICS + (("token_agreement", "Token agreement"),)
               if any(I.is_value(r.get(k)) for r in rows)]
    if not metrics:
        raise MissingInput("the evaluation summary has no accuracy values")
    scales = {**scales, "token_agreement": "0-1"}
    ncols = 3 if len(metrics) > 4 else len(metrics)
    nrows = int(np.ceil(len(metrics) / ncols))
    fig, axes = new_figure(3.7 * ncols + 1.2, (0.24 * len(rows) + 1.1) * nrows + 0.6, nrows, ncols, sharey=True)
    for i, (key, name) in enumerate(metrics):
        ax = axes[i // ncols, i % ncols]
        vals = _pct_rows(rows, key, scales)
        refv = as_percent(ref.get(key), key, scales) if ref else None
        marks = [" *" if r.get(f"{key}_diff_significant") else "" for r in rows]
        _hbar_panel(ax, rows, vals, refv, f"{name} (%)", name, fmt="{:.1f}", min_hi=10.0, marks=marks)
        if i % ncols == 0:
            ax.set_yticks(np.arange(len(rows))[::-1], [method_label(r) for r in rows])
    for j in range(len(metrics), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.suptitle(f"Accuracy per method ({_samples(summary)}, {summary.get('language')}, "
                 f"{summary.get('max_new_tokens')} new tokens); dashed: fine-tuned, all layers; "
                 "*: the 95% CI of the per-sample difference to it excludes 0")
    return save_figure(fig, Path(figures_dir), NAMES["accuracy_by_method"])


@styled
def plot_cost_by_method(results_dir: PathLike, figures_dir: PathLike,
                        exclude_families: Sequence[str] = ("fixed",)) -> list[Path]:
    """Paper Figs. 10-11: energy, latency, throughput and decode compute per method, side by
    side, with the change against the fine-tuned all-layers model in brackets."""
    summary = I.load_summary(results_dir)
    rows = _method_rows(summary, exclude_families)
    ref = I.reference_row(summary) or {}
    fig, axes = new_figure(11.5, 2 * (0.24 * len(rows) + 1.1) + 0.8, 2, 2, sharey=True)
    panels = [
        ("energy_j", "energy (J per sample)", "Energy", "{:.3g}"),
        ("latency_s", "latency (s per sample)", "Latency", "{:.3g}"),
        ("tokens_per_s", "throughput (new tokens/s)", "Throughput", "{:.3g}"),
        ("compute_ratio", "decode compute (% of full model MACs)", "Compute (hardware independent)", "{:.0f}"),
    ]
    for i, (key, xlabel, title, fmt) in enumerate(panels):
        ax = axes[i // 2, i % 2]
        if key == "energy_j" and not I.energy_measured(rows):
            note_panel(ax, ENERGY_NOTE, title)
            continue
        scale = 100.0 if key == "compute_ratio" else 1.0
        vals = [float(r[key]) * scale if I.is_value(r.get(key)) else None for r in rows]
        refv = float(ref[key]) * scale if I.is_value(ref.get(key)) else None
        deltas = [r.get(f"{key}_delta_pct") for r in rows]
        _hbar_panel(ax, rows, vals, refv, xlabel, title, fmt=fmt, deltas=deltas)
    for i in (0, 2):
        axes[i // 2, 0].set_yticks(np.arange(len(rows))[::-1], [method_label(r) for r in rows])
        axes[i // 2, 0].tick_params(axis="y", labelleft=True)
    src = summary.get("energy_source") or "unknown"
    fig.suptitle(f"Cost per method (mean per sample; energy source: {src}; device: {summary.get('device')}); "
                 f"brackets: change vs fine-tuned, all layers")
    return save_figure(fig, Path(figures_dir), NAMES["cost_by_method"])


# --------------------------------------------------------------------------- Table IV
@styled
def plot_agent_overhead(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Paper Table IV as a figure: the exit agent's time overhead, per GC threshold from the
    decoding loop's timers (time in the controller / decode time) and from the A/B run
    (policy evaluated but ignored vs not evaluated, same samples)."""
    summary = I.load_summary(results_dir)
    gc = sorted(I.rows_of(summary, "gc"), key=lambda r: r["param"])
    ab = summary.get("overhead_ab")
    if not gc and not ab:
        raise MissingInput("the evaluation summary has no gc@T rows and no overhead A/B run (no exit policy)")
    labels, vals, colors = [], [], []
    for r in gc:
        if I.is_value(r.get("controller_overhead_share")):
            labels.append(f"GC T={r['param']:g}\nloop timers")
            vals.append(100 * float(r["controller_overhead_share"]))
            colors.append("#d62728")
    if ab and I.is_value(ab.get("overhead_share")):
        labels.append(f"A/B at T={ab['threshold']:g}\n(total)")
        vals.append(100 * float(ab["overhead_share"]))
        colors.append("#1f77b4")
        if I.is_value(ab.get("overhead_share_median_paired")):
            labels.append(f"A/B at T={ab['threshold']:g}\n(median paired)")
            vals.append(100 * float(ab["overhead_share_median_paired"]))
            colors.append("#17becf")
    if not vals:
        raise MissingInput("no controller overhead values in the evaluation summary")
    fig, axes = new_figure(max(5.5, 1.15 * len(vals) + 4.2), 3.8, 1, 2, width_ratios=[max(len(vals), 2), 2.6])
    ax = axes[0, 0]
    xs = np.arange(len(vals))
    bars = ax.bar(xs, vals, color=colors, width=0.65)
    bar_value_labels(ax, bars, vals, fmt="{:.1f}%", horizontal=False)
    ax.set_xticks(xs, labels)
    ax.tick_params(axis="x", labelsize=7)
    ax.axhline(0, color="#555555", lw=0.6)
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    pad = 0.18 * (hi - lo or 1.0)
    ax.set_ylim(lo - (pad if lo < 0 else 0), hi + pad)
    ax.set_ylabel("time overhead (% of decode time)")
    ax.set_title("Exit-agent overhead")
    tab = axes[0, 1]
    tab.axis("off")
    lines = ["Paper Table IV: relative energy/time", "overhead of the agent: 3-19 %.", ""]
    if ab:
        lines += [f"A/B run, GC T={ab['threshold']:g}, {ab['num_samples']} samples:",
                  f"  decode time without policy {ab['decode_time_s_full']:.3g} s",
                  f"  with policy (ignored)      {ab['decode_time_s_policy_ignored']:.3g} s",
                  f"  time inside the policy     {ab.get('controller_time_s', 0.0):.3g} s",
                  f"  same tokens: {'yes' if ab.get('same_tokens') else 'no'}"]
    lines += ["", "energy overhead:", "  " + ("see energy_j per method (fig10)" if I.energy_measured(gc)
                                              else ENERGY_NOTE)]
    tab.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.2, transform=tab.transAxes,
             wrap=True)
    return save_figure(fig, Path(figures_dir), NAMES["agent_overhead"])


# --------------------------------------------------------------------------- Pareto
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (lower cost x, higher accuracy y), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _place_labels(ax, labels: Sequence[tuple[float, float, str, str]], fontsize: float = 6.5) -> None:
    """Point labels placed next to their points without overlapping each other: the first free
    spot among upper-right, upper-left, lower-right, lower-left, then further up/down (greedy,
    in display space, kept inside the axes where possible)."""
    pt = ax.figure.dpi / 72.0  # pixels per point
    line_h = fontsize * 1.3
    placed: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1 in pixels
    box = ax.bbox
    for x, y, txt, color in labels:
        px, py = ax.transData.transform((x, y))
        w, h = 0.62 * fontsize * len(txt) * pt, line_h * pt
        candidates = []
        for k in range(8):
            for ox, ha in ((4.0, "left"), (-4.0, "right")):
                candidates += [(ox, 2.0 + k * line_h, ha), (ox, -2.0 - line_h - k * line_h, ha)]
        choice = candidates[0]
        for ox, oy, ha in candidates:
            x0 = px + ox * pt - (w if ha == "right" else 0.0)
            y0 = py + oy * pt
            inside = box.x0 <= x0 and x0 + w <= box.x1 and box.y0 <= y0 and y0 + h <= box.y1
            free = all(x0 + w <= a0 or a1 <= x0 or y0 + h <= b0 or b1 <= y0 for a0, b0, a1, b1 in placed)
            if inside and free:
                choice = (ox, oy, ha)
                break
        ox, oy, ha = choice
        x0 = px + ox * pt - (w if ha == "right" else 0.0)
        placed.append((x0, py + oy * pt, x0 + w, py + oy * pt + h))
        ax.annotate(txt, (x, y), xytext=(ox, oy), textcoords="offset points", fontsize=fontsize, color=color,
                    va="bottom", ha=ha)


def _family_lines(ax, pts: list, handles: dict) -> list[tuple[float, float, str, str]]:
    """One line per controller family (sorted by parameter), into ``handles``; the point labels to place."""
    fams: dict[str, list] = {}
    labels: list[tuple[float, float, str, str]] = []
    for p in pts:
        fams.setdefault(family_of(p[2]), []).append(p)
    for fam, ps in fams.items():
        ps.sort(key=lambda p: (p[2].get("param") if p[2].get("param") is not None else 0, p[0]))
        c, m = FAMILY_COLORS.get(fam, "#333333"), FAMILY_MARKERS.get(fam, "o")
        size = 9 if fam in ("full", "gc") else 6.5
        (h,) = ax.plot([p[0] for p in ps], [p[1] for p in ps], marker=m, color=c, ms=size,
                       ls="-" if len(ps) > 1 else "none", lw=1.0, alpha=0.9,
                       mfc="none" if fam == "oracle" else c, label=FAMILY_NAMES.get(fam, fam))
        handles.setdefault(FAMILY_NAMES.get(fam, fam), h)
        if fam in ("gc", "fixed", "confidence", "entropy", "hf_early_exit") and len(ps) <= 12:
            for x, y, r in ps:
                txt = f"{r['param']:g}" if fam != "fixed" and fam != "hf_early_exit" else f"L{int(r['param'])}"
                labels.append((x, y, txt, c))
    return labels


def _cost_limits(ax, xs: list[float], ys: list[float], xlabel: str) -> None:
    """Axis limits with a margin; a log cost axis when one far outlier would squash the rest."""
    if min(xs) > 0 and max(xs) / min(xs) > 8:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel + ", log scale")
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    else:
        xpad = 0.08 * (max(xs) - min(xs) or max(abs(max(xs)), 1.0))
        ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    ypad = 0.1 * (max(ys) - min(ys) or max(abs(max(ys)), 1.0))
    ax.set_ylim(min(ys) - ypad, max(ys) + 1.6 * ypad)


def _pareto_panel(ax, pts: list, xlabel: str, title: str, metric_name: str, handles: dict) -> None:
    """One cost axis: every family's line, the deployable methods' Pareto front, limits and labels."""
    labels = _family_lines(ax, pts, handles)
    deploy = [p for p in pts if not p[2].get("analysis_only") and family_of(p[2]) != "oracle"]
    front = pareto_front([(p[0], p[1]) for p in deploy])
    if len(front) >= 2:
        (h,) = ax.step([deploy[i][0] for i in front], [deploy[i][1] for i in front], where="post", color="#444444",
                       lw=2.2, alpha=0.25, zorder=0, label="Pareto front (deployable methods)")
        handles.setdefault("Pareto front (deployable methods)", h)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_name} (%)")
    ax.set_title(title, fontsize=9)
    _cost_limits(ax, [p[0] for p in pts], [p[1] for p in pts], xlabel)
    _place_labels(ax, labels)


@styled
def plot_pareto(results_dir: PathLike, figures_dir: PathLike, metric: str = "codebleu") -> list[Path]:
    """Accuracy versus cost for every controller (GC at each threshold, confidence, entropy,
    fixed, oracle, full, base, HF early exit), with the Pareto front of the deployable ones
    (the oracle is analysis only). Left: hardware-independent decode compute; right: energy
    when measured, else latency."""
    summary = I.load_summary(results_dir)
    scales = summary.get("scales") or {}
    rows = [r for r in summary["rows"] if I.is_value(r.get(metric))]
    if not rows:
        raise MissingInput(f"the evaluation summary has no {metric!r} values")
    metric_name = dict(ACCURACY_METRICS).get(metric, metric)
    axes_spec = [("compute_ratio", 100.0, "decode compute (% of the full model's MACs)", "Hardware independent")]
    if I.energy_measured(rows):
        axes_spec.append(("energy_j", 1.0, "energy (J per sample)", "Energy"))
    else:
        axes_spec.append(("latency_s", 1.0, "latency (s per sample)", f"Latency; {ENERGY_NOTE}"))
    fig, axes = new_figure(11.5, 4.8, 1, 2)
    handles: dict[str, object] = {}
    for ax, (key, scale, xlabel, title) in zip(axes[0], axes_spec):
        pts = [(float(r[key]) * scale, as_percent(r[metric], metric, scales), r)
               for r in rows if I.is_value(r.get(key))]
        if not pts:
            note_panel(ax, f"no {key} values in the summary", title)
            continue
        _pareto_panel(ax, pts, xlabel, title, metric_name, handles)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"{metric_name} vs cost, every controller (labels: threshold T or exit layer L, 0-based); "
                 "up and left is better")
    return save_figure(fig, Path(figures_dir), NAMES["pareto"])


# --------------------------------------------------------------------------- calibrated targets
@styled
def plot_calibrated_targets(results_dir: PathLike, figures_dir: PathLike) -> list[Path]:
    """Every controller at its calibrated threshold for each fidelity target (chosen on the
    validation split), one row per fidelity criterion (sequence, token, quality): decode compute on
    the test split (left) and the risk it reached there next to the target (right; the sequence
    criterion with its 95% CI). A controller with no certified threshold is drawn at the full
    model's compute, hatched."""
    path = Path(results_dir) / "eval" / "calibrated.json"
    data = I._read_json(path, "calibrated-targets table", "run the calibrate stage and the evaluation with the "
                        "'calibrated' method (scripts/reproduce.py)")
    rows, targets = data.get("rows") or [], data.get("targets") or []
    if not rows or not targets:
        raise MissingInput(f"{str(path)!r} has no rows")
    criteria = list(dict.fromkeys(r.get("criterion", "sequence") for r in rows))
    fams = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = new_figure(11.5, 3.6 * len(criteria), len(criteria), 2)
    width = 0.8 / len(fams)
    x = np.arange(len(targets))
    labels = [f"≤ {100 * t:g}%" for t in targets]
    for c, crit in enumerate(criteria):
        ax1, ax2 = axes[c]
        for j, fam in enumerate(fams):
            comp, hatch, risk, err = [], [], [], []
            for t in targets:
                r = next((r for r in rows if r.get("criterion", "sequence") == crit and r["family"] == fam
                          and r["target"] == t), {})
                ok = r.get("method") is not None and I.is_value(r.get("compute_ratio"))
                comp.append(100 * float(r["compute_ratio"]) if ok else 100.0)
                hatch.append(not ok)
                got = r.get("achieved_disagreement")
                risk.append(100 * float(got) if ok and I.is_value(got) else np.nan)
                agree, ci = r.get("token_agreement"), r.get("token_agreement_ci")
                err.append([100 * (float(agree) - ci[0]), 100 * (ci[1] - float(agree))]
                           if ok and ci and crit == "sequence" and I.is_value(agree) else [0, 0])
            pos = x - 0.4 + (j + 0.5) * width
            bars = ax1.bar(pos, comp, width, color=FAMILY_COLORS.get(fam, "#333333"), label=FAMILY_NAMES.get(fam, fam))
            for b, h in zip(bars, hatch):
                if h:
                    b.set_hatch("//")
                    b.set_alpha(0.35)
            ax2.errorbar(pos, risk, yerr=np.array(err).T, fmt=FAMILY_MARKERS.get(fam, "o"),
                         color=FAMILY_COLORS.get(fam, "#333333"), capsize=2, label=FAMILY_NAMES.get(fam, fam))
        ax1.set_xticks(x, labels)
        ax1.axhline(100, color="#444444", lw=0.8, ls="--")
        ax1.set_ylabel("decode compute (% of full)")
        ax1.set_title(f"{crit}: compute at each calibrated target (hatched: none certified)")
        ax2.set_xticks(x, labels)
        ax2.plot(x, [100 * t for t in targets], "k_", ms=30, mew=1.5, label="target")
        ax2.set_ylabel(f"risk on the {data.get('split', 'test')} split (%)")
        ax2.set_title(f"{crit}: risk reached" + (" (1 - token agreement, 95% CI)" if crit == "sequence" else ""))
        if c == 0:
            ax2.legend(fontsize=7, loc="upper left")
    axes[-1][0].set_xlabel("target: expected loss allowed (share of tokens / of edit similarity)")
    axes[-1][1].set_xlabel("target")
    fig.suptitle(f"Controllers at calibrated targets (thresholds from the validation split, δ = {data.get('delta')})")
    return save_figure(fig, Path(figures_dir), NAMES["calibrated_targets"])
