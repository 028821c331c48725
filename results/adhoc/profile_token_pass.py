"""Time the calibration's teacher-forced pass (the token criterion) on N validation samples in one process of one
torch thread, with every calibration candidate: what calibrate() runs per sample, without the free-running part.
Run it from a checkout whose package should be timed (its .venv), pointing at a run directory:

    .venv/bin/python results/adhoc/profile_token_pass.py RUN_DIR N [--profile]

Prints seconds per sample and, with --profile, the cProfile top 25 by cumulative time."""

import cProfile
import hashlib
import dataclasses
import json
import pstats
import sys
import time

import torch

from greencode.config import load_config
from greencode.eval.calibration import candidate_specs
from greencode.eval.forced import _forced_pass, _specs
from greencode.eval.methods import needs
from greencode.eval.runner import load_inputs, load_samples, prompt_of
from greencode.paths import RunPaths
from greencode.utils import setup_torch


def main(run_dir: str, n: int, profile: bool) -> None:
    cfg = load_config("configs/default.yaml", [f"run_dir={run_dir}"])
    cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, num_threads=1))
    device, dtype = setup_torch(cfg.hardware)
    c = cfg.calibration
    paths = RunPaths.from_config(cfg)
    sub = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, split="validation", num_samples=c.sample_offset + n,
                                                            sample_offset=0))
    inputs = load_inputs(sub, paths, device, dtype, need_base=False, need_policy=True)
    specs_by = candidate_specs(cfg, inputs.model.exit_layers)
    ids = [s.id for fam in specs_by.values() for s in fam]
    specs = [s for s in _specs(ids) if all(getattr(inputs, k) is not None for k in needs(s.family))]
    samples = load_samples(sub, inputs.tokenizer)
    limit = getattr(inputs.model.hf.config, "max_position_embeddings", None)
    idx = list(range(c.sample_offset, c.sample_offset + n))
    prompts = {i: prompt_of(samples[i], limit, cfg.eval.max_new_tokens) for i in idx}
    from greencode.decoding import NeverExit, generate

    forced = {}
    with torch.inference_mode():
        for i in idx:
            forced[i] = generate(inputs.model, [prompts[i]], [NeverExit()], cfg.eval.max_new_tokens,
                                 eos_token_id=inputs.tokenizer.eos_token_id)[0].tokens
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    out = _forced_pass(inputs, sub, specs, prompts, forced, idx, True)
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    print(json.dumps({"samples": n, "methods": len(specs), "seconds": round(dt, 2), "s_per_sample": round(dt / n, 3),
                      "torch_threads": torch.get_num_threads()}))
    # a digest of every method's per-sample disagreement and compute, to compare two checkouts' results
    blob = json.dumps({k: out[k] for k in ("methods", "compute", "oracle")}, sort_keys=True).encode()
    print("digest", hashlib.sha256(blob).hexdigest()[:16])
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--profile" in sys.argv)
