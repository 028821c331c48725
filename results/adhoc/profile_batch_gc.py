"""Where a batch-8 GC decode step spends its time (cProfile, one process; ad hoc, issue 29's GC b8 target).
python results/adhoc/profile_batch_gc.py [threshold] [batch]"""
import cProfile, pstats, sys, time
import torch
from greencode.config import load_config
from greencode.bench.common import setup, bench_prompts, median_gc_threshold
from greencode.decoding import NeverExit, PolicyExit, FixedExit, generate

cfg = load_config("configs/default.yaml")
thr = float(sys.argv[1]) if len(sys.argv) > 1 else median_gc_threshold(cfg, None)
B = int(sys.argv[2]) if len(sys.argv) > 2 else 8
_, device, model, _, policy, _ = setup(cfg, "results/adhoc/_x.json", 200, 32, ())
gen = torch.Generator().manual_seed(cfg.seed)
lengths = [int(torch.randint(150, 201, (1,), generator=gen)) for _ in range(B)]
prompts, _ = bench_prompts(cfg, model, B, 200, gen, lengths)
ctrls = {"full": NeverExit(), f"gc@{thr}": PolicyExit.of(policy, thr, cfg.decoding.policy_temperature), "fixed@5": FixedExit(5)}
for name, c in ctrls.items():
    c.check_layers(model)
    generate(model, prompts, c, 32, kv_strategy=cfg.decoding.kv_strategy)  # warm
    ts = []
    for _ in range(3):
        res = generate(model, prompts, c, 32, kv_strategy=cfg.decoding.kv_strategy)
        ts.append(max(r.counters["decode_time_s"] for r in res))
    print(name, "decode s", [round(t, 4) for t in ts], "ms/step", round(min(ts) / 31 * 1000, 2))
c = ctrls[f"gc@{thr}"]
pr = cProfile.Profile()
pr.enable()
for _ in range(3):
    generate(model, prompts, c, 32, kv_strategy=cfg.decoding.kv_strategy)
pr.disable()
st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(30)
st.sort_stats("cumulative").print_stats(45)
