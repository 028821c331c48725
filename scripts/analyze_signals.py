"""Decision quality of exit signals, measured directly: on held-out validation files (never test), a
teacher-forced pass of the early-exit model; per early exit point, each signal's AUC against the oracle
label (the exit's token == the final layer's) and its precision at matched recall, with each signal's
cost in MACs and decoder-layer equivalents (greencode.eval.signal_quality, greencode.decoding.signals).
Writes results/<name>/signals/auc.{json,md} and figures/<name>/signals_auc.{png,pdf}.

The model: --model DIR, else runs/<name>/finetuned when it exists, else the run's base (model.base,
e.g. the shipped assets/default-base); the result says which. Only the run's own fine-tuned model writes to
results/<name>/signals and figures/<name>; the base's and a --model's go to signals/base and signals/given below
them (unless --out-dir / --figures-dir say otherwise), so they never replace the run's result.

Embedded default (about 10 minutes on 2 busy cores; 150 validation files, 512-token windows):
    python scripts/analyze_signals.py --config configs/default.yaml

Tiny CPU run (seconds; needs the smoke corpus and any model of its tokenizer, e.g. after make smoke):
    python scripts/analyze_signals.py --config configs/smoke.yaml --files 12 --window 64 --bigram-tokens 20000
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.paths import RunPaths


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--model", default=None, help="model directory (default: the run's finetuned, else its base)")
    parser.add_argument("--files", type=int, default=150, help="validation files (one window each)")
    parser.add_argument("--window", type=int, default=512, help="tokens per file window (the context the model serves)")
    parser.add_argument("--min-tokens", type=int, default=64, help="skip validation files shorter than this")
    parser.add_argument("-k", "--candidates", type=int, default=4, help="candidate tokens per check (2..10)")
    parser.add_argument("--sources", default="first_full,low_rank,prev_token,bigram,context",
                        help="comma-separated candidate sources: first_full, low_rank[:R[:M]], prev_token, bigram, "
                             "context")
    parser.add_argument("--out-dir", default=None, help="where auc.json/md go (default: results/<name>/signals)")
    parser.add_argument("--figures-dir", default=None, help="where the figure goes (default: figures/<name>)")
    parser.add_argument("--train-fraction", type=float, default=0.5,
                        help="share of the files the logistic regressions are trained on (file-disjoint)")
    parser.add_argument("--small-tokens", type=int, default=4000, help="tokens of the small (bank-sized) training set")
    parser.add_argument("--bigram-tokens", type=int, default=2_000_000, help="train-split tokens the bigram table counts")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--resamples", type=int, default=200,
                        help="bootstrap resamples over test files for the AUCs' 95%% intervals")
    args = parser.parse_args()
    cfg = load_from_args(args)
    from greencode.eval.signal_quality import analyze_signals, kind_folder

    report = analyze_signals(cfg, model_dir=args.model, n_files=args.files, window=args.window,
                             min_tokens=args.min_tokens, k=args.candidates,
                             sources=[s.strip() for s in args.sources.split(",") if s.strip()],
                             train_fraction=args.train_fraction, small_tokens=args.small_tokens,
                             bigram_tokens=args.bigram_tokens, batch_size=args.batch_size,
                             resamples=args.resamples, out_dir=args.out_dir)
    from greencode.plots.signals import plot_signals_auc

    figures = RunPaths.from_config(cfg).figures
    sub = kind_folder(report["model_kind"])  # another model's figure goes beside, as its results do
    plot_signals_auc(report, args.figures_dir or (figures if sub is None else figures / "signals" / sub))
    print(f"model {report['model_dir']} ({report['model_kind']}); {report['tokens']['test']:,} test tokens, "
          f"exit points {report['exit_layers']}")
    w = max(len(n) for n in report["signals"])
    print(f"{'signal':<{w}}  mean AUC  pooled  P@R=0.8  layers/token")
    for name, s in report["signals"].items():
        p8 = (s["precision_pooled"].get("recall_0.8") or {}).get("precision")
        print(f"{name:<{w}}  {s['auc_mean'] if s['auc_mean'] is not None else float('nan'):8.3f}  "
              f"{s['auc_pooled'] if s['auc_pooled'] is not None else float('nan'):6.3f}  "
              f"{p8 if p8 is not None else float('nan'):7.3f}  {s['cost']['layers_per_token_all_checks']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
