"""A/B of the policy check's wall clock with the low_rank and the first_full candidate source: the same exported
policy weights (its metadata's candidate source swapped), PolicyExit with ignore_decision (checks at every exit
point, never exits), 3 rounds of 4 random-id prompts x 32 tokens, ms per token, beside the plain full model.

Ad-hoc check kept with its result in results/LOG.md (2026-12-07: 10.1-10.4 vs 10.0-10.4 ms/token). Run from the repo
root with the demo run in runs/default:  .venv/bin/python results/adhoc/check_source_ab.py
"""
import time, copy, torch
from greencode.config import load_config
from greencode.models import EarlyExitModel
from greencode.rl.policy import load_policy
from greencode.decoding import PolicyExit, NeverExit, generate
cfg = load_config("configs/default.yaml")
m = EarlyExitModel.from_run_config(cfg, "runs/default/finetuned").eval()
torch.set_num_threads(2)
pol = load_policy("runs/default/agent/policy.pt", m)
pol_ff = copy.deepcopy(pol)
pol_ff.metadata = dict(pol_ff.metadata); pol_ff.metadata["candidates"] = {"source": "first_full", "k": 4}
if hasattr(pol_ff, "candidates"): pol_ff.candidates = {"source": "first_full", "k": 4}
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(5, 8000, (200,), generator=g).tolist() for _ in range(4)]
def run(mk):
    ts = []
    for p in prompts:
        c = mk()
        t0 = time.perf_counter(); r = generate(m, p, c, 32); ts.append((time.perf_counter() - t0) / 32)
    return sum(ts) / len(ts) * 1e3, r
with torch.inference_mode():
    for rep in range(3):
        for name, mk in (("never", NeverExit), ("check low_rank", lambda: PolicyExit.of(pol, 0.5, ignore_decision=True)),
                         ("check first_full", lambda: PolicyExit.of(pol_ff, 0.5, ignore_decision=True))):
            ms, r = run(mk)
            print(rep, name, round(ms, 3), "ms/token", r.counters.get("lm_head_calls"), r.counters.get("controller_macs"))
