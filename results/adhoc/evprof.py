"""cProfile of evaluate() on 24 accuracy-only samples of the default, 1 worker ('evaluation profile';
'sorted by prompt length': run_rows 24.8 -> 17.2 s).

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root:
    .venv/bin/python results/adhoc/evprof.py RUN_DIR OUT
    (RUN_DIR: a trained default run, e.g. runs/default; OUT: a scratch directory holding
    OUT/default/calibration, a copy of results/default/calibration)
"""
import cProfile, pstats, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
from greencode.config import load_config
from greencode.eval import evaluate
run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
if len(sys.argv) < 3:
    sys.exit("usage: evprof.py RUN_DIR OUT (see the docstring)")
out = sys.argv[2]
cfg = load_config("configs/default.yaml", [f"run_dir={run_dir}", f"results_dir={out}/default",
      f"figures_dir={out}/fig", "eval.num_samples=24", "eval.timing_samples=0", "eval.workers=1",
      "eval.overhead_ab=false", "eval.warmup_samples=0", "hardware.num_threads=1"])
t = time.perf_counter()
pr = cProfile.Profile(); pr.enable()
evaluate(cfg)
pr.disable()
print("total", time.perf_counter() - t)
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(35)
