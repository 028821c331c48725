"""Compiled GC with the policy check fused into the compiled call vs checked eagerly after it (8 prompts x 32
tokens, 6 alternating rounds, ms per decode step). Needs commit 7e1b227 (the fused check, reverted in dc89468 after
this measurement: 5.26 vs 5.08 ms, no gain on the CPU; results/LOG.md).

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root at commit 7e1b227:
    .venv/bin/python results/adhoc/fused_check_ab.py RUN_DIR   (RUN_DIR: a trained default run, e.g. runs/default)
"""
import sys, time, torch, statistics as st
from greencode.models.early_exit import EarlyExitModel
from greencode.decoding import generate, PolicyExit
from greencode.decoding.compiled import use_compiled_steps
from greencode.rl.policy import load_policy
torch.set_num_threads(2)
root = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
m = EarlyExitModel.from_pretrained(root + "/finetuned").eval()
pol = load_policy(root + "/agent/policy.pt", m)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(5, 1000, (200,), generator=g).tolist() for _ in range(8)]
steps = use_compiled_steps(m, "default")
def run(fuse):
    c = PolicyExit(pol, 0.6, 1.0, observation="normed")
    if not fuse:
        c.fused_score = lambda: None
    ts = []
    for p in prompts:
        r = generate(m, p, c, 32); ts.append(r.counters["decode_time_s"] / 31)
    return st.median(ts)
for f in (True, False): run(f)
res = {True: [], False: []}
for rep in range(6):
    for f in ((True, False) if rep % 2 else (False, True)):
        res[f].append(run(f))
print("fused", [round(x*1e3,2) for x in res[True]], "unfused", [round(x*1e3,2) for x in res[False]])
print("median fused %.2f unfused %.2f ms" % (st.median(res[True])*1e3, st.median(res[False])*1e3), steps.describe())
