"""The one timing harness of the benchmarks (decoding, throughput, compiled) and ``make gpu-check``.

* :func:`interleaved_rounds`: warm-up rounds whose results are dropped, then rounds in which
  every group's cells run in an order rotated by round and group, so a slow drift of a shared
  machine (another process, thermal throttling) hits every cell alike;
* :func:`sync` before and after a timed region on a GPU (:func:`timed`);
* :func:`quartiles` and :func:`paired_median` (the median of per-round ratios: each round's
  cells ran next to each other, so their ratio cancels what the round had in common);
* :class:`Noise`: the machine's load average and the wall time around a run, recorded with its
  numbers; :func:`write_result`: the JSON and its markdown table, both atomically.

Each benchmark keeps only its list of what to time (its cells and how to run one).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def sync(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def timed(device, fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall seconds, synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


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


def quartiles(xs: Sequence[float]) -> dict[str, float]:
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "iqr": 0.0}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def paired_median(xs: Sequence[Optional[float]], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Median of the per-round ratios x / y (same prompt, same round)."""
    ratios = [x / y for x, y in zip(xs, ys) if x is not None and y]
    return statistics.median(ratios) if ratios else None


def load_average() -> Optional[list[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


class Noise:
    """``with Noise() as noise:`` around a run; ``noise.record(**more)`` is what the result keeps:
    the load average before and after and the wall seconds (and whatever is added)."""

    def __enter__(self) -> "Noise":
        self.before, self.t0 = load_average(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.after, self.wall_s = load_average(), time.perf_counter() - self.t0

    def record(self, **more: Any) -> dict:
        return {"load_average_before": self.before, "load_average_after": self.after, "wall_s": self.wall_s, **more}


def write_result(out_path: Path, result: dict, markdown: Optional[Callable[[dict], str]] = None) -> Path:
    """The result JSON and, next to it, its markdown table (both written atomically, without machine paths)."""
    from greencode.utils import write_json, write_text

    write_json(out_path, result)
    if markdown is not None:
        write_text(Path(out_path).with_suffix(".md"), markdown(result) + "\n")
    log.info("wrote %s", out_path)
    return Path(out_path)
