"""Microbenchmark of one CheapSignals check (2,000 calls, 2 threads): the first check with low_rank against
first_full (which also needs the loop's full head, timed on its own), and a later check.

Ad-hoc check kept with its result in results/LOG.md (2026-12-07: 225 us vs 110 us + 257 us). Run from the repo root:
    .venv/bin/python results/adhoc/check_cost_per_source.py
"""
import time, torch
from greencode.config import load_config
from greencode.models import EarlyExitModel
from greencode.decoding.signals import CheapSignals
cfg = load_config("configs/default.yaml")
m = EarlyExitModel.from_run_config(cfg, "runs/default/finetuned").eval()
torch.set_num_threads(2)
h = torch.randn(1, 256)
full = m.decode(h)
for src in ("first_full", "low_rank"):
    sig = CheapSignals(m, 4, src, saturation=False)
    with torch.inference_mode():
        for rep in range(3):
            t0 = time.perf_counter()
            for _ in range(2000):
                sig.start(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
                sig.check(0, h, full if src == "first_full" else None)
            t1 = time.perf_counter()
            for _ in range(2000):
                sig.check(1, h)
            t2 = time.perf_counter()
        print(src, "first check us", (t1 - t0) / 2000 * 1e6, "later check us", (t2 - t1) / 2000 * 1e6)
with torch.inference_mode():
    t0 = time.perf_counter()
    for _ in range(2000):
        m.decode(h)
    print("full head us", (time.perf_counter() - t0) / 2000 * 1e6)
