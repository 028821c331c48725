"""Ad-hoc: which FIM prompt order the embedded default fills in (the serve.fim_layout knob), chosen on the
VALIDATION split: 60 single-line infilling samples (greencode.eval.infill's sampling), the full model greedy until
a newline, prompts in SPM order, PSM order and left to right (same prefix tokens). Writes fim_layout_validation.json.

    python results/adhoc/fim_layout_validation.py
"""
import json

import torch
from transformers import AutoTokenizer

from greencode.config import load_config
from greencode.data.corpus import load_corpus, text_sep
from greencode.decoding import NeverExit, generate
from greencode.eval.infill import make_infill_samples, prediction_text
from greencode.eval.metrics import line_scores
from greencode.models import EarlyExitModel
from greencode.runinfo import run_metadata
from greencode.utils import REPO_ROOT, write_json

torch.set_num_threads(1)
cfg = load_config(REPO_ROOT / "configs" / "default.yaml")
tok = AutoTokenizer.from_pretrained(str(REPO_ROOT / "runs" / "default" / "finetuned"))
model = EarlyExitModel.from_pretrained(REPO_ROOT / "runs" / "default" / "finetuned").eval()
samples = make_infill_samples(load_corpus(cfg)["validation"], tok, num_samples=60, seed=0, max_context_tokens=512,
                              max_new_tokens=32, sep=text_sep(cfg))
scores = {"spm": [], "psm": [], "left_to_right": []}
for s in samples:
    prompts = {"spm": s.fim_ids, "psm": s.psm_ids, "left_to_right": s.l2r_ids}
    with torch.no_grad():
        out = generate(model, list(prompts.values()), [NeverExit()] * 3, 32, eos_token_id=tok.eos_token_id,
                       stop_strings=["\n"], tokenizer=tok)
    for k, r in zip(prompts, out):
        scores[k].append(line_scores(prediction_text(tok, r.tokens), s.reference))
result = {k: {"exact_match": sum(a for a, _ in v) / len(v), "edit_similarity": sum(b for _, b in v) / len(v),
              "samples": len(v)} for k, v in scores.items()}
write_json(REPO_ROOT / "results" / "adhoc" / "fim_layout_validation.json",
           {"split": "validation", "result": result, "run": run_metadata(cfg, stage="fim_layout_validation")})
print(json.dumps(result, indent=1))
