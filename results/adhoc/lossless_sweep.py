"""Lossless drafting knobs on validation samples: policy threshold T x k_max for gc_lossless (verification reusing
the draft's exact lower layers), the supervised exit classifier as the drafter, verify=reuse vs full, and
LayerSkip-style static drafts, against the full loop
('Lossless drafting knobs on validation', results/LOG.md). The output is the full model's whatever the knob, so
only speed is chosen here, and only on the validation split.

Ad-hoc measurement kept with its numbers in results/LOG.md. Run from the repo root on a quiet machine:
    .venv/bin/python results/adhoc/lossless_sweep.py RUN_DIR [OUT_JSON [METHODS]]   (RUN_DIR: a trained default run;
    METHODS: a comma list of the names below, to time only those against the full loop)
"""
import json, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import torch
torch.set_num_threads(2)
from greencode.config import load_config
from greencode.decoding import FixedExit, NeverExit, PolicyExit, generate, generate_lossless
from greencode.eval.evaluator import load_samples, _prompt_of
from greencode.models import EarlyExitModel
from greencode.rl.policy import load_policy
from greencode.runinfo import run_metadata
from transformers import AutoTokenizer

root = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else None
cfg = load_config("configs/default.yaml", [f"run_dir={root}", "eval.split=validation",
                                           "eval.num_samples=40"])
model = EarlyExitModel.from_pretrained(root + "/finetuned", device=torch.device("cpu"), dtype=torch.float32)
pol = load_policy(root + "/agent/policy.pt", model)
tok = AutoTokenizer.from_pretrained(root + "/finetuned")
samples = load_samples(cfg, tok)
new = cfg.eval.max_new_tokens
prompts = [_prompt_of(s, model.hf.config.max_position_embeddings, new) for s in samples]
obs = getattr(pol, "observation", "normed")
methods = {"full": None}
for k in (2, 4, 8):
    for t in (0.05, 0.1, 0.2, 0.3, 0.5):
        methods[f"gc_lossless@{t}:k{k}"] = (lambda t=t: PolicyExit(pol, t, 1.0, observation=obs), k, "reuse")
# the supervised exit classifier (trained on the bank to predict whether an exit's prediction equals the final
# layer's: for greedy drafting, whether the draft is accepted) as the drafter
clf = load_policy(root + "/agent/classifier.pt", model) if Path(root + "/agent/classifier.pt").is_file() else None
for t in (0.3, 0.5, 0.7, 0.9):
    if clf is not None:
        methods[f"classifier_lossless@{t}:k4"] = (lambda t=t: PolicyExit(clf, t, 1.0, observation=getattr(
            clf, "observation", "normed"), name="classifier"), 4, "reuse")
methods["gc_lossless@0.5:k4:verify-full"] = (lambda: PolicyExit(pol, 0.5, 1.0, observation=obs), 4, "full")
methods["layerskip@5:k2"] = (lambda: FixedExit(5), 2, "reuse")
methods["layerskip@5:k2:verify-full"] = (lambda: FixedExit(5), 2, "full")
if len(sys.argv) > 3:  # only these methods (comma list), with the full loop
    keep = set(sys.argv[3].split(",")) | {"full"}
    methods = {m: v for m, v in methods.items() if m in keep}
full_tokens = {}
times = {m: [] for m in methods}
stats = {m: {"drafted": 0, "accepted": 0, "rounds": 0, "layers_run": 0} for m in methods}
names = list(methods)
for rep in range(3):  # round 0 is a warm-up
    for i, p in enumerate(prompts):
        order = names[(i + rep) % len(names):] + names[:(i + rep) % len(names)]
        for m in order:
            t0 = time.perf_counter()
            if methods[m] is None:
                res = generate(model, p, NeverExit(), new)
                full_tokens[i] = res.tokens
            else:
                make, k, verify = methods[m]
                res = generate_lossless(model, p, make(), new, k_max=k, verify=verify)
            wall = time.perf_counter() - t0
            if i in full_tokens and res.tokens != full_tokens[i][:len(res.tokens)]:
                raise SystemExit(f"{m} differs from the full model on sample {i}")
            if rep:
                times[m].append(wall)
                if methods[m] is not None:
                    for key in stats[m]:
                        stats[m][key] += res.counters[key]
full = times["full"]
rows = {}
for m in names:
    ratio = statistics.median(f / x for f, x in zip(full, times[m]))  # paired per (sample, round): speed vs full
    s = stats[m]
    rows[m] = {"total_s": sum(times[m]), "speed_vs_full_paired_median": ratio, "speed_vs_full_total": sum(full) / sum(times[m]),
               "acceptance": s["accepted"] / s["drafted"] if s["drafted"] else None,
               "mean_draft": s["drafted"] / s["rounds"] if s["rounds"] else None, "layers_run": s["layers_run"]}
    print(f"{m:34s} total {sum(times[m]):6.2f}s  speed x{rows[m]['speed_vs_full_total']:.3f} (paired median "
          f"x{ratio:.3f})  accepted {rows[m]['acceptance'] or 0:.2f}  draft {rows[m]['mean_draft'] or 0:.2f}", flush=True)
if out:
    Path(out).write_text(json.dumps({"rows": rows, "samples": len(prompts), "split": "validation", "max_new_tokens": new,
                                     "rounds_timed": 2, "run_dir": root,
                                     "run_metadata": run_metadata(cfg, stage="adhoc-lossless-sweep")}, indent=2) + "\n")
