"""The exit-signal figure: each signal's AUC against the oracle label per exit point, and its mean AUC
against what it costs (from ``results/<name>/signals/auc.json``, written by
:func:`greencode.eval.signal_quality.analyze_signals`)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from greencode.plots import inputs as I
from greencode.plots.common import new_figure, save_figure, styled

NAME = "signals_auc"


def load_signals_report(results_dir: Union[str, Path]) -> dict:
    """``signals/auc.json`` (noted as the figure's input; MissingInput when the analysis has not run)."""
    return I._read_json(Path(results_dir) / "signals" / "auc.json", "exit-signal analysis",
                        "run `python scripts/analyze_signals.py --config <cfg>`")


def plot_signals(results_dir: Union[str, Path], figures_dir: Union[str, Path]) -> list[Path]:
    """The signals figure from the results folder (how :func:`greencode.plots.plot_all` draws it)."""
    return plot_signals_auc(load_signals_report(results_dir), figures_dir)

# the signals drawn per exit point (the others are in the cost panel and the table)
_STYLE = {
    "full_max_prob": ("#ff7f0e", "^", "-"),
    "full_margin": ("#d62728", "v", "-"),
    "hidden_lr": ("#393b79", "o", "-"),
    "hidden_lr_4k": ("#393b79", "o", ":"),
    "saturation": ("#e377c2", "h", "-"),
    "hidden+full_lr": ("#7f7f7f", "P", "--"),
}
_SOURCE_COLORS = {"first_full": "#2ca02c", "prev_token": "#8c564b", "bigram": "#17becf", "context": "#bcbd22"}


def _style(name: str):
    if name in _STYLE:
        return _STYLE[name]
    for src, c in _SOURCE_COLORS.items():
        if f"[{src}]" in name:
            return c, ("s" if name.startswith("hidden+") else "D"), ("--" if name.startswith("hidden+") else "-")
    return "#aaaaaa", ".", "-"


@styled
def plot_signals_auc(report: dict, figures_dir: Union[str, Path]) -> list[Path]:
    exits = report["exit_layers"]
    sig = report["signals"]
    fig, axes = new_figure(11.5, 4.4, 1, 2)
    ax = axes[0, 0]
    drawn = [n for n in sig if n in _STYLE or n.endswith("_lr") and "[" in n]
    for name in drawn:
        c, m, ls = _style(name)
        pts = [(x, a) for x, a in zip(exits, sig[name]["auc_per_exit"]) if a is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=m, ls=ls, lw=1.3, ms=4.5, label=name)
    ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
    ax.set_xticks(exits)
    ax.set_xlabel("exit point (decoder layer, 0-based)")
    ax.set_ylabel("AUC against the oracle label")
    ax.set_title("AUC per exit point")
    ax.legend(fontsize=6.5, ncols=2, loc="lower right")
    ax = axes[0, 1]
    for name, s in sig.items():
        if s["auc_mean"] is None:
            continue
        c, m, _ = _style(name)
        x = max(s["cost"]["layers_per_token_all_checks"], 1e-4)
        ax.scatter([x], [s["auc_mean"]], color=c, marker=m, s=28, zorder=3)
        ax.annotate(name, (x, s["auc_mean"]), xytext=(4, 0), textcoords="offset points", fontsize=5.5, va="center")
    ax.set_xscale("log")
    ax.set_xlabel("cost per token, every exit point checked (decoder-layer equivalents, log)")
    ax.set_ylabel("mean AUC over exit points")
    ax.set_title("What a signal knows vs what it costs")
    ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
    tok = report.get("tokens", {}).get("test")
    fig.suptitle(f"Exit signals on held-out validation tokens ({report.get('model_kind', '')}: {report.get('model_dir')}"
                 f"{f', {tok:,} test tokens' if tok else ''}, k = {report.get('k')})")
    return save_figure(fig, Path(figures_dir), NAME)
