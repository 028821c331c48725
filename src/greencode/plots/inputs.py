"""Reading the result files the figures are drawn from (and nothing else).

Layout of ``results/<name>/`` (written by the other stages):

* ``eval/summary.json`` — :mod:`greencode.eval.summary` (format ``greencode-eval-summary/1``): one
  row per method id (``base``, ``full_hf``, ``full``, ``fixed@L``, ``confidence@T``, ``entropy@T``,
  ``oracle``, ``gc@T``, ``hf_early_exit@L``) with accuracy metrics, ``latency_s``, ``tokens_per_s``,
  ``energy_j`` (null when not measured), ``compute_ratio``, ``controller_overhead_share`` and deltas;
  ``overhead_ab`` (the A/B controller-overhead run); ``model`` (fingerprint: num_layers, exit_layers).
* ``rl/analysis.json`` and ``rl/episode_rewards.csv`` — :mod:`greencode.rl.train`.
* ``finetune/`` and ``pretrain/`` — :mod:`greencode.training`: loss logs (CSV) and the per-exit report.

Every loader raises :class:`~greencode.plots.common.MissingInput` naming the file and the
command that writes it when its input is absent.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from greencode.config import ExitScheduleConfig
from greencode.plots.common import MissingInput, family_of
from greencode.utils import read_json as _utils_read_json

log = logging.getLogger(__name__)

_READS: Optional[list[Path]] = None  # the result files read while recording (see recording_reads)


@contextlib.contextmanager
def recording_reads():
    """Collect every result file the loaders below read (the figure writer records them, and the
    weights they name, for each figure: greencode.provenance)."""
    global _READS
    previous, _READS = _READS, []
    try:
        yield _READS
    finally:
        _READS = previous


def _note(path: Union[str, Path]) -> None:
    if _READS is not None:
        _READS.append(Path(path))


def read_json(path: Union[str, Path]) -> Any:
    """``greencode.utils.read_json``, noted as a figure's input."""
    data = _utils_read_json(path)
    _note(path)
    return data

SUMMARY_FORMAT = "greencode-eval-summary/1"


def _read_json(path: Path, what: str, how: str) -> Any:
    if not path.is_file():
        raise MissingInput(f"no {what} at {str(path)!r}; {how}")
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); rerun the stage that writes it ({how})") from e


# --------------------------------------------------------------------------- evaluation
def load_summary(results_dir: Union[str, Path]) -> dict:
    """``results/<name>/eval/summary.json`` (the evaluator's summary)."""
    path = Path(results_dir) / "eval" / "summary.json"
    data = _read_json(path, "evaluation summary", "run `python scripts/evaluate.py --config <cfg>` "
                                                   "(or scripts/reproduce.py)")
    if data.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"{str(path)!r} is not an evaluation summary (format {data.get('format')!r}, expected "
                         f"{SUMMARY_FORMAT!r})")
    if not data.get("rows"):
        raise MissingInput(f"{str(path)!r} has no method rows; every method was skipped (see summary.md)")
    return data


def rows_of(summary: dict, *families: str) -> list[dict]:
    """Rows of the given families in summary order (all rows when none given)."""
    rows = summary["rows"]
    return [r for r in rows if not families or family_of(r) in families]


def reference_row(summary: dict) -> Optional[dict]:
    """The fine-tuned all-layers row the deltas refer to (``full``, else ``full_hf``)."""
    ref = summary.get("reference_method")
    for fam in ([ref] if ref else []) + ["full", "full_hf"]:
        for r in summary["rows"]:
            if r.get("id") == fam:
                return r
    return None


def is_value(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def energy_measured(rows: list[dict]) -> bool:
    """True when every given row has a measured energy (never plot zeros for null energy)."""
    return bool(rows) and all(is_value(r.get("energy_j")) for r in rows)


def num_layers_of(summary: dict) -> Optional[int]:
    model = summary.get("model") or {}
    if model.get("num_layers"):
        return int(model["num_layers"])
    cfg = (summary.get("run_metadata") or {}).get("config") or {}
    m = cfg.get("model") or {}
    return int(m["num_layers"]) if m.get("num_layers") and m.get("base") is None else None


# --------------------------------------------------------------------------- RL
def load_rl_analysis(results_dir: Union[str, Path]) -> dict:
    return _read_json(Path(results_dir) / "rl" / "analysis.json", "RL analysis",
                      "run `python scripts/train_agent.py --config <cfg>`")


def load_episode_rewards(results_dir: Union[str, Path]) -> list[dict[str, float]]:
    """``rl/episode_rewards.csv``: mean step reward per episode (binned), in time order."""
    path = Path(results_dir) / "rl" / "episode_rewards.csv"
    rows = read_csv(path, "PPO episode rewards", "run `python scripts/train_agent.py --config <cfg>`")
    if not rows or "mean_step_reward" not in rows[0]:
        raise MissingInput(f"{str(path)!r} holds no finished episode (no 'mean_step_reward' rows); "
                           "train the agent for more steps")
    return rows


# --------------------------------------------------------------------------- CSV
def _parse(v: str) -> Any:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return f


def read_csv(path: Path, what: str, how: str) -> list[dict[str, Any]]:
    """A CSV as a list of dicts, numbers parsed, empty cells as None."""
    if not path.is_file():
        raise MissingInput(f"no {what} at {str(path)!r}; {how}")
    _note(path)
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- training logs
_LAYER_RE = re.compile(r"(?:exit|layer)[_\-/ ]*(?:layer[_\-/ ]*)?(\d+)", re.IGNORECASE)
_STEP_KEYS = ("step", "global_step", "steps")


def loss_columns(columns: list[str]) -> dict[str, Any]:
    """Classify loss columns: ``train`` / ``eval`` total losses and per-exit losses
    ``{layer: column}`` for train and eval (layers 0-based, parsed from the column name)."""
    out: dict[str, Any] = {"train": None, "eval": None, "train_exits": {}, "eval_exits": {}}
    for c in columns:
        name = c.lower()
        if "loss" not in name:
            continue
        is_eval = name.startswith("eval") or "/eval" in name or name.startswith("val")
        m = _LAYER_RE.search(name)
        if m:
            out["eval_exits" if is_eval else "train_exits"].setdefault(int(m.group(1)), c)
        elif name in ("loss", "train_loss", "train/loss", "total_loss", "loss_total", "train_total_loss",
                      "eval_loss", "eval/loss", "eval_total_loss", "eval_loss_total"):
            key = "eval" if is_eval else "train"
            out[key] = out[key] or c
    return out


def find_loss_log(stage_dir: Path) -> Path:
    """The loss CSV of a training stage: a CSV in ``stage_dir`` with a step column and a loss column."""
    if not stage_dir.is_dir():
        raise MissingInput(f"no training results folder {str(stage_dir)!r}; run the training stage "
                           "(scripts/pretrain.py / scripts/finetune.py or scripts/reproduce.py)")
    candidates = sorted(stage_dir.glob("*.csv"), key=lambda p: ("loss" not in p.name, p.name))
    for p in candidates:
        try:
            with open(p, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except OSError:
            continue
        cols = loss_columns(header)
        if any(h.lower() in _STEP_KEYS for h in header) and (cols["train"] or cols["eval"] or cols["train_exits"]):
            return p
    raise MissingInput(f"no loss log (CSV with a step and a loss column) in {str(stage_dir)!r}")


def load_loss_log(stage_dir: Union[str, Path]) -> dict[str, Any]:
    """A training stage's loss CSV, split into train and eval rows. Handles the long format of
    :mod:`greencode.training` (``train_log.csv``: a ``split`` column, ``loss`` and ``loss_exit_<L>``
    for both splits) and the wide HF format (``eval_loss`` / ``eval_loss_exit_<L>`` columns).
    Returns ``{"path", "step", "train": (rows, total column, {layer: column}), "eval": (...)}``."""
    path = find_loss_log(Path(stage_dir))
    rows = read_csv(path, "loss log", "")
    header = list(rows[0]) if rows else []
    step = next((h for h in header if h.lower() in _STEP_KEYS), "step")
    cols = loss_columns(header)
    split = next((h for h in header if h.lower() == "split"), None)
    if split is not None:
        train = [r for r in rows if str(r.get(split)).lower() == "train"]
        evals = [r for r in rows if str(r.get(split)).lower() in ("eval", "validation", "val")]
        return {"path": path, "step": step, "train": (train, cols["train"], cols["train_exits"]),
                "eval": (evals, cols["train"], cols["train_exits"])}
    return {"path": path, "step": step, "train": (rows, cols["train"], cols["train_exits"]),
            "eval": (rows, cols["eval"], cols["eval_exits"])}


def series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs where both cells are numbers."""
    xs, ys = [], []
    for r in rows:
        a, b = r.get(x), r.get(y)
        if isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) or math.isnan(b)):
            xs.append(a)
            ys.append(b)
    return xs, ys


def load_exit_report(results_dir: Union[str, Path]) -> dict:
    return _read_json(Path(results_dir) / "finetune" / "exit_report.json", "per-exit report",
                      "run `python scripts/finetune.py --config <cfg>` (it writes the report after fine-tuning)")


# --------------------------------------------------------------------------- config
def recorded_config(results_dir: Union[str, Path]) -> tuple[dict, str]:
    """The resolved config recorded with the results, and where it was found: a stage's
    ``config.yaml`` (run info) or the ``config`` of a result file's run metadata."""
    d = Path(results_dir)
    for stage in ("finetune", "pretrain", "eval", "rl"):
        p = d / stage / "config.yaml"
        if p.is_file():
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(data, dict):
                _note(p)
                return data, str(p)
    for p, keys in ((d / "finetune" / "summary.json", ("meta", "config")),
                    (d / "eval" / "summary.json", ("run_metadata", "config")),
                    (d / "finetune" / "exit_report.json", ("meta", "config")),
                    (d / "finetune" / "exit_report.json", ("run_metadata", "config")),
                    (d / "rl" / "analysis.json", ("meta", "config")),
                    (d / "pretrain" / "summary.json", ("meta", "config"))):
        if not p.is_file():
            continue
        try:
            obj: Any = read_json(p)
        except (OSError, ValueError, json.JSONDecodeError):
            continue
        for k in keys:
            obj = obj.get(k) if isinstance(obj, dict) else None
        if isinstance(obj, dict):
            return obj, f"{p}:{'.'.join(keys)}"
    raise MissingInput(f"no recorded config in {str(d)!r} (looked for <stage>/config.yaml, finetune/summary.json, "
                       "eval/summary.json, finetune/exit_report.json, rl/analysis.json); run a stage first")


def model_geometry(results_dir: Union[str, Path], cfg: Optional[dict] = None) -> tuple[int, list[int], str]:
    """(num_layers, exit_layers, source) of the evaluated / trained model, 0-based, final layer excluded.
    Taken from what a stage recorded about the real model; the config's own shape is the fallback
    (valid for the embedded default, where ``model.base`` is null)."""
    d = Path(results_dir)
    p = d / "eval" / "summary.json"
    if p.is_file():
        try:
            model = read_json(p).get("model") or {}
        except (OSError, ValueError):
            model = {}
        if model.get("num_layers") and model.get("exit_layers") is not None:
            return int(model["num_layers"]), [int(e) for e in model["exit_layers"]], f"{p}:model"
    p = d / "rl" / "analysis.json"
    if p.is_file():
        try:
            bank = read_json(p).get("bank") or {}
        except (OSError, ValueError):
            bank = {}
        if bank.get("final_layer") is not None and bank.get("exit_layers"):
            return int(bank["final_layer"]) + 1, [int(e) for e in bank["exit_layers"]], f"{p}:bank"
    p = d / "finetune" / "summary.json"
    if p.is_file():
        try:
            ft = read_json(p)
        except (OSError, ValueError):
            ft = {}
        if ft.get("num_layers") and ft.get("exit_points"):
            return int(ft["num_layers"]), [int(e) for e in ft["exit_points"][:-1]], f"{p}:exit_points"
    if cfg is None:
        cfg, _ = recorded_config(d)
    m = cfg.get("model") or {}
    if m.get("base") is not None:
        raise MissingInput(f"the model's depth is not recorded in {str(d)!r} and model.base={m.get('base')!r} is "
                           "a pretrained model whose shape the config does not hold; run the evaluation first")
    from greencode.models.schedule import resolve_exit_layers

    n = int(m.get("num_layers", 0))
    sched = ExitScheduleConfig(**(m.get("exit_schedule") or {}))
    return n, resolve_exit_layers(n, m.get("exit_layers"), sched), "config (model.num_layers / exit schedule)"
