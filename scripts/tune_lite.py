"""Tune the LITE recipe on the validation split: each variant (a set of dotted overrides of
the finetune section) is fine-tuned from the config's base model and measured by the per-exit
report (held-out next-token accuracy per exit point, base vs LITE, on validation tokens).

    python scripts/tune_lite.py --config configs/default.yaml \\
        --variant "finetune.learning_rate=1e-4" \\
        --variant "finetune.learning_rate=3e-4 finetune.budgets=[0.45,0.2,0.35]"

--keep keeps the earlier variants of results/<name>/tune/lite.json in the table; --reuse takes a
variant's finished run (results/<name>/tune/lite-<k>/) when its recorded finetune section equals
the variant's, instead of training it again.

Each variant runs in runs/<name>-lite/<k>/ (sharing the run's corpus and tokenizer) and the
trade-off table goes to results/<name>/tune/lite.{json,md}: the final layer's accuracy
against the base's (the full model must be kept), and the first exit's gain over the base's
first exit (what LITE is for). The test split is never read.
"""

import shlex
import time
from pathlib import Path

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.config import load_config
from greencode.data import prepare_data
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.training import exit_report, finetune
from greencode.utils import read_json, write_json, write_text


def _first_and_final(report: dict, model: str) -> tuple[float, float]:
    per_exit = report["models"][model]["per_exit"]
    return per_exit[0]["accuracy"], per_exit[-1]["accuracy"]


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--variant", action="append", required=True,
                        help="space-separated dotted overrides of one variant (repeat for each variant)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the earlier variants of results/<name>/tune/lite.json in the table")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a variant's finished run (results/<name>/tune/lite-<k>/finetune) when its "
                             "recorded finetune section equals the variant's; train the others")
    args = parser.parse_args()
    cfg = load_from_args(args)
    prepare_data(cfg)
    paths = RunPaths.from_config(cfg)
    rows = []
    for k, variant in enumerate(args.variant):
        run_dir = paths.variant_run("lite", k, ("corpus", "tokenizer"))
        over = list(args.overrides) + shlex.split(variant) + [f"run_dir={run_dir}",
                                                              f"results_dir={paths.results / 'tune' / f'lite-{k}'}"]
        if cfg.model.base is None:  # the embedded default pretrained in this run: start every variant from it
            over.append(f"model.base={paths.base_model}")
        vcfg = load_config(args.config, over)
        done = Path(vcfg.results_dir) / "finetune"
        rep = None
        if args.reuse and (done / "exit_report.json").is_file() and (done / "summary.json").is_file():
            old = read_json(done / "exit_report.json")
            if old["meta"]["config"]["finetune"] == vcfg.section_dict("finetune")["finetune"]:
                rep, finetune_seconds = old, read_json(done / "summary.json").get("train_runtime_s")
                print(f"variant {k}: reusing the finished run in {done}")
        if rep is None:
            started = time.perf_counter()
            finetune(vcfg)
            finetune_seconds = time.perf_counter() - started
            rep = exit_report(vcfg)
        b_first, b_final = _first_and_final(rep, "base")
        f_first, f_final = _first_and_final(rep, "finetuned")
        rows.append({"variant": variant, "finetune": vcfg.section_dict("finetune")["finetune"],
                     "base_first_exit_accuracy": b_first, "base_final_accuracy": b_final,
                     "lite_first_exit_accuracy": f_first, "lite_final_accuracy": f_final,
                     "final_change_points": 100 * (f_final - b_final),
                     "first_exit_gain_points": 100 * (f_first - b_first),
                     "first_exit_share_of_final": f_first / f_final if f_final else None,
                     "keeps_full_model": f_final >= b_final - 0.01, "first_exit_gains_3_points": f_first >= b_first + 0.03,
                     "per_exit": rep["models"]["finetuned"]["per_exit"], "tokens": rep["tokens"],
                     "finetune_seconds": finetune_seconds})
    out = paths.results / "tune"
    if args.keep and (out / "lite.json").exists():  # earlier variants stay in the table unless rerun now
        import json
        earlier = json.loads((out / "lite.json").read_text())["rows"]
        rerun = {r["variant"] for r in rows}
        rows = [r for r in earlier if r["variant"] not in rerun] + rows
    meta = run_metadata(cfg, stage="tune_lite")
    meta.pop("config", None)
    write_json(out / "lite.json", {"split": "validation", "rows": rows, "run": meta,
                                   "criteria": "final layer at most 1 point below the base's; first exit at least "
                                               "3 points above the base's first exit"})
    lines = ["# LITE recipe on the validation split", "",
             f"Held-out next-token accuracy on {rows[0]['tokens'] if rows else 0} validation tokens. Base model: "
             f"first exit {rows[0]['base_first_exit_accuracy']:.3f}, final {rows[0]['base_final_accuracy']:.3f}."
             if rows else "", "",
             "| variant | final (Δ pts vs base) | first exit (Δ pts vs base) | first / final | keeps full | +3 pts |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['lite_final_accuracy']:.3f} ({r['final_change_points']:+.2f}) | "
                     f"{r['lite_first_exit_accuracy']:.3f} ({r['first_exit_gain_points']:+.2f}) | "
                     f"{r['first_exit_share_of_final']:.3f} | {'yes' if r['keeps_full_model'] else 'no'} | "
                     f"{'yes' if r['first_exit_gains_3_points'] else 'no'} |")
    write_text(out / "lite.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
