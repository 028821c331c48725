"""Calibrate every exit controller's threshold for each fidelity target on the validation split.

For each controller (fixed, confidence, entropy, saturation, classifier, GC) and each target in
calibration.targets (the largest expected share of generated tokens allowed to differ from the
full model's), the threshold with the least compute that Learn-then-Test certifies at risk
calibration.delta. Writes results/<name>/calibration/calibration.json and calibration.md; the
evaluation's `calibrated` method then reports every controller at those thresholds.

Tiny CPU run (after the agent stage):
    python scripts/calibrate.py --config configs/smoke.yaml
A request for the test split (eval.split=test) is refused: only the final evaluation reads it.
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.eval.calibration import calibrate
from greencode.eval.tuning import refuse_test_split


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args()
    if any(o.replace(" ", "") == "eval.split=test" for o in args.overrides):
        refuse_test_split("test", "scripts/calibrate.py")
    cfg = load_from_args(args)
    path = calibrate(cfg)
    print((path.parent / "calibration.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    raise SystemExit(main())
