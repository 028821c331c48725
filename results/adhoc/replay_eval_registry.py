"""Replays committed evaluation rows (results/default/eval/methods/*.json) of the learned controllers on the
first 16 test samples, 4 prompts per batch (or the batch size given as the first argument), with controllers
built by the evaluator's Runner (so with the run's candidate source): tokens and exit layers must equal the committed records (used to check a refactor).

Ad-hoc check kept with its result in results/LOG.md (2026-12-07 review: 80/80 identical; the host check path of
2026-12-07 10:20: 80/80 at batch 4 and at batch 1). Run from the repo root:
    .venv/bin/python results/adhoc/replay_eval_registry.py [batch size]
"""
import json
import sys
from greencode.config import load_config
from greencode.decoding import generate
from greencode.eval.methods import MethodSpec, parse_method_name
from greencode.eval.runner import Runner, load_inputs, load_samples, prompt_of
from greencode.paths import RunPaths
from greencode.utils import setup_torch
cfg = load_config("configs/default.yaml")
device, dtype = setup_torch(cfg.hardware)
inputs = load_inputs(cfg, RunPaths.from_config(cfg), device, dtype, need_base=False, need_policy=True)
samples = load_samples(cfg, inputs.tokenizer)
model = inputs.model
runner = Runner(inputs, cfg, None, inputs.tokenizer.eos_token_id, inputs.tokenizer.pad_token_id)
N, B = 16, int(sys.argv[1]) if len(sys.argv) > 1 else 4
prompts = [prompt_of(samples[i], model.hf.config.max_position_embeddings, cfg.eval.max_new_tokens) for i in range(N)]
bad = total = 0
for name in ["gc@0.9", "gc@0.01", "classifier@0.95", "cheap_confidence@0.8", "cheap_confidence@0.5"]:
    spec = MethodSpec(*parse_method_name(name))
    by = {r["index"]: r for r in json.load(open(f"results/default/eval/methods/{name}.json"))["records"]}
    for s in range(0, N, B):
        res = generate(model, prompts[s:s + B], runner.controller(spec), cfg.eval.max_new_tokens,
                       eos_token_id=inputs.tokenizer.eos_token_id, kv_strategy=cfg.decoding.kv_strategy)
        for k, r in enumerate(res):
            rec = by[s + k]; total += 1
            same = r.tokens == rec["tokens"] and list(r.exit_layers) == rec["exit_layers"]
            bad += not same
print(f"{total - bad}/{total} identical")
