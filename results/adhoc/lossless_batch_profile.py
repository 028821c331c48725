"""In-process decode speed of 1 vs 8 rows through the endpoint's engine, lossy (full model) and lossless
(the served policy drafting), on bench_serve's prompts (~960 tokens): the numbers behind LOG 2026-12-06
"Lossless rows in the batch" (115 / 121-128 tok/s for 8 lossless rows vs 68 alone). Ends with a cProfile of
8 lossless rows. Ad-hoc; run from the repo root with the demo run in runs/default:
    .venv/bin/python results/adhoc/lossless_batch_profile.py
"""
import time, cProfile, pstats, sys
from greencode.config import load_config
from greencode.serve.engine import load_run, Engine, GenRequest
from greencode.energy import make_meter
from greencode.serve.bench import bench_prompts
cfg = load_config("configs/default.yaml")
run = load_run(cfg)
eng = Engine(run.model, run.tokenizer, run.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding, meter=make_meter(cfg.eval.energy, run.model.device), run_root=run.root, calibration=run.calibration, language=cfg.data.language, literal_mode=cfg.data.literal_mode)
prompts = bench_prompts(8, 0)
def go(mode, n, stream=True):
    jobs = [eng.prepare(GenRequest(prompt=p, max_new_tokens=64, mode=mode, stream=stream)) for p in prompts[:n]]
    b = eng.new_batch()
    rows = [eng.row(j, (lambda e: None) if stream else None, None) for j in jobs]
    b.add(rows, [j.ids for j in jobs])
    t0 = time.perf_counter(); steps = 0
    while b.rows: eng.step(b); steps += 1
    dt = time.perf_counter() - t0
    toks = sum(len(r.tokens) for r in rows)
    print(mode, n, stream, f"{dt/steps*1e3:.1f} ms/step {steps} steps {toks/dt:.1f} tok/s", {k: rows[0].counters.get(k) for k in ("rounds", "drafted", "accepted", "verified_tokens")})
for mode in ("lossy", "lossless"):
    for n in (1, 8):
        go(mode, n)
prof = cProfile.Profile()
prof.runcall(go, "lossless", 8)
pstats.Stats(prof).sort_stats("tottime").print_stats(12)
