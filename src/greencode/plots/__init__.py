"""greencode.plots: the paper's figures (and the Pareto plot it lacks) from result files only.

``plot_all(results_dir, figures_dir)`` draws every figure whose inputs exist under
``results/<name>/`` into ``figures/<name>/`` (PNG at 150 dpi and PDF, or the config's ``figures``
formats), skips the others with the reason logged and recorded in ``figures/<name>/index.json``, and
returns the files written. One function per figure, each ``f(results_dir, figures_dir) -> [files]``:

====================  ==============================================================  =================
function              figure                                                          inputs
====================  ==============================================================  =================
plot_fixed_exits      accuracy / latency / energy of fixed exits (paper Fig. 1)        eval/summary.json
plot_exit_report      per-exit accuracy and agreement, base vs LITE                   finetune/exit_report.json
plot_lite_weights     LITE loss weights (Fig. 3)                                      recorded config + exit layers
plot_finetune_loss    LITE loss, total and per exit (Fig. 4)                          finetune/*.csv
plot_pretrain_loss    base-model pretraining loss                                     pretrain/*.csv
plot_ppo_reward       PPO mean step reward per episode (Fig. 6)                       rl/episode_rewards.csv
plot_optimal_exits    occurrences of the optimal exit (Fig. 7)                        rl/analysis.json
plot_agent_exit_accuracy  agent exit accuracy on the held-out bank                    rl/analysis.json
plot_accuracy_by_method   accuracy metrics per method (Figs. 8-9)                     eval/summary.json
plot_cost_by_method   energy / latency / throughput / compute per method (Figs. 10-11) eval/summary.json
plot_agent_overhead   the agent's overhead (Table IV)                                 eval/summary.json
plot_pareto           accuracy vs cost, every controller, Pareto front                eval/summary.json
plot_calibrated_targets  compute and disagreement at each calibrated target          eval/calibrated.json
plot_static_hull      controllers vs the static exits' hull at matched compute         eval/hull.json (or eval/)
plot_signals          each exit signal's AUC per exit point and against its cost      signals/auc.json
====================  ==============================================================  =================
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence, Union

from greencode.config import FIGURE_FORMATS
from greencode.plots.common import DPI, ENERGY_NOTE, FORMATS, MissingInput, output_formats
from greencode.plots.figures import (NAMES, pareto_front, plot_accuracy_by_method, plot_agent_exit_accuracy,
                                     plot_agent_overhead, plot_calibrated_targets, plot_cost_by_method,
                                     plot_exit_report, plot_finetune_loss, plot_fixed_exits, plot_lite_weights,
                                     plot_optimal_exits, plot_pareto, plot_ppo_reward, plot_pretrain_loss)
from greencode.plots.hull import plot_static_hull
from greencode.plots.inputs import recording_reads
from greencode.plots.signals import plot_signals, plot_signals_auc
from greencode.provenance import weights_of_inputs
from greencode.runinfo import run_metadata
from greencode.utils import portable_path, write_json

log = logging.getLogger(__name__)

FIGURES: dict[str, Callable[[Path, Path], list[Path]]] = {
    "fixed_exits": plot_fixed_exits,
    "exit_report": plot_exit_report,
    "lite_weights": plot_lite_weights,
    "finetune_loss": plot_finetune_loss,
    "pretrain_loss": plot_pretrain_loss,
    "ppo_reward": plot_ppo_reward,
    "optimal_exits": plot_optimal_exits,
    "agent_exit_accuracy": plot_agent_exit_accuracy,
    "accuracy_by_method": plot_accuracy_by_method,
    "cost_by_method": plot_cost_by_method,
    "agent_overhead": plot_agent_overhead,
    "pareto": plot_pareto,
    "calibrated_targets": plot_calibrated_targets,
    "static_hull": plot_static_hull,
    "signals_auc": plot_signals,
}


def plot_all(results_dir: Union[str, Path], figures_dir: Union[str, Path], formats: Sequence[str] = FORMATS,
             dpi: int = DPI) -> list[Path]:
    """Draw every figure whose inputs exist; skip (and log why) the others. Never raises on a
    partial or malformed results folder, only when ``results_dir`` itself is missing or the
    figures folder cannot be written. Returns the files written (one per figure and format; a
    drawn figure's files in the other formats are removed, so none is left from an older run) and
    writes ``index.json`` listing them, the skipped figures with reasons, run metadata, and for each
    figure (``provenance``) the result files it was drawn from and the weights they name (one record,
    or a list when they name several; :mod:`greencode.provenance`)."""
    results_dir, figures_dir = Path(results_dir), Path(figures_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {str(results_dir)!r} does not exist; run the pipeline first "
                                "(python scripts/reproduce.py --config <cfg>) or pass --results results/<name>")
    figures_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index: dict = {"results_dir": portable_path(results_dir), "figures": {}, "skipped": {}, "provenance": {}}
    all_inputs: set[Path] = set()
    for key, fn in FIGURES.items():
        try:
            with recording_reads() as reads, output_formats(formats, dpi):
                files = fn(results_dir, figures_dir)
        except MissingInput as e:
            log.info("figure %s skipped: %s", key, e)
            index["skipped"][key] = str(e)
            _remove_stale(figures_dir, NAMES[key])
            continue
        except Exception as e:  # noqa: BLE001 - one bad input file must not stop the other figures
            log.warning("figure %s failed and is skipped: %s: %s", key, type(e).__name__, e, exc_info=log.isEnabledFor(
                logging.DEBUG))
            index["skipped"][key] = f"{type(e).__name__}: {e}"
            _remove_stale(figures_dir, NAMES[key])
            continue
        written += files
        for stem in sorted({p.stem for p in files}):
            _remove_stale(figures_dir, stem, keep=formats)
        index["figures"][key] = [p.name for p in files]
        inputs = sorted(set(reads))
        all_inputs.update(inputs)
        recs = weights_of_inputs(inputs)
        index["provenance"][key] = {"inputs": [portable_path(p) for p in inputs],
                                    "weights": recs[0] if len(recs) == 1 else (recs or None)}
    every = weights_of_inputs(sorted(all_inputs))
    index["weights"] = every[0] if len(every) == 1 else None  # the one record all figures share, if they do
    index["run_metadata"] = {k: v for k, v in run_metadata().items() if k != "config"}
    write_json(figures_dir / "index.json", index)
    log.info("wrote %d figures (%d files) to %s; skipped %d: %s", len(index["figures"]), len(written), figures_dir,
             len(index["skipped"]), ", ".join(index["skipped"]) or "none")
    return written


def _remove_stale(figures_dir: Path, name: str, keep: Sequence[str] = ()) -> None:
    """A figure skipped now (or no longer written in a format) must not leave an older version that looks
    current."""
    for ext in sorted(set(FIGURE_FORMATS) - set(keep)):
        p = figures_dir / f"{name}.{ext}"
        if p.is_file():
            p.unlink()
            log.info("removed stale %s (its inputs are gone)", p.name)


__all__ = ["ENERGY_NOTE", "FIGURES", "MissingInput", "NAMES", "pareto_front", "plot_accuracy_by_method",
           "plot_agent_exit_accuracy", "plot_agent_overhead", "plot_all", "plot_cost_by_method", "plot_exit_report",
           "plot_finetune_loss", "plot_fixed_exits", "plot_lite_weights", "plot_optimal_exits", "plot_pareto",
           "plot_ppo_reward", "plot_pretrain_loss", "plot_signals", "plot_signals_auc", "plot_static_hull"]
