"""One-off (2026-12-07): the tuning-slice grids of fixed, GC and the classifier with probability thresholds below the
dense grid's 0.2 (greencode.eval.grids.PROB_DENSE replaced for this run), to see whether GC's threshold reaches the
aggressive end. Tuning slice only (validation samples 0-299); writes OUT/tune/grids.{json,md}.

    python results/adhoc/gc_low_thresholds.py OUT
"""
import sys

import greencode.eval.grids as g
from greencode.config import load_config

out_dir = sys.argv[1]
g.PROB_DENSE = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.9)
cfg = load_config("configs/default.yaml", ["calibration.families=[fixed,gc,classifier]", f"results_dir={out_dir}",
                                           f"figures_dir={out_dir}/figures"])
print((g.tune_grids(cfg) / "grids.md").read_text())
