"""Replays methods of the committed demo evaluation (results/default/eval/methods/*.json) on the
first N test samples with the current decoding loop: tokens and exit layers must be identical
(the decoding refactors must leave the demo's accuracy and compute figures bitwise unchanged).

Ad-hoc check kept with its result in results/LOG.md. Run from the repo root with the demo run in runs/default:
    .venv/bin/python results/adhoc/replay_eval.py N
"""
import json, sys, torch
from greencode.config import load_config
from greencode.eval.evaluator import load_inputs, expand_methods
from greencode.paths import RunPaths
from greencode.utils import setup_torch
from greencode.eval.evaluator import load_samples
from greencode.decoding import generate, NeverExit, FixedExit, PolicyExit, OracleExit, SaturationExit, ConfidenceExit
cfg = load_config("configs/default.yaml")
device, dtype = setup_torch(cfg.hardware)
inputs = load_inputs(cfg, RunPaths.from_config(cfg), device, dtype, need_base=False, need_policy=True)
samples = load_samples(cfg, inputs.tokenizer)
model = inputs.model
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
limit = model.hf.config.max_position_embeddings - cfg.eval.max_new_tokens
ctrls = {"full": NeverExit(), "fixed@1": FixedExit(1), "fixed@5": FixedExit(5), "oracle": OracleExit(),
         "gc@0.9": PolicyExit.of(inputs.policy, 0.9, cfg.decoding.policy_temperature),
         "confidence@0.9": ConfidenceExit(0.9),
         "saturation@0.99": SaturationExit(0.99), "classifier@0.5": PolicyExit.of(inputs.classifier, 0.5, name="classifier")}
bad = 0; total = 0
for name, c in ctrls.items():
    recs = json.load(open(f"results/default/eval/methods/{name}.json"))["records"]
    by_index = {r["index"]: r for r in recs}
    for i in range(N):
        from greencode.eval.evaluator import _prompt_of; ids = _prompt_of(samples[i], model.hf.config.max_position_embeddings, cfg.eval.max_new_tokens)
        res = generate(model, ids, c, cfg.eval.max_new_tokens, eos_token_id=inputs.tokenizer.eos_token_id, kv_strategy=cfg.decoding.kv_strategy)
        r = by_index[i]
        same = res.tokens == r["tokens"] and (r["exit_layers"] is None or list(res.exit_layers) == r["exit_layers"])
        total += 1; bad += not same
        if not same: print("DIFF", name, i, res.tokens[:8], r["tokens"][:8])
print(f"{total - bad}/{total} identical")
