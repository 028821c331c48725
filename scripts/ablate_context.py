"""Does more context help? The same target tokens (positions 384-511 of a validation file) predicted
with the file's first 512 tokens and with only the last 255 of them, per layer, for each model given,
with a paired 95% bootstrap CI over files -> results/<name>/ablations/context.{json,md}.

    python scripts/ablate_context.py --config configs/default.yaml \
        --model base=assets/default-base --model lite=runs/default/finetuned

Tiny CPU run (smoke corpus, short windows):
    python scripts/ablate_context.py --config configs/smoke.yaml --model a=<dir> \
        --window 48 --short 24 --target-from 32 --min-file-tokens 48
"""

from pathlib import Path

from greencode.cli import base_parser, friendly_errors, load_from_args, named_model_dirs


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a model directory under a name (repeatable)")
    parser.add_argument("--window", type=int, default=512, help="the long context (tokens from the file's start)")
    parser.add_argument("--short", type=int, default=255, help="the short context: the window's last SHORT tokens")
    parser.add_argument("--target-from", type=int, default=384, help="first target position (0-based)")
    parser.add_argument("--min-file-tokens", type=int, default=520)
    parser.add_argument("--max-files", type=int, default=60)
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the CIs")
    parser.add_argument("--out-name", default="context", help="file name under results/<name>/ablations")
    parser.add_argument("--out-dir", default=None,
                        help="write there instead of results/<name>/ablations (e.g. results/archive/<base>/ablations)")
    args = parser.parse_args()
    cfg = load_from_args(args)
    models = named_model_dirs(args.model, "--model", "base=assets/default-base")
    from greencode.training.context import context_effect, render_context

    report = context_effect(cfg, models, window=args.window, short=args.short, target_from=args.target_from,
                            min_file_tokens=args.min_file_tokens, max_files=args.max_files,
                            resamples=args.resamples, out_name=args.out_name,
                            out_dir=Path(args.out_dir) if args.out_dir else None)
    print(render_context(report))


if __name__ == "__main__":
    raise SystemExit(main())
