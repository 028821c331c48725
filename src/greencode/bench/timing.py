"""The one timing harness and the one result writer of every benchmark (decoding, throughput,
compiled, serving, ``make gpu-check``, the pretraining step profile).

Clocks (the only place a benchmark reads the time):

* :func:`sync` before and after a timed region on a GPU; :func:`timed` (``fn()`` and its seconds,
  synchronized), :func:`best_of` (the fastest of a few), :func:`steady_window` (``fn`` again and
  again for a window of seconds);
* :class:`Stopwatch`: seconds since it started (``elapsed``), time stamps (``stamp``: a stopping
  criterion's per-step clock, a stream's chunk arrivals), optionally synchronizing a device first;
  it is also what times a request over HTTP, in a coroutine or not; :class:`Deadline`: a time
  budget (what ``make gpu-check`` still has time for).

Order and statistics:

* :func:`interleaved_rounds`: warm-up rounds whose results are dropped, then rounds in which
  every group's cells run in an order rotated by round and group, so a slow drift of a shared
  machine (another process, thermal throttling) hits every cell alike;
* :func:`quartiles`, :func:`percentiles` (p50/p90/p99 and the mean), :func:`percentile` and
  :func:`paired_median` (the median of per-round ratios: each round's cells ran next to each
  other, so their ratio cancels what the round had in common), all over one quantile rule;
* :class:`Noise`: the machine's load average and the wall time around a run, recorded with its
  numbers.

Writing: :func:`write_result` (the JSON and its markdown table, both atomically, without machine
paths, with the run's metadata and the weights record when given the config and the stage) and
:func:`merge_result` (one part into a result file that several runs fill).

Each benchmark keeps only its list of what to time (its cells and how to run one). Only torch,
numpy and the standard library are imported at the top: ``scripts/gpu_check.py`` runs this with
the machine's own python.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence, TypeVar

import numpy as np
import torch

from greencode.runinfo import run_metadata
from greencode.utils import read_json, write_json, write_text

log = logging.getLogger(__name__)
T = TypeVar("T")
_UNSET: Any = object()


# --------------------------------------------------------------------------- clocks
def sync(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Seconds since :meth:`start` (at construction). ``device``: a CUDA device is synchronized
    before every reading, so queued kernels count where they ran."""

    def __init__(self, device=None):
        self.device = device
        self.stamps: list[float] = []
        self.start()

    def start(self) -> "Stopwatch":
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    @property
    def elapsed(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.t0

    def stamp(self) -> float:
        """Record (and return) the seconds since the start."""
        s = self.elapsed
        self.stamps.append(s)
        return s

    def gaps(self) -> list[float]:
        """Seconds between consecutive stamps."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def timed(device, fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall seconds, synchronized before and after."""
    clock = Stopwatch(device)
    out = fn()
    return out, clock.elapsed


def best_of(device, fn: Callable[[], Any], tries: int = 2) -> float:
    """The fewest seconds ``fn()`` took in ``tries`` timed calls (the least disturbed one)."""
    return min(timed(device, fn)[1] for _ in range(tries))


def steady_window(device, fn: Callable[[], float], window_s: float) -> tuple[float, float]:
    """``fn()`` again and again until ``window_s`` seconds have passed; (the sum of what it
    returned, e.g. tokens, and the seconds it all took, synchronized at both ends)."""
    clock, total = Stopwatch(device), 0.0
    while time.perf_counter() - clock.t0 < window_s:
        total += fn()
    return total, clock.elapsed


class Deadline:
    """A time budget of ``seconds`` from now (a part of ``make gpu-check``): :attr:`passed`,
    :attr:`left`, :attr:`elapsed`. Budgets decide what still runs; they measure nothing."""

    def __init__(self, seconds: float):
        self.seconds, self.clock = float(seconds), Stopwatch()

    @property
    def elapsed(self) -> float:
        return self.clock.elapsed

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed

    @property
    def passed(self) -> bool:
        return self.left < 0


# --------------------------------------------------------------------------- order
def interleaved_rounds(groups: Sequence[Sequence[Hashable]], rounds: int, warmup: int,
                       run: Callable[[Hashable], T], *, warmup_one_group: bool = False) -> dict[Hashable, list[T]]:
    """``run(cell)`` for every cell of every group, ``rounds`` times, after ``warmup`` rounds whose
    results are dropped (``warmup_one_group``: a warm-up round runs one group, the next round's
    the next). In round ``r`` group ``g``'s cells start at offset ``r * len(groups) + g``, so no cell
    always runs first or last. Returns each cell's results in round order."""
    results: dict[Hashable, list[T]] = {cell: [] for group in groups for cell in group}
    for w in range(warmup):
        for group in ([groups[w % len(groups)]] if warmup_one_group else groups):
            for cell in group:
                run(cell)
    for rnd in range(rounds):
        for g, group in enumerate(groups):
            shift = (rnd * len(groups) + g) % len(group)
            for cell in list(group[shift:]) + list(group[:shift]):
                results[cell].append(run(cell))
    return results


# --------------------------------------------------------------------------- statistics
def percentile(xs: Sequence[float], q: float) -> Optional[float]:
    """The ``q``-th percentile (0-100, linear interpolation between the closest ranks: numpy's
    default, the same as ``statistics.quantiles(method="inclusive")``); ``None`` for no values.
    Every quantile a benchmark reports comes from here."""
    if not len(xs):
        return None
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def quartiles(xs: Sequence[float]) -> dict[str, float]:
    """Median, first and third quartile and their distance (the IQR)."""
    q1, med, q3 = (percentile(xs, q) for q in (25, 50, 75))
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def percentiles(xs: Sequence[float], scale: float = 1.0) -> dict[str, Optional[float]]:
    """p50, p90, p99 and the mean of ``xs`` times ``scale`` (1e3: seconds -> ms); ``None`` each for
    no values."""
    a = np.asarray(xs, dtype=np.float64) * scale
    return {"p50": percentile(a, 50), "p90": percentile(a, 90), "p99": percentile(a, 99),
            "mean": float(a.mean()) if len(a) else None}


def paired_median(xs: Sequence[Optional[float]], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Median of the per-round ratios x / y (same prompt, same round)."""
    ratios = [x / y for x, y in zip(xs, ys) if x is not None and y]
    return statistics.median(ratios) if ratios else None


# --------------------------------------------------------------------------- the machine around a run
def load_average() -> Optional[list[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def load_average_1m() -> Optional[float]:
    """The 1-minute load average (what the serving benchmarks record before and after)."""
    avg = load_average()
    return float(avg[0]) if avg else None


def load_record(before: Optional[float]) -> dict:
    """The 1-minute load average ``before`` a run and now, and the machine's CPU count."""
    return {"before": before, "after": load_average_1m(), "cpu_count": os.cpu_count()}


class Noise:
    """``with Noise() as noise:`` around a run; ``noise.record(**more)`` is what the result keeps:
    the load average before and after and the wall seconds (and whatever is added)."""

    def __enter__(self) -> "Noise":
        self.before, self.clock = load_average(), Stopwatch()
        return self

    def __exit__(self, *exc) -> None:
        self.after, self.wall_s = load_average(), self.clock.elapsed

    def record(self, **more: Any) -> dict:
        return {"load_average_before": self.before, "load_average_after": self.after, "wall_s": self.wall_s, **more}


# --------------------------------------------------------------------------- the one writer
def run_record(cfg=None, stage: Optional[str] = None, weights: Any = _UNSET) -> dict:
    """What a result records about its run (:func:`greencode.runinfo.run_metadata`): config, seed,
    commit, versions, hardware, command, and ``weights``, the record of the weights it came from
    (:func:`greencode.provenance.weights_record`; left out, the config's run on disk now; ``None``:
    none, e.g. a random-initialised model)."""
    extra: dict[str, Any] = {} if stage is None else {"stage": stage}
    if weights is not _UNSET:
        extra["weights"] = weights
    return run_metadata(cfg, **extra)


def write_result(out_path: Path, result: dict, markdown: Optional[Callable[[dict], str]] = None, *,
                 cfg=None, stage: Optional[str] = None, weights: Any = _UNSET,
                 meta_key: str = "run_metadata") -> Path:
    """The result JSON and, next to it, its markdown table (both written atomically, without
    machine paths). With ``stage``, the run's metadata and weights record (:func:`run_record`) are
    added under ``meta_key`` (the decoding benchmarks' ``run_metadata``, the serving ones' ``run``)."""
    if stage is not None:
        result[meta_key] = run_record(cfg, stage, weights)
    write_json(out_path, result)
    if markdown is not None:
        write_text(Path(out_path).with_suffix(".md"), markdown(result) + "\n")
    log.info("wrote %s", out_path)
    return Path(out_path)


def merge_result(out_path: Path, *, cfg=None, stage: Optional[str] = None, weights: Any = _UNSET,
                 meta_key: str = "run", **parts: Any) -> dict:
    """Write ``parts`` (key -> value) into the result file at ``out_path``, keeping its other keys
    (a file that several runs fill, one part each); with ``stage``, each part (a dict) records its
    run under ``meta_key``. Returns the whole result."""
    if stage is not None:
        record = run_record(cfg, stage, weights)
        parts = {k: {**v, meta_key: record} if isinstance(v, dict) else v for k, v in parts.items()}
    result = read_json(out_path) if Path(out_path).is_file() else {}
    result.update(parts)
    write_result(out_path, result)
    return result
