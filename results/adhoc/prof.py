"""Decode step time (ms) at context 100/900 and batch 1/8/32, never-exit, plus a torch profile of the last one
(LOG 2026-12-01 third session: 'Cache that grows in place').

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root:
    .venv/bin/python results/adhoc/prof.py RUN_DIR   (RUN_DIR: a trained default run, e.g. runs/default)
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
torch.set_num_threads(2)
from greencode.models import EarlyExitModel
from greencode.decoding import NeverExit, generate
root = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
model = EarlyExitModel.from_pretrained(root + "/finetuned", device=torch.device("cpu"), dtype=torch.float32)
g = torch.Generator().manual_seed(0)
for T in (100, 900):
    for B in (1, 8, 32):
        prompts = [torch.randint(3, 8000, (T,), generator=g).tolist() for _ in range(B)]
        generate(model, prompts if B > 1 else prompts[0], NeverExit(), 3)
        t = time.perf_counter()
        r = generate(model, prompts if B > 1 else prompts[0], NeverExit(), 17)
        rr = r if isinstance(r, list) else [r]
        c = rr[0].counters
        print(f"T={T} B={B}: prefill {c['prefill_time_s']*1e3:.0f} ms, step {c['decode_time_s']/16*1e3:.1f} ms", flush=True)
with torch.profiler.profile() as prof:
    generate(model, prompts, NeverExit(), 9)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
