"""Choose knobs on the validation split (never the test split): the agent's softmax temperature, or
(--grids) every calibrated controller's candidate grid, spread to span compute 0.5-0.95.

For each candidate temperature, the full model and GC at every eval.gc_thresholds run on
validation samples (accuracy only); the temperature with the widest spread of compute ratios
across the thresholds wins (the threshold is then a usable knob). Writes
results/<name>/tune/knobs.json and knobs.md; set decoding.policy_temperature from it.

    python scripts/tune_knobs.py --config configs/default.yaml --temperatures 1 2 3 5
    python scripts/tune_knobs.py --config configs/default.yaml --grids [--samples 300]

--grids: one teacher-forced pass per tuning-slice sample (the first calibration.sample_offset validation
samples; calibration starts after them) measures each family of calibration.families at a dense grid (token
risk and compute ratio); for each compute level 0.5, 0.6, 0.7, 0.8, 0.9, 0.95 the nearest candidate is chosen
(greencode.eval.grids). Writes results/<name>/tune/grids.{json,md}, with the YAML lines for the calibration
section and each candidate's token risk against the fixed exits' hull.
A request for the test split (eval.split=test) is refused: only the final evaluation reads it.
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.eval.grids import tune_grids
from greencode.eval.tuning import refuse_test_split, tune_policy_temperature


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--samples", type=int, default=None,
                        help="validation samples (temperatures: 150; --grids: the whole tuning slice)")
    parser.add_argument("--grids", action="store_true", help="choose the calibration grids instead of the temperature")
    args = parser.parse_args()
    if any(o.replace(" ", "") == "eval.split=test" for o in args.overrides):
        refuse_test_split("test", "scripts/tune_knobs.py")
    cfg = load_from_args(args)
    if args.grids:
        out = tune_grids(cfg, num_samples=args.samples)
        print((out / "grids.md").read_text(encoding="utf-8"))
        return
    out = tune_policy_temperature(cfg, args.temperatures, num_samples=args.samples or 150)
    print((out / "knobs.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    raise SystemExit(main())
