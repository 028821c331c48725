"""The whole GREEN-CODE pipeline, stage by stage, with reuse of finished stages.

data -> pretrain (embedded default only) -> finetune (LITE) -> exit report -> trajectory bank
-> PPO agent (+ the supervised exit classifier) -> calibrate (thresholds per fidelity target, on
the validation split) -> evaluate -> figures.

Each stage has a key: a hash of the config sections it reads and of the keys of the
stages it depends on. A finished stage writes ``runs/<name>/pipeline/<stage>.json`` with its
key; when the key is unchanged and its outputs exist, the next run skips it. ``force``
redoes the named stages (downstream stages rerun only when their inputs changed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from greencode.config import Config, ConfigError
from greencode.data import prepare_data
from greencode.eval import evaluate
from greencode.eval.infill import evaluate_infill
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import REPO_ROOT, read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # dotted config sections the stage reads
    depends: tuple[str, ...]
    run: Callable[[Config], object]
    outputs: Callable[[RunPaths], list[Path]]
    enabled: Callable[[Config], bool] = lambda cfg: True
    description: str = ""
    inputs: Optional[Callable[[Config], dict]] = None  # identities of files outside the run that the stage reads
    # the stated estimate (seconds) of the embedded default on 2 CPU cores, printed when no run of these settings
    # is recorded (results/<name>/pipeline_timing.json); see ESTIMATE_BASIS
    estimate_s: Optional[float] = None


def _run_data(cfg):
    return prepare_data(cfg)


def _run_pretrain(cfg):
    from greencode.training import pretrain

    return pretrain(cfg)


def _base_identity(cfg) -> dict:
    """The configured base model's identity: a reshipped base (same path, new weights) is a new input."""
    if not cfg.model.base:
        return {}
    from greencode.training.common import model_dir_fingerprint

    base = cfg.model.base if Path(cfg.model.base).is_dir() else str(REPO_ROOT / cfg.model.base)
    return {"base": model_dir_fingerprint(base)}


def _run_finetune(cfg):
    from greencode.training import finetune

    return finetune(cfg)


def _run_report(cfg):
    from greencode.training import exit_report

    return exit_report(cfg)


def _run_bank(cfg):
    from greencode.rl import build_bank

    return build_bank(cfg)


def _run_agent(cfg):
    from greencode.rl import train_agent

    return train_agent(cfg)


def _run_calibrate(cfg):
    from greencode.eval.calibration import calibrate

    return calibrate(cfg)


def _run_evaluate(cfg):
    return evaluate(cfg)


def _run_infill(cfg):
    return evaluate_infill(cfg)


def _run_figures(cfg):
    from greencode.plots import plot_all

    paths = RunPaths.from_config(cfg)
    return plot_all(paths.results, paths.figures, cfg.figures.formats, cfg.figures.dpi)


STAGES: tuple[Stage, ...] = (
    Stage("data", ("data", "tokenizer", "seed"), (), _run_data,
          lambda p: [p.corpus / "manifest.json", p.tokenizer], description="corpus + tokenizer", estimate_s=90),
    Stage("pretrain", ("model", "pretrain", "seed", "hardware"), ("data",), _run_pretrain,
          lambda p: [p.base_model / "config.json"], enabled=lambda cfg: cfg.model.base is None,
          description="base model from scratch (embedded default only)"),
    Stage("finetune", ("model", "finetune", "seed", "hardware"), ("data", "pretrain"), _run_finetune,
          lambda p: [p.finetuned / "config.json"], description="LITE fine-tuning", inputs=_base_identity, estimate_s=410),
    Stage("report", ("finetune.eval_max_tokens",), ("finetune",), _run_report,
          lambda p: [p.results_finetune / "exit_report.json"], description="per-exit quality, base vs LITE", estimate_s=70),
    Stage("bank", ("rl.bank", "rl.observation", "rl.observation_features", "rl.candidate_source", "rl.candidate_k",
                   "decoding.kv_strategy", "seed"), ("finetune",), _run_bank,
          lambda p: [p.bank / "manifest.json"], description="trajectory bank", estimate_s=230),
    Stage("agent", ("rl", "seed"), ("bank",), _run_agent,
          lambda p: [p.policy], description="PPO exit policy", estimate_s=210),
    Stage("calibrate", ("calibration", "decoding", "eval.max_new_tokens", "eval.max_context_tokens",
                        "eval.context_fraction", "eval.mode", "eval.sample_seed", "eval.workers", "seed", "hardware"),
          ("finetune", "agent"), _run_calibrate, lambda p: [p.calibration], enabled=lambda cfg: cfg.calibration.enabled,
          description="thresholds per fidelity target (validation split)", estimate_s=840),
    Stage("evaluate", ("eval", "decoding", "seed", "hardware"), ("finetune", "agent", "pretrain", "calibrate"),
          _run_evaluate,
          lambda p: [p.results_eval / "summary.csv"], description="every method on the same samples", estimate_s=800),
    Stage("infill", ("eval.infill_samples", "eval.infill_max_new_tokens", "eval.infill_fixed_layers",
                     "eval.infill_gc_thresholds", "eval.gc_thresholds", "eval.split",
                     "eval.sample_seed", "eval.sample_offset", "eval.max_context_tokens", "decoding", "seed"),
          ("finetune", "agent"), _run_infill, lambda p: [p.results / "infill" / "infill.json"],
          enabled=lambda cfg: cfg.eval.infill_samples > 0,
          description="single-line infilling (models trained to fill in the middle)", estimate_s=200),
    Stage("figures", ("figures",), ("evaluate", "report", "agent"), _run_figures,
          lambda p: [p.figures], description="the paper's figures", estimate_s=15),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
ESTIMATE_BASIS = ("the embedded default's stage time on 2 quiet CPU cores, 2026-12-07: a fresh clone's make demo "
                  "(results/benchmark/demo_fresh_clone_2026-12-07.json), the bank, calibration and evaluation from "
                  "the main run after they moved to 2 processes (results/LOG.md)")


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def expected_line(stage: Stage, key: str, recorded: dict) -> str:
    """What a stage is expected to take: the last recorded run of the same settings (its key), else the
    last recorded run of other settings beside the stated estimate, else the stated estimate."""
    rec = (recorded.get("stages") or {}).get(stage.name) or {}
    when = str(recorded.get("created", ""))[:10]
    if rec.get("status") == "ran" and rec.get("key") == key:
        return f"expected ~{_fmt_s(rec['seconds'])} (the last run of these settings, {when})"
    est = f"~{_fmt_s(stage.estimate_s)} ({ESTIMATE_BASIS})" if stage.estimate_s is not None else "no estimate"
    if rec.get("status") == "ran":
        return f"expected {est}; the last recorded run ({when}, other settings) took {_fmt_s(rec['seconds'])}"
    return f"expected {est}"


def _section(cfg: Config, dotted: str):
    d = cfg.to_dict()
    for part in dotted.split("."):
        d = d[part]
    return d


def neutral_keys(cfg: Config) -> tuple[str, ...]:
    """Settings that change how a stage runs but not what it writes (tested bit for bit), left out of the
    stage keys: the simulated bank's processes (``rl.bank.workers``)."""
    return ("rl.bank.workers",) if cfg.rl.bank.source == "simulate" else ()


def _keyed_section(cfg: Config, dotted: str):
    """The config section ``dotted`` as keyed: :func:`neutral_keys` inside it removed."""
    d = copy.deepcopy(_section(cfg, dotted))
    for key in neutral_keys(cfg):
        if key == dotted or not key.startswith(dotted + "."):
            continue
        *parents, last = key[len(dotted) + 1:].split(".")
        node = d
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return d


def stage_key(cfg: Config, stage: Stage, upstream: dict[str, str]) -> str:
    payload = {"stage": stage.name, "sections": {s: _keyed_section(cfg, s) for s in stage.sections},
               "upstream": {d: upstream.get(d) for d in stage.depends}}
    if stage.inputs is not None:  # inputs the config names but does not hold (a base model's weights)
        payload.update(stage.inputs(cfg))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_path(paths: RunPaths, stage: str) -> Path:
    return paths.root / "pipeline" / f"{stage}.json"


def _is_done(paths: RunPaths, stage: Stage, key: str) -> bool:
    rec = _record_path(paths, stage.name)
    if not rec.is_file():
        return False
    try:
        if read_json(rec).get("key") != key:
            return False
    except (OSError, ValueError):
        return False
    return all(Path(o).exists() for o in stage.outputs(paths))


def run_pipeline(cfg: Config, force: Iterable[str] = (), only: Optional[Iterable[str]] = None,
                 printer: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every enabled stage in order, skipping the finished ones. Returns per-stage
    status (ran / skipped / disabled) and seconds."""
    force = set(force)
    unknown = force - set(STAGE_NAMES) | (set(only or ()) - set(STAGE_NAMES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(STAGE_NAMES)}")
    only = set(only) if only else None
    paths = RunPaths.from_config(cfg)
    keys: dict[str, str] = {}
    status: dict[str, dict] = {}
    t_all = time.perf_counter()
    try:
        recorded = read_json(paths.results / "pipeline_timing.json")
    except (OSError, ValueError):
        recorded = {}
    for i, stage in enumerate(STAGES, 1):
        head = f"[{i}/{len(STAGES)}] {stage.name:<9}"
        if not stage.enabled(cfg):
            keys[stage.name] = "disabled"
            status[stage.name] = {"status": "disabled", "seconds": 0.0}
            printer(f"{head} disabled ({stage.description})")
            continue
        key = stage_key(cfg, stage, keys)
        keys[stage.name] = key
        if (only is not None and stage.name not in only) or (stage.name not in force and _is_done(paths, stage, key)):
            status[stage.name] = {"status": "skipped", "seconds": 0.0}
            printer(f"{head} up to date, skipped ({stage.description})")
            continue
        printer(f"{head} running: {stage.description}; {expected_line(stage, key, recorded)}")
        t0 = time.perf_counter()
        stage.run(cfg)
        seconds = time.perf_counter() - t0
        missing = [str(o) for o in stage.outputs(paths) if not Path(o).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} finished but did not write {missing}")
        write_json(_record_path(paths, stage.name), {"stage": stage.name, "key": key, "seconds": seconds,
                                                     **run_metadata(cfg)})
        status[stage.name] = {"status": "ran", "seconds": seconds, "key": key}
        printer(f"{head} done in {seconds:.1f} s")
    total = time.perf_counter() - t_all
    record = {"stages": status, "total_seconds": total,
              **{k: v for k, v in run_metadata(cfg).items() if k != "config"}}
    make_start = os.environ.get("GREENCODE_MAKE_START")  # set by `make demo` before it sets up .venv
    if make_start:
        try:
            record["make_total_seconds"] = time.time() - float(make_start)
            record["make_note"] = "wall time of the whole make command: .venv set-up (when it ran) + the pipeline"
        except ValueError:
            pass
    write_json(paths.root / "pipeline" / "last_run.json", record)
    if any(s["status"] == "ran" for s in status.values()):
        write_json(paths.results / "pipeline_timing.json", record)
    printer(f"pipeline finished in {total:.1f} s")
    return status
