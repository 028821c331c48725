"""A/B of one row's exit check on the host (NumPy: signals.HostCheck, PolicyExit._host_probability) against the
tensor path it replaces (``host_path = False``): the same exported policy and prompts (the benchmark's: the last
200 tokens of the first 4 tuning-slice contexts), 32 new tokens each, batch 1, 2 threads; rounds interleaved with
the order rotated; ms per new token (whole generate call, prefill included) median over rounds with the
min-max; and whether the host path's tokens and exits equal the tensor path's. Rows: the full model, the policy
checking at every exit point without deciding (the benchmark's policy_check), GC deciding at 0.9 and 0.999, and
fixed@5 for scale.

Ad-hoc check kept with its result (results/adhoc/check_host_path.json) in results/LOG.md. Run from the repo root
with the demo run in runs/default and nothing else running:  .venv/bin/python results/adhoc/check_host_path.py
"""
import json
import statistics
import time

import torch

from greencode.bench.common import bench_prompts, load_bench_model, load_bench_policy
from greencode.config import load_config
from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import setup_torch

cfg = load_config("configs/default.yaml")
device, dtype = setup_torch(cfg.hardware)
paths = RunPaths.from_config(cfg)
model, _ = load_bench_model(cfg, paths, device, dtype)
policy, _ = load_bench_policy(cfg, paths, model)
prompts, note = bench_prompts(cfg, model, 4, 200, torch.Generator().manual_seed(cfg.seed))
N, ROUNDS = 32, 5


def policy_exit(threshold, host, **kw):
    c = PolicyExit.of(policy, threshold, cfg.decoding.policy_temperature, **kw)
    c.host_path = host
    return c


rows = {"full": lambda: NeverExit(), "fixed@5": lambda: FixedExit(5)}
for host in (True, False):
    tag = "host" if host else "tensor"
    rows[f"policy_check/{tag}"] = lambda host=host: policy_exit(0.5, host, ignore_decision=True)
    rows[f"gc@0.9/{tag}"] = lambda host=host: policy_exit(0.9, host)
    rows[f"gc@0.999/{tag}"] = lambda host=host: policy_exit(0.999, host)
times = {name: [] for name in rows}
outs = {}
with torch.inference_mode():
    for r in range(ROUNDS + 1):  # round 0 warms up
        names = list(rows)[r % len(rows):] + list(rows)[:r % len(rows)]
        for name in names:
            t = 0.0
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                res = generate(model, p, rows[name](), N)
                t += time.perf_counter() - t0
                outs[(name, i)] = (res.tokens, res.exit_layers)
            if r:
                times[name].append(t / (len(prompts) * N) * 1e3)
out = {"what": __doc__.split("\n\n")[0], "prompts": note, "new_tokens": N, "rounds": ROUNDS,
       "ms_per_token": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
       "host_equals_tensor": {k: all(outs[(f"{k}/host", i)] == outs[(f"{k}/tensor", i)] for i in range(len(prompts)))
                              for k in ("policy_check", "gc@0.9", "gc@0.999")},
       "mean_exit_layer": {k: statistics.mean(e for i in range(len(prompts)) for e in outs[(k, i)][1][1:])
                           for k in rows},
       "run_metadata": run_metadata(cfg, command="results/adhoc/check_host_path.py")}
full = out["ms_per_token"]["full"]["median"]
out["vs_full"] = {k: v["median"] / full for k, v in out["ms_per_token"].items()}
json.dump(out, open("results/adhoc/check_host_path.json", "w"), indent=1)
for k, v in out["ms_per_token"].items():
    print(f"{k:22s} {v['median']:.2f} ms/token [{v['min']:.2f}, {v['max']:.2f}]  x{out['vs_full'][k]:.3f} of full"
          f"  mean exit {out['mean_exit_layer'][k]:.2f}")
print("host == tensor:", out["host_equals_tensor"])
