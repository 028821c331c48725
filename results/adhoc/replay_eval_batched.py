"""Replays methods of the committed demo evaluation (results/default/eval/methods/*.json) on the first N
test samples, decoded B prompts at a time with one shared controller per method (per-row copies, decided
together: DecodeBatch's decide_rows), as the evaluator's accuracy-only units are: tokens and exit layers must
equal the committed records (a row's tokens must not depend on its batch).

Ad-hoc check kept with its result in results/LOG.md. Run from the repo root with the demo run in runs/default:
    .venv/bin/python results/adhoc/replay_eval_batched.py N B
"""
import json
import sys

from greencode.config import load_config
from greencode.decoding import (CheapConfidenceExit, FixedExit, NeverExit, OracleExit, PolicyExit, SaturationExit,
                                generate)
from greencode.eval.runner import load_inputs, load_samples, prompt_of
from greencode.paths import RunPaths
from greencode.utils import setup_torch

cfg = load_config("configs/default.yaml")
device, dtype = setup_torch(cfg.hardware)
inputs = load_inputs(cfg, RunPaths.from_config(cfg), device, dtype, need_base=False, need_policy=True)
samples = load_samples(cfg, inputs.tokenizer)
model = inputs.model
N = int(sys.argv[1]) if len(sys.argv) > 1 else 16
B = int(sys.argv[2]) if len(sys.argv) > 2 else 4
t = cfg.decoding.policy_temperature
ctrls = {"full": lambda: NeverExit(), "fixed@5": lambda: FixedExit(5), "oracle": lambda: OracleExit(),
         "gc@0.3": lambda: PolicyExit.of(inputs.policy, 0.3, t), "gc@0.995": lambda: PolicyExit.of(inputs.policy, 0.995, t),
         "classifier@0.5": lambda: PolicyExit.of(inputs.classifier, 0.5, name="classifier"),
         "cheap_confidence@0.5": lambda: CheapConfidenceExit(0.5), "cheap_confidence@0.8": lambda: CheapConfidenceExit(0.8),
         "saturation@0.99": lambda: SaturationExit(0.99)}
prompts = [prompt_of(samples[i], model.hf.config.max_position_embeddings, cfg.eval.max_new_tokens) for i in range(N)]
bad = total = 0
for name, make in ctrls.items():
    by_index = {r["index"]: r for r in json.load(open(f"results/default/eval/methods/{name}.json"))["records"]}
    for s in range(0, N, B):
        chunk = prompts[s:s + B]
        res = generate(model, chunk, make(), cfg.eval.max_new_tokens, eos_token_id=inputs.tokenizer.eos_token_id,
                       kv_strategy=cfg.decoding.kv_strategy)
        for k, r in enumerate(res):
            rec = by_index[s + k]
            same = r.tokens == rec["tokens"] and (rec["exit_layers"] is None or list(r.exit_layers) == rec["exit_layers"])
            total += 1
            bad += not same
            if not same:
                print("DIFF", name, s + k, r.tokens[:8], rec["tokens"][:8], flush=True)
print(f"{total - bad}/{total} identical (N={N}, batches of {B})")
