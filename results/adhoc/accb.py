"""Accuracy-only decoding time for 16 stdlib prompts x 16 loop methods at 1, 4, 8, 16 prompts per batch, 1 thread
('Accuracy-only decoding, measured').

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root:
    .venv/bin/python results/adhoc/accb.py RUN_DIR   (RUN_DIR: a trained default run, e.g. runs/default)
"""
import sys, time, torch, os
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
torch.set_num_threads(1)
from greencode.models import EarlyExitModel
from greencode.rl.policy import load_policy
from greencode.decoding import NeverExit, PolicyExit, ConfidenceExit, FixedExit, OracleExit, EntropyExit, generate
from transformers import AutoTokenizer
root = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
model = EarlyExitModel.from_pretrained(root + "/finetuned", device=torch.device("cpu"), dtype=torch.float32)
pol = load_policy(root + "/agent/policy.pt", model)
tok = AutoTokenizer.from_pretrained(root + "/finetuned")
import json
ids = tok.encode(open(os.__file__).read())
prompts = [ids[i*300: i*300 + 100 + 20*i] for i in range(16)]
obs = getattr(pol, "observation", "normed")
def ctrls():
    return ([NeverExit()] + [FixedExit(l) for l in model.exit_layers] + [OracleExit()] +
            [PolicyExit(pol, t, 1.0, observation=obs) for t in (0.8, 0.9, 0.95)] + [ConfidenceExit(0.6), ConfidenceExit(0.8), EntropyExit(1.5)])
for rep in range(2):
    for B in (1, 4, 8, 16):
        t = time.perf_counter()
        for k in range(0, 16, B):
            cs = ctrls(); pr = prompts[k:k+B]
            generate(model, [p for p in pr for c in cs], [c for p in pr for c in cs], 15)
        print(rep, B, f"{time.perf_counter()-t:.2f}s", flush=True)
