"""Choosing knobs on the validation split, never on the test split.

``tune_policy_temperature`` runs the full model and GC at every ``eval.gc_thresholds`` on
validation samples for each candidate softmax temperature of the agent's P(exit), and picks
the temperature under which the threshold is the most usable knob: the widest spread of
compute ratios across the configured thresholds (ties: the lower temperature). The rows of
every candidate, the choice and the rule go to ``results/<name>/tune/knobs.json`` (and
``knobs.md``); the config's ``decoding.policy_temperature`` is then set from that file.

Only the final evaluation reads the test split: asking a tuning run for it is an error.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

from greencode.config import Config, ConfigError
from greencode.eval import evaluate
from greencode.eval.summary import summary_table
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import write_json, write_text

log = logging.getLogger(__name__)

TUNE_SPLIT = "validation"


def refuse_test_split(split: str, what: str = "a tuning or calibration run") -> None:
    if split == "test":
        raise ConfigError(f"eval.split=test: {what} reads the validation split only; knobs (thresholds, "
                          "temperatures, LITE recipe) are chosen on validation data and the test split is read only "
                          "by the final evaluation (scripts/evaluate.py). Drop the override or use eval.split=validation")


def tune_policy_temperature(cfg: Config, temperatures: Sequence[float], *, num_samples: int = 150,
                            split: str = TUNE_SPLIT) -> Path:
    """Evaluate GC on ``split`` for each temperature; write and return ``results/<name>/tune``."""
    refuse_test_split(split)
    if not temperatures or any(t <= 0 for t in temperatures):
        raise ConfigError(f"temperatures={list(temperatures)} must be positive numbers")
    out = RunPaths.from_config(cfg).results / "tune"
    candidates = []
    for t in temperatures:
        sub = dataclasses.replace(
            cfg, results_dir=str(out / f"T{t:g}"),
            decoding=dataclasses.replace(cfg.decoding, policy_temperature=float(t)),
            eval=dataclasses.replace(cfg.eval, split=split, num_samples=num_samples, timing_samples=0,
                                     overhead_ab=False, warmup_samples=0, bootstrap_resamples=0))
        evaluate(sub, ["full", "gc"])
        rows = [r for r in summary_table(Path(sub.results_dir) / "eval") if r["family"] == "gc"]
        ratios = [float(r["compute_ratio"]) for r in rows if r.get("compute_ratio") is not None]
        candidates.append({
            "temperature": float(t),
            "spread": (max(ratios) - min(ratios)) if ratios else None,
            "rows": [{k: r.get(k) for k in ("id", "param", "compute_ratio", "mean_exit_layer", "token_agreement",
                                             "edit_similarity", "same_output_as_reference_share")} for r in rows]})
    usable = [c for c in candidates if c["spread"] is not None]
    if not usable:
        raise ValueError("no GC rows were evaluated (is there an exit policy? run the agent stage first)")
    best = max(usable, key=lambda c: (round(c["spread"], 6), -c["temperature"]))
    result = {"knob": "decoding.policy_temperature", "split": split, "num_samples": num_samples,
              "gc_thresholds": list(cfg.eval.gc_thresholds), "chosen": best["temperature"],
              "rule": "the temperature with the widest spread of GC compute ratios across eval.gc_thresholds "
                      "(the threshold is then a usable knob); ties go to the lower temperature",
              "candidates": candidates, "run": run_metadata(cfg, stage="tune")}
    result["run"].pop("config", None)
    write_json(out / "knobs.json", result)
    write_text(out / "knobs.md", render(result))
    log.info("policy temperature %.3g chosen on %d %s samples -> %s", best["temperature"], num_samples, split, out)
    return out


def render(result: dict) -> str:
    lines = [f"# Knob choice: {result['knob']}", "",
             f"{result['num_samples']} {result['split']}-split samples; rule: {result['rule']}. "
             f"Chosen: **{result['chosen']:g}**.", "",
             "| T | threshold | compute ratio | mean exit layer | token agreement | edit similarity |",
             "|---|---|---|---|---|---|"]
    for c in result["candidates"]:
        for r in c["rows"]:
            lines.append(f"| {c['temperature']:g} | {r['param']} | {_f(r['compute_ratio'])} | "
                         f"{_f(r['mean_exit_layer'])} | {_f(r['token_agreement'])} | {_f(r['edit_similarity'])} |")
        lines.append(f"| {c['temperature']:g} | spread | {_f(c['spread'])} | | | |")
    return "\n".join(lines) + "\n"


def _f(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3f}"
