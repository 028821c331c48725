#!/usr/bin/env python
"""Run the whole GREEN-CODE pipeline for a config, reusing finished stages.

    python scripts/reproduce.py --config configs/smoke.yaml            # seconds, CPU
    python scripts/reproduce.py --config configs/default.yaml          # = make demo (CPU, ~50 min on 2 cores)
    python scripts/reproduce.py --config configs/default.yaml --force agent evaluate
    python scripts/reproduce.py --config configs/paper/llama-3.2-3b_java.yaml   # GPU box with internet

Stages: data -> pretrain (embedded default only) -> finetune (LITE) -> report -> bank -> agent
-> evaluate -> figures. A stage whose config sections and upstream stages are unchanged is
skipped; --force STAGE [STAGE ...] redoes the named ones.
"""

import sys
from pathlib import Path

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.pipeline import STAGE_NAMES, run_pipeline


@friendly_errors
def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE", choices=STAGE_NAMES,
                   help=f"redo these stages ({', '.join(STAGE_NAMES)})")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE", choices=STAGE_NAMES,
                   help="run only these stages (their inputs must exist)")
    args = p.parse_args()
    cfg = load_from_args(args)
    run_pipeline(cfg, force=args.force, only=args.only)
    from greencode.paths import RunPaths

    summary = RunPaths.from_config(cfg).results_eval / "summary.md"
    if summary.is_file():
        print("\n" + summary.read_text(encoding="utf-8"))
        print(f"results: {summary.parent}   figures: {RunPaths.from_config(cfg).figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
