"""One method's per-sample metric in two evaluation folders, paired by sample id (new minus old, with a
bootstrap 95% interval): e.g. whether a new base moved the full model's edit similarity on the same test
samples.

    python scripts/compare_runs.py results/archive/<old>/eval results/default/eval --method full \
        --metric edit_similarity --out results/default/ablations/full_vs_old_base

Writes OUT.json and OUT.md when --out is given; prints the table.
"""

import argparse
import sys
from pathlib import Path

from greencode.cli import friendly_errors


@friendly_errors
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path, help="the earlier evaluation folder (with methods/<method>.json)")
    p.add_argument("new", type=Path, help="the later evaluation folder")
    p.add_argument("--method", default="full")
    p.add_argument("--new-method", default=None, help="the method's name in the new folder, when it differs")
    p.add_argument("--metric", default="edit_similarity")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args()
    from greencode.eval.compare import compare_evaluations, render_comparison
    from greencode.utils import write_json, write_text

    r = compare_evaluations(args.old, args.new, args.method, args.metric, resamples=args.resamples, seed=args.seed,
                            new_method=args.new_method)
    md = render_comparison(r)
    if args.out is not None:
        write_json(args.out.with_suffix(".json"), r)
        write_text(args.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
