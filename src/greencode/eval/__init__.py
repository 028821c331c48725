"""greencode.eval: accuracy metrics, energy meters, the evaluator and the decoding benchmark.

``evaluate(cfg, methods=None) -> Path`` runs every method on the same samples and writes
``results/<name>/eval``; ``summary_table(results_dir) -> list[dict]`` reads its rows back;
``run_benchmark(cfg) -> Path`` writes ``results/benchmark/<name>.json``.
"""

from __future__ import annotations


def evaluate(cfg, methods=None):
    from greencode.eval.evaluator import evaluate as _evaluate

    return _evaluate(cfg, methods)


def summary_table(results_dir):
    from greencode.eval.summary import summary_table as _summary_table

    return _summary_table(results_dir)


def run_benchmark(cfg, **kwargs):
    from greencode.eval.benchmark import run_benchmark as _run_benchmark

    return _run_benchmark(cfg, **kwargs)


__all__ = ["evaluate", "run_benchmark", "summary_table"]
