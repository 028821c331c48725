"""torch.compile of each decoder layer vs eager, 32 tokens ('Tried for issue 15, not kept').

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root:
    .venv/bin/python results/adhoc/comp.py RUN_DIR   (RUN_DIR: a trained default run, e.g. runs/default)
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
torch.set_num_threads(2)
from greencode.models import EarlyExitModel
from greencode.decoding import NeverExit, FixedExit, generate
root = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
model = EarlyExitModel.from_pretrained(root + "/finetuned", device=torch.device("cpu"), dtype=torch.float32)
g = torch.Generator().manual_seed(0)
p = torch.randint(3, 8000, (1, 200), generator=g)
ref = generate(model, p, NeverExit(), 32)
t = time.perf_counter()
for _ in range(3): generate(model, p, NeverExit(), 32)
eager = (time.perf_counter() - t) / 3
layers = model.adapter.layers
orig = [l.forward for l in layers]
t = time.perf_counter()
for l in layers:
    l.forward = torch.compile(l.forward, dynamic=True)
r = generate(model, p, NeverExit(), 32)
print("compile+first", time.perf_counter() - t, "same", r.tokens == ref.tokens, flush=True)
t = time.perf_counter()
for _ in range(3): r = generate(model, p, NeverExit(), 32)
print("eager", eager, "compiled", (time.perf_counter() - t) / 3, "same", r.tokens == ref.tokens)
