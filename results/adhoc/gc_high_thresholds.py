"""One-off (2026-12-07, 10:45): the tuning-slice grids of fixed and GC with probability thresholds above the dense
grid's 0.9999 (greencode.eval.grids.PROB_DENSE replaced for this run), to see whether GC's threshold reaches the
conservative end (compute 0.9-0.95; the committed grid stops at 0.862). Tuning slice only (validation samples
0-299); writes OUT/tune/grids.{json,md}.

    python results/adhoc/gc_high_thresholds.py OUT
"""
import sys

import greencode.eval.grids as g
from greencode.config import load_config

if __name__ == "__main__":  # the teacher-forced pass runs on eval.workers spawned processes
    out_dir = sys.argv[1]
    g.PROB_DENSE = (0.9999, 0.99995, 0.99999, 0.999995, 0.999999, 0.9999995, 0.9999999)
    cfg = load_config("configs/default.yaml", ["calibration.families=[fixed,gc]", f"results_dir={out_dir}",
                                               f"figures_dir={out_dir}/figures"])
    print((g.tune_grids(cfg) / "grids.md").read_text())
