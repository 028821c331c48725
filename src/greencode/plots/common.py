"""Shared pieces of the figures: style, method labels and colours, atomic saving.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas (no
pyplot global state, no interactive backend needed), written by default with ``dpi=150`` as PNG
and as PDF (without a creation date, so re-plotting the same results gives the same PDF);
:func:`output_formats` (the config's ``figures`` section) picks other formats or resolution.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from greencode.config import FiguresConfig
from greencode.utils import atomic_path

log = logging.getLogger(__name__)

FORMATS, DPI = tuple(FiguresConfig().formats), FiguresConfig().dpi  # the defaults are the config section's
# the formats and dpi save_figure writes (set around a batch of figures by output_formats)
_OUTPUT: contextvars.ContextVar[tuple[tuple[str, ...], int]] = contextvars.ContextVar("figure_output",
                                                                                      default=(FORMATS, DPI))
ENERGY_NOTE = "energy not measured (no GPU / RAPL): time only"

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.axisbelow": True,
    "savefig.dpi": DPI,
}

# one colour and marker per method family, the same in every figure
FAMILY_COLORS = {
    "base": "#7f7f7f",
    "full_hf": "#17becf",
    "full": "#1f77b4",
    "fixed": "#8c564b",
    "confidence": "#ff7f0e",
    "entropy": "#9467bd",
    "saturation": "#e377c2",
    "classifier": "#393b79",
    "oracle": "#bcbd22",
    "gc_lossless": "#ff9896",
    "layerskip": "#98df8a",
    "gc": "#d62728",
    "hf_early_exit": "#2ca02c",
}
FAMILY_MARKERS = {"base": "X", "full_hf": "D", "full": "*", "fixed": "s", "confidence": "^", "entropy": "v",
                  "saturation": "h", "classifier": "p", "oracle": "P",
                  "gc_lossless": "8", "layerskip": ">", "gc": "o", "hf_early_exit": "<"}
FAMILY_NAMES = {
    "base": "base model",
    "full_hf": "fine-tuned, all layers (HF generate)",
    "full": "fine-tuned, all layers (our loop)",
    "fixed": "fixed exit layer",
    "confidence": "confidence exit (max softmax ≥ T)",
    "entropy": "entropy exit (entropy ≤ T nats)",
    "saturation": "hidden-state saturation (cosine ≥ T)",
    "classifier": "exit classifier, P(agree) ≥ T",
    "gc_lossless": "lossless GC (GC drafts, full model verifies)",
    "layerskip": "static self-speculation (fixed-layer drafts, full model verifies)",
    "oracle": "oracle (analysis only)",
    "gc": "GREEN-CODE agent, P(exit) ≥ T",
    "hf_early_exit": "HF assistant_early_exit (draft = layers 0..L)",
}
# accuracy columns of the evaluation summary and their scales (see greencode.eval.metrics.SCALES)
ACCURACY_METRICS = (("codebleu", "CodeBLEU"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU"), ("chrf", "chrF"),
                    ("exact_match", "Exact match"), ("exact_match_no_boilerplate", "Exact match w/o boilerplate"),
                    ("edit_similarity", "Edit similarity"))
DEFAULT_SCALES = {"codebleu": "0-1", "codebleu_ngram": "0-1", "codebleu_weighted_ngram": "0-1",
                  "codebleu_syntax": "0-1", "codebleu_dataflow": "0-1", "rouge_l": "0-1", "bleu": "0-100",
                  "chrf": "0-100", "exact_match": "0-1", "exact_match_no_boilerplate": "0-1", "edit_similarity": "0-100"}


class MissingInput(FileNotFoundError):
    """A figure's input is absent from the results folder; :func:`plot_all` skips the figure."""


def family_of(row: dict) -> str:
    fam = row.get("family")
    return fam if fam else str(row.get("id", "")).partition("@")[0]


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


# labels of the parameterised families ({} = the threshold or the 0-based layer)
PARAM_LABELS = {"fixed": "fixed layer {}", "confidence": "confidence ≥ {}", "entropy": "entropy ≤ {} nats",
                "gc": "GC T={}", "saturation": "saturation ≥ {}", "gc_lossless": "lossless GC T={}",
                "layerskip": "self-spec., layer {}", "classifier": "classifier ≥ {}",
                "hf_early_exit": "HF early exit, layer {}"}


def method_label(row: dict) -> str:
    """Short, human-readable label of one summary row (layers 0-based)."""
    fam, param = family_of(row), row.get("param")
    if param is None and "@" in str(row.get("id", "")):
        param = str(row["id"]).partition("@")[2]
    short = {"base": "base model", "full_hf": "full (HF generate)", "full": "full (our loop)",
             "oracle": "oracle (analysis)"}
    if fam in short:
        return short[fam]
    if fam in PARAM_LABELS:
        return PARAM_LABELS[fam].format(_num(param))
    return str(row.get("id", fam))


def as_percent(value: Optional[float], key: str, scales: Optional[dict] = None) -> Optional[float]:
    """An accuracy value in percent: 0-1 metrics x 100, 0-100 metrics as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    scale = (scales or {}).get(key) or DEFAULT_SCALES.get(key, "0-1")
    return float(value) * (100.0 if scale == "0-1" else 1.0)


def styled(fn: Callable) -> Callable:
    """Run a figure function under the project's matplotlib style (without touching global rcParams)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with matplotlib.rc_context(STYLE):
            return fn(*a, **kw)

    return wrapper


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **subplot_kw) -> tuple[Figure, Any]:
    """A constrained-layout figure on an Agg canvas and a 2-D array of axes."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def note_panel(ax, text: str, title: Optional[str] = None) -> None:
    """An empty panel holding a note (e.g. energy not measured) instead of invented numbers."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True,
            style="italic", color="#555555",
            bbox={"boxstyle": "round,pad=0.6", "facecolor": "#f4f4f4", "edgecolor": "#bbbbbb"})


@contextlib.contextmanager
def output_formats(formats: Sequence[str] = FORMATS, dpi: int = DPI):
    """Inside this block :func:`save_figure` writes ``formats`` (png, pdf, svg) at ``dpi``."""
    token = _OUTPUT.set((tuple(formats), int(dpi)))
    try:
        yield
    finally:
        _OUTPUT.reset(token)


def current_formats() -> tuple[str, ...]:
    return _OUTPUT.get()[0]


def save_figure(fig: Figure, figures_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.<fmt>`` for each current format (png and pdf unless :func:`output_formats` says
    otherwise) atomically (temp file, then rename)."""
    figures_dir = Path(figures_dir)
    formats, dpi = _OUTPUT.get()
    out = []
    for fmt in formats:
        path = figures_dir / f"{name}.{fmt}"
        meta = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
        out.append(path)
    log.info("wrote %s.{%s} in %s", name, ",".join(formats), figures_dir)
    return out


def bar_value_labels(ax, bars, values: Sequence[Optional[float]], fmt: str = "{:.3g}", horizontal: bool = True,
                     fontsize: float = 7) -> None:
    """Value labels just past the end of each bar (the axis is widened to keep them inside)."""
    for bar, v in zip(bars, values):
        if v is None:
            continue
        if horizontal:
            x = bar.get_x() + bar.get_width()
            y = bar.get_y() + bar.get_height() / 2
            ax.annotate(fmt.format(v), (x, y), xytext=(3 if x >= 0 else -3, 0), textcoords="offset points",
                        ha="left" if x >= 0 else "right", va="center", fontsize=fontsize)
        else:
            x = bar.get_x() + bar.get_width() / 2
            y = bar.get_y() + bar.get_height()
            ax.annotate(fmt.format(v), (x, y), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=fontsize)
