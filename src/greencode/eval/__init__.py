"""greencode.eval: accuracy metrics, energy meters and the evaluator (the speed benchmarks live in
:mod:`greencode.bench`).

``evaluate(cfg, methods=None) -> Path`` runs every method on the same samples and writes
``results/<name>/eval``; ``summary_table(results_dir) -> list[dict]`` reads its rows back.
"""

from __future__ import annotations


def evaluate(cfg, methods=None):
    from greencode.eval.evaluator import evaluate as _evaluate

    return _evaluate(cfg, methods)


def summary_table(results_dir):
    from greencode.eval.summary import summary_table as _summary_table

    return _summary_table(results_dir)


__all__ = ["evaluate", "summary_table"]
