"""LITE fine-tuning: weighted sum of next-token losses at every exit point, decoded through
the model's own final norm and LM head; then the per-exit quality report (base vs LITE).

Starts from model.base (HF directory or hub id) or, for the embedded default, from
runs/<name>/base_model (scripts/pretrain.py). Writes runs/<name>/finetuned (HF model +
tokenizer + greencode_exits.json), and results/<name>/finetune/{train_log.csv,summary.json,
exit_report.json,exit_report.csv}. TensorBoard: runs/<name>/finetuned/trainer/tensorboard.

Tiny CPU run (seconds, after scripts/pretrain.py):
    python scripts/finetune.py --config configs/smoke.yaml
Continue an interrupted run / redo a finished one:
    python scripts/finetune.py --config configs/smoke.yaml --resume
    python scripts/finetune.py --config configs/smoke.yaml --force
Several GPUs (one node):
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 \
        scripts/finetune.py --config configs/paper/llama-3.2-3b_java.yaml
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.training.common import read_stage
from greencode.training.finetuning import finetune
from greencode.training.report import exit_report, format_report


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    parser.add_argument("--force", action="store_true", help="retrain even when the stored model is up to date")
    parser.add_argument("--no-report", action="store_true", help="skip the per-exit quality report")
    args = parser.parse_args()
    cfg = load_from_args(args)
    out = finetune(cfg, resume=args.resume, force=args.force)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    s = (read_stage(out) or {}).get("summary", {})
    if s:
        print(f"LITE fine-tuned: exit points {s['exit_points']} (0-based, final {s['final_layer']}) | {s['steps']} steps, "
              f"{s['train_tokens']} tokens in {s['train_runtime_s']:.1f} s ({s['train_tokens_per_s']:.0f} tokens/s) | "
              f"eval LITE loss {s['eval_loss']:.4f} -> {out}")
    if not args.no_report:
        report = exit_report(cfg)
        print(f"per-exit next-token accuracy on {report['tokens']} held-out tokens (share = of the final layer's):")
        print(format_report(report))


if __name__ == "__main__":
    raise SystemExit(main())
