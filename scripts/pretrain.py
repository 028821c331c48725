"""Pretrain the embedded default's base model from scratch (standard causal-LM loss, HF Trainer).

Builds (or reuses) the corpus and tokenizer, trains the configured small Llama/OPT model on
packed seq_len chunks and writes a normal HF model directory plus tokenizer to
runs/<name>/base_model (loss CSV and summary in results/<name>/pretrain). Only for configs
with model.base: null; the paper configs start from pretrained weights.

Tiny CPU run (seconds):
    python scripts/pretrain.py --config configs/smoke.yaml
Embedded default (a few minutes on 2 CPU cores):
    python scripts/pretrain.py --config configs/default.yaml
Continue an interrupted run / redo a finished one:
    python scripts/pretrain.py --config configs/default.yaml --resume
    python scripts/pretrain.py --config configs/default.yaml --force
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.training.common import read_stage
from greencode.training.pretraining import pretrain


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    parser.add_argument("--force", action="store_true", help="retrain even when the stored base model is up to date")
    args = parser.parse_args()
    cfg = load_from_args(args)
    out = pretrain(cfg, resume=args.resume, force=args.force)
    s = (read_stage(out) or {}).get("summary", {})
    if s:
        print(f"base model: {s['family']} {s['num_layers']} layers, {s['num_parameters'] / 1e6:.2f}M parameters | "
              f"{s['steps']} steps, {s['train_tokens']} tokens in {s['train_runtime_s']:.1f} s "
              f"({s['train_tokens_per_s']:.0f} tokens/s) | eval loss {s['eval_loss']:.4f} "
              f"(perplexity {s['eval_perplexity']:.1f}) -> {out}")


if __name__ == "__main__":
    raise SystemExit(main())
