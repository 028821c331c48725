"""Choose the agent's softmax temperature on the validation split (never the test split).

For each candidate temperature, the full model and GC at every eval.gc_thresholds run on
validation samples (accuracy only); the temperature with the widest spread of compute ratios
across the thresholds wins (the threshold is then a usable knob). Writes
results/<name>/tune/knobs.json and knobs.md; set decoding.policy_temperature from it.

    python scripts/tune_knobs.py --config configs/default.yaml --temperatures 1 2 3 5
A request for the test split (eval.split=test) is refused: only the final evaluation reads it.
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.eval.tuning import refuse_test_split, tune_policy_temperature


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--samples", type=int, default=150, help="validation samples per temperature")
    args = parser.parse_args()
    if any(o.replace(" ", "") == "eval.split=test" for o in args.overrides):
        refuse_test_split("test", "scripts/tune_knobs.py")
    cfg = load_from_args(args)
    out = tune_policy_temperature(cfg, args.temperatures, num_samples=args.samples)
    print((out / "knobs.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    raise SystemExit(main())
