"""Policy-check cost per token, previous one-row loop (a copy of generate.py at e9a7d5c, passed as OLD_GENERATE)
vs the batched loop: never-exit vs PolicyExit(ignore_decision) ('Policy check share').

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root:
    .venv/bin/python results/adhoc/pc.py RUN_DIR OLD_GENERATE
    (RUN_DIR: a trained default run, e.g. runs/default; OLD_GENERATE: generate.py as of e9a7d5c, e.g. from
    git show e9a7d5c:src/greencode/decoding/generate.py > old_generate.py)
"""
import os, sys, time, torch, importlib.util
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
torch.set_num_threads(2)
from greencode.models import EarlyExitModel
from greencode.rl.policy import load_policy
from greencode.decoding import NeverExit, PolicyExit, generate
root = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
model = EarlyExitModel.from_pretrained(root + "/finetuned", device=torch.device("cpu"), dtype=torch.float32)
pol = load_policy(root + "/agent/policy.pt", model)
if len(sys.argv) < 3:
    sys.exit("usage: pc.py RUN_DIR OLD_GENERATE (see the docstring)")
spec = importlib.util.spec_from_file_location("oldgen", sys.argv[2])
old = importlib.util.module_from_spec(spec); sys.modules["oldgen"] = old; spec.loader.exec_module(old)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 8000, (1, 200), generator=g) for _ in range(4)]
pc = PolicyExit(pol, 0.5, 1.0, observation=getattr(pol, "observation", "normed"), ignore_decision=True)
res = {}
for rep in range(4):
    for name, fn in (("old", old.generate), ("new", generate)):
        for cn, c in (("never", NeverExit()), ("policy", pc)):
            t = time.perf_counter()
            for p in prompts:
                fn(model, p, c, 32)
            res.setdefault((name, cn), []).append(time.perf_counter() - t)
import statistics
for k, v in res.items(): print(k, f"{statistics.median(v)*1000/128:.3f} ms/token")
