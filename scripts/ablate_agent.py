"""Ablate the exit agent: retrain it under each variant (dotted overrides of the rl section),
calibrate it on the validation split, and evaluate it at the calibrated targets on the same
samples as the main run, next to the main run's agent.

    python scripts/ablate_agent.py --config configs/default.yaml \\
        --variant "rl.bank.behaviour=full" --variant "rl.reward.epsilon=1.0"

Each variant runs in runs/<name>-ablate/<k>/ (sharing the main run's corpus, tokenizer and
LITE model, which must exist: run the pipeline first) and writes results/<name>/ablations/<k>/
(bank manifest summary, rl analysis, calibration, evaluation). The table goes to
results/<name>/ablations/agent.{json,md}: GC at each target for the main run and every variant,
with compute ratio, token agreement [95% CI] and the disagreement reached. Thresholds are
chosen on the validation split only; nothing here is tuned on the test split.
"""

import dataclasses
import shlex
from pathlib import Path

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.config import load_config
from greencode.paths import RunPaths
from greencode.utils import read_json, run_metadata, write_json, write_text


def _gc_rows(calibrated: dict) -> list[dict]:
    return [r for r in calibrated["rows"] if r["family"] == "gc"]


def _row_text(label: str, r: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    if r.get("method") is None:
        return f"| {label} | {100 * r['target']:g}% | none certified | – | – | – |"
    ci = r.get("token_agreement_ci") or [None, None]
    return (f"| {label} | {100 * r['target']:g}% | `{r['method']}` | {f(r.get('compute_ratio'))} | "
            f"{f(r.get('token_agreement'))} [{f(ci[0])}, {f(ci[1])}] | "
            f"{f(r.get('calibration_disagreement'))} / {f(r.get('achieved_disagreement'))} |")


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--variant", action="append", required=True,
                        help="space-separated dotted overrides of one variant (repeat for each variant)")
    parser.add_argument("--keep-records", action="store_true",
                        help="keep every variant's per-sample method files (several MB each); by default only "
                             "the summaries, calibration and calibrated tables are kept")
    args = parser.parse_args()
    cfg = load_from_args(args)
    paths = RunPaths.from_config(cfg)
    main_table = paths.results_eval / "calibrated.json"
    if not (paths.finetuned / "config.json").is_file() or not main_table.is_file():
        raise FileNotFoundError(f"the main run is missing ({paths.finetuned} or {main_table}); run "
                                f"`python scripts/reproduce.py --config {args.config}` first")
    from greencode.eval import evaluate
    from greencode.eval.calibration import calibrate
    from greencode.rl import build_bank, train_agent

    out = paths.results / "ablations"
    variants = []
    for k, variant in enumerate(args.variant):
        run_dir = paths.variant_run("ablate", k, ("corpus", "tokenizer", "finetuned"))
        over = list(args.overrides) + shlex.split(variant) + [f"run_dir={run_dir}", f"results_dir={out / str(k)}",
                                                              f"figures_dir={out / str(k) / 'figures'}"]
        vcfg = load_config(args.config, over)
        vcfg = dataclasses.replace(vcfg, calibration=dataclasses.replace(vcfg.calibration, families=["gc"]),
                                   eval=dataclasses.replace(vcfg.eval, timing_samples=0, overhead_ab=False))
        bank = build_bank(vcfg)
        train_agent(vcfg, progress_bar=False, tensorboard=False)
        calibrate(vcfg)
        evaluate(vcfg, ["full", "calibrated"])
        table = read_json(out / str(k) / "eval" / "calibrated.json")
        if not args.keep_records:
            import shutil

            for d in (out / str(k) / "eval" / "methods", out / str(k) / "calibration" / "eval" / "methods"):
                shutil.rmtree(d, ignore_errors=True)
        manifest = read_json(Path(bank) / "manifest.json")
        variants.append({"variant": variant, "rows": _gc_rows(table),
                         "bank_behaviour": manifest.get("bank_config", {}).get("behaviour"),
                         "bank_early_exit_share": manifest.get("behaviour_early_exit_share")})
    base = {"variant": "(main run)", "rows": _gc_rows(read_json(main_table))}
    meta = run_metadata(cfg, stage="ablate_agent")
    meta.pop("config", None)
    write_json(out / "agent.json", {"split": cfg.eval.split, "main": base, "variants": variants, "run": meta})
    lines = ["# Exit-agent ablations at calibrated targets", "",
             f"GC only, thresholds calibrated on the validation split for each agent; {cfg.eval.split}-split samples "
             "shared with the main run (accuracy only, so no latency). Disagreement = 1 - token agreement with the "
             "full model.", "",
             "| agent | target | method | compute ratio | token agreement [95% CI] | disagreement calib. / test |",
             "|---|---|---|---|---|---|"]
    for v in [base] + variants:
        for r in v["rows"]:
            lines.append(_row_text(f"`{v['variant']}`", r))
    write_text(out / "agent.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
