"""The base-recipe ablation: the plain base (final layer's loss alone, configs/base_plain.yaml) and
the early-exit-ready base (configs/base.yaml, shipped as assets/default-base) on the same validation
tokens: per-layer accuracy, share of the final layer's and agreement with it, the final layer's
accuracy with its 95% CI, and each base's training cost -> results/<name>/ablations/base_recipes.{json,md}.

    python scripts/ablate_base.py --config configs/default.yaml \
        --base plain=runs/base_plain/base_model --base early_exit=assets/default-base

Fill in the middle's left-to-right cost (the same recipe with and without FIM):
    python scripts/ablate_base.py --config configs/default.yaml --out-name fim_cost \
        --base fim=runs/base/base_model --base no_fim=runs/base_nofim/base_model

Tiny CPU run:
    python scripts/ablate_base.py --config configs/smoke.yaml --base a=<dir> --base b=<dir>
"""


from greencode.cli import base_parser, friendly_errors, load_from_args, named_model_dirs


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--base", action="append", required=True, metavar="NAME=DIR",
                        help="a base model directory under a name (give two or more)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the CIs")
    parser.add_argument("--out-name", default="base_recipes",
                        help="file name (without extension) under results/<name>/ablations, e.g. fim_cost")
    args = parser.parse_args()
    cfg = load_from_args(args)
    bases = named_model_dirs(args.base, "--base", "plain=runs/base_plain/base_model")
    from greencode.training.report import compare_bases, render_bases

    report = compare_bases(cfg, bases, resamples=args.resamples, out_name=args.out_name)
    print(render_bases(report))


if __name__ == "__main__":
    raise SystemExit(main())
