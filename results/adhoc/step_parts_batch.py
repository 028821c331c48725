"""Where a batched decode step's time goes, by DecodeBatch method (wall clock, wrappers around the methods;
ad hoc, issue 29's GC b8 target). python results/adhoc/step_parts_batch.py [threshold] [batch]"""
import sys, time, collections
import torch
from greencode.config import load_config
from greencode.bench.common import setup, bench_prompts, median_gc_threshold
from greencode.decoding import NeverExit, PolicyExit, FixedExit, generate

import importlib; G = importlib.import_module("greencode.decoding.generate")

cfg = load_config("configs/default.yaml")
thr = float(sys.argv[1]) if len(sys.argv) > 1 else median_gc_threshold(cfg, None)
B = int(sys.argv[2]) if len(sys.argv) > 2 else 8
_, device, model, _, policy, _ = setup(cfg, "results/adhoc/_x.json", 200, 32, ())
gen = torch.Generator().manual_seed(cfg.seed)
lengths = [int(torch.randint(150, 201, (1,), generator=gen)) for _ in range(B)]
prompts, _ = bench_prompts(cfg, model, B, 200, gen, lengths)
acc = collections.Counter()
def wrap(name):
    f = getattr(G.DecodeBatch, name)
    def w(*a, **k):
        t = time.perf_counter(); out = f(*a, **k); acc[name] += time.perf_counter() - t; return out
    setattr(G.DecodeBatch, name, w)
for n in ["step", "_begin", "_run_segment", "_after_segment", "_look", "_decide", "_exit_checks", "_propagate_rest",
          "_top_logits", "_choose_tokens", "_drop"]:
    wrap(n)
ctrls = {"full": NeverExit(), f"gc@{thr}": PolicyExit.of(policy, thr, cfg.decoding.policy_temperature), "fixed@5": FixedExit(5)}
for name, c in ctrls.items():
    c.check_layers(model)
    generate(model, prompts, c, 32, kv_strategy=cfg.decoding.kv_strategy)
    acc.clear()
    R = 3
    for _ in range(R):
        res = generate(model, prompts, c, 32, kv_strategy=cfg.decoding.kv_strategy)
    steps = 31 * R
    print(name, " ".join(f"{k}={v / steps * 1000:.2f}" for k, v in acc.items()), "ms/step")
