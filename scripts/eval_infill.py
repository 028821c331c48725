"""Single-line infilling on the evaluation split: a held-out line of each file given the code
before and after it, in the model's fill-in-the-middle layout, for the full model with and
without the suffix, every fixed exit, GC at eval.gc_thresholds and the oracle ->
results/<name>/infill/{infill.json, infill.md, records.json} (exact match and edit similarity
with 95% paired bootstrap CIs, layers skipped, compute ratio). Also the pipeline's ``infill``
stage when eval.infill_samples > 0. Needs a model trained with FIM (tokenizer.fim_tokens and
pretrain.fim) on source text (data.literal_mode=source); other models get a file saying so.

    python scripts/eval_infill.py --config configs/default.yaml
    python scripts/eval_infill.py --config configs/default.yaml eval.infill_samples=100
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.config import ConfigError


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args()
    cfg = load_from_args(args)
    if cfg.eval.infill_samples < 1:
        raise ConfigError("eval.infill_samples is 0 (off); give how many samples to infill, e.g. eval.infill_samples=400")
    from greencode.data import prepare_data
    from greencode.eval.infill import evaluate_infill
    from greencode.eval.runner import require_finetuned

    require_finetuned(cfg)  # before the corpus, which takes minutes to build
    prepare_data(cfg)  # the corpus of the run (reused when up to date)
    out = evaluate_infill(cfg)
    md = out / "infill.md"
    print(md.read_text() if md.is_file() else (out / "infill.json").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
