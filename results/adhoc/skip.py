"""DecodeBatch.skip_share at 0 / 0.25 / 0.5 / 2 for full, GC at 0.6 / 0.3 and confidence 0.5, 8-row batches of stdlib
prompts ('What did not pay').

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root:
    .venv/bin/python results/adhoc/skip.py RUN_DIR   (RUN_DIR: a trained default run, e.g. runs/default)
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
torch.set_num_threads(2)
from greencode.models import EarlyExitModel
from greencode.rl.policy import load_policy
from greencode.decoding import NeverExit, PolicyExit, ConfidenceExit
from greencode.decoding.generate import DecodeBatch, Row
root = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
model = EarlyExitModel.from_pretrained(root + "/finetuned", device=torch.device("cpu"), dtype=torch.float32)
pol = load_policy(root + "/agent/policy.pt", model)
import os
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(root + "/finetuned")
ids = tok.encode(open(os.__file__).read() + open(os.path.__file__ if hasattr(os.path,'__file__') else os.__file__).read())
prompts = [ids[i*500: i*500 + 150 + 5*i] for i in range(16)]
def run(mk, share):
    t = time.perf_counter(); ex = 0; n = 0
    for k in range(0, 16, 8):
        b = DecodeBatch(model, skip_share=share)
        rows = [Row(controller=mk(), max_new_tokens=32) for _ in range(8)]
        b.add(rows, prompts[k:k+8])
        while b.rows: b.step()
        ex += sum(e != model.final_layer for r in rows for e in r.exit_layers[1:]); n += sum(len(r.tokens)-1 for r in rows)
    return time.perf_counter() - t, ex / n
ctrls = {"full": lambda: NeverExit(), "gc0.6": lambda: PolicyExit(pol, 0.6, 1.0, observation=getattr(pol, "observation", "normed")),
         "gc0.3": lambda: PolicyExit(pol, 0.3, 1.0, observation=getattr(pol, "observation", "normed")),
         "conf0.5": lambda: ConfidenceExit(0.5)}
for rep in range(2):
    for name, mk in ctrls.items():
        for share in ([0.0, 0.25, 0.5, 2.0] if name != "full" else [0.0]):
            w, er = run(mk, share)
            print(rep, name, share, f"{w:.2f}s exit-rate {er:.2f}", flush=True)
