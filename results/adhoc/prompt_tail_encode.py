"""A/B of the endpoint's prompt encoding (greencode.serve.engine.Engine.encode) for raw-format prompts of 2-64 KB:
before = only prompts over max(8192, 32 x budget) characters tokenized from a tail (TAIL_CHARS_PER_TOKEN = 32
reproduces it), after = a tail of 6 characters per kept token tried first. Median ms per encode over 4 standard-library
files x 15 repeats, and whether the ids are identical. Usage:
    python results/adhoc/prompt_tail_encode.py --config configs/default.yaml --run-dir runs/default
Writes results/adhoc/prompt_tail_encode.json."""

import argparse
import sysconfig
import time

import greencode.serve.engine as E
from greencode.config import load_config
from greencode.provenance import weights_record
from greencode.runinfo import run_metadata
from greencode.utils import write_json

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--run-dir", default="runs/default")
args = ap.parse_args()
cfg = load_config(args.config, [f"run_dir={args.run_dir}"])
r = E.load_run(cfg, args.run_dir)
eng = E.Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding, literal_mode="source")
assert eng.prompt_format == "raw"
files = ["argparse.py", "typing.py", "inspect.py", "subprocess.py"]
texts = [open(sysconfig.get_paths()["stdlib"] + "/" + f, encoding="utf-8").read() for f in files]


def ids_at(cpt, p):
    E.TAIL_CHARS_PER_TOKEN = cpt
    return eng.encode(p, 16)[0]


rows = {}
for n in (2000, 4000, 8000, 16000, 64000):
    row = {}
    for label, cpt in (("before_ms", 32), ("after_ms", 6)):
        E.TAIL_CHARS_PER_TOKEN = cpt
        ts = []
        for _ in range(15):
            for t in texts:
                t0 = time.perf_counter()
                eng.encode(t[:n], 16)
                ts.append(time.perf_counter() - t0)
        ts.sort()
        row[label] = round(ts[len(ts) // 2] * 1e3, 3)
    row["same_ids"] = all(ids_at(6, t[:n]) == ids_at(32, t[:n]) for t in texts)
    rows[str(n)] = row
    print(n, row, flush=True)
E.TAIL_CHARS_PER_TOKEN = 6
write_json("results/adhoc/prompt_tail_encode.json", {
    "what": __doc__.split("Usage")[0].strip(), "max_new_tokens": 16, "files": files, "prompt_chars": rows,
    "meta": run_metadata(cfg, stage="adhoc_prompt_tail_encode", weights=weights_record(r.model))})
