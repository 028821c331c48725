"""Compares a fresh clone's `make demo` results with the committed ones: for each JSON file both trees hold under
results/default/ (and figures/default/index), the numeric leaves that differ, ignoring what is expected to differ
between runs (times, dates, paths, host facts, commits). Prints per file: leaves compared, leaves that differ,
the largest absolute difference and where.

    .venv/bin/python results/adhoc/compare_fresh.py /path/to/fresh/results/default results/default [SINCE]

SINCE (seconds since the epoch): only the fresh tree's files written after it (the clone holds the committed
files too: those the demo did not rewrite are not evidence).
"""
import json
import math
import sys
from pathlib import Path

SKIP_KEYS = ("time", "_s", "seconds", "date", "created", "commit", "path", "host", "platform", "load_average",
             "wall", "duration", "elapsed", "per_s", "latency", "throughput", "run_metadata", "meta", "rss",
             "started", "finished", "versions", "hardware", "steps_per_s", "samples_per_second", "flos")


def skip(key: str) -> bool:
    k = key.lower()
    return any(s in k for s in SKIP_KEYS)


def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            if not skip(str(k)):
                yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    elif isinstance(x, bool) or x is None or isinstance(x, str):
        yield path, x
    elif isinstance(x, (int, float)):
        yield path, float(x)


def main(fresh: str, committed: str, since: float = 0.0) -> None:
    a_root, b_root = Path(fresh), Path(committed)
    total_diff = 0
    for b in sorted(b_root.rglob("*.json")):
        rel = b.relative_to(b_root)
        a = a_root / rel
        if not a.exists():
            print(f"{rel}: only in the committed tree")
            continue
        if a.stat().st_mtime < since:
            continue
        la, lb = dict(leaves(json.loads(a.read_text()))), dict(leaves(json.loads(b.read_text())))
        keys = set(la) & set(lb)
        worst, where, ndiff = 0.0, None, 0
        for k in keys:
            x, y = la[k], lb[k]
            if isinstance(x, float) and isinstance(y, float):
                if math.isnan(x) and math.isnan(y):
                    continue
                d = abs(x - y)
                if d > 0:
                    ndiff += 1
                    if d > worst:
                        worst, where = d, k
            elif x != y:
                ndiff += 1
                where = where or k
        only = len(set(la) ^ set(lb))
        total_diff += ndiff
        print(f"{rel}: {len(keys)} leaves, {ndiff} differ" + (f", max |diff| {worst:.6g} at {where}" if ndiff else "")
              + (f", {only} leaves in one tree only" if only else ""))
    print(f"total differing leaves: {total_diff}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
