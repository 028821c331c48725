"""Every controller against the convex hull of the static exits at matched compute, with paired CIs.

    python scripts/static_hull.py results/default/eval --out /tmp/hull \
        --calibration results/default/calibration/calibration.json

Reads an evaluation folder (summary.json, methods/*.json, teacher_forced.json when present) and writes
hull.json and hull.md into --out (default: the evaluation folder itself, which also adds a `hull` block
to its summary.json; the evaluation writes them on its own, so this is for folders written before it).
--static names the static families (default: full, fixed, saturation). Prints hull.md.
"""

import argparse
import json
from pathlib import Path

from greencode.eval.hull import STATIC_FAMILIES, render_hull, write_hull


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dir", help="an evaluation folder, e.g. results/default/eval")
    p.add_argument("--out", default=None, help="where hull.json and hull.md go (default: eval_dir)")
    p.add_argument("--calibration", default=None, help="a calibration.json: adds its validation risks vs the hull")
    p.add_argument("--static", default=",".join(STATIC_FAMILIES), help="comma-separated static families")
    args = p.parse_args()
    eval_dir = Path(args.eval_dir)
    if not (eval_dir / "summary.json").is_file():
        raise SystemExit(f"error: {eval_dir / 'summary.json'} not found; run the evaluation first (scripts/evaluate.py)")
    calibration = json.loads(Path(args.calibration).read_text(encoding="utf-8")) if args.calibration else None
    static = [s.strip() for s in args.static.split(",") if s.strip()]
    block = write_hull(eval_dir, args.out, static_families=static, calibration=calibration)
    print(render_hull(block), end="")


if __name__ == "__main__":
    main()
