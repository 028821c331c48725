"""Ablate the exit agent: retrain it under each variant (dotted overrides of the rl section), judge every
agent on the same tuning-slice tokens, then calibrate it on the validation split and evaluate it at the
calibrated targets on the same samples as the main run, next to the main run's agent.

    python scripts/ablate_agent.py --config configs/default.yaml \\
        --variant "rl.reward.kind=paper" --variant "rl.observation_features=[]" --variant "rl.train_tokens=3900"

Each variant runs in runs/<name>-ablate/<k>/ (sharing the main run's corpus, tokenizer and LITE model, which
must exist: run the pipeline first). A variant that changes only what the agent learns from the bank (the
reward, PPO, the observation features when the main bank recorded them, ``rl.train_tokens``) trains on the
main run's bank (``TrajectoryBank.with_features`` / ``training_subset``), so the ablation isolates that
change; one that changes the bank builds its own.

**Decision quality on tuning tokens** (always): one bank of the tuning slice's validation files
(``rl.bank.split=tuning``: the files of the first ``calibration.sample_offset`` validation samples, never a
calibration file; the main config's bank settings and features, ``--tuning-tokens`` decided tokens, in
runs/<name>-ablate/tuning_bank). Every agent's and classifier's AUC against the oracle label per exit point,
with a bootstrap over files, and the paired difference from the main run's agent.

**Calibrated test-split table** (unless ``--tuning-only``): GC at each target for the main run and every
variant, with compute ratio, token agreement [95% CI] and the disagreement reached. Thresholds are chosen on
the validation split only; nothing here is tuned on the test split.

Writes results/<name>/ablations/<k>/ (rl analysis, calibration, evaluation) and
results/<name>/ablations/agent.{json,md}.
"""

import dataclasses
import shlex
import shutil
from pathlib import Path

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.config import load_config
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import read_json, write_json, write_text

# what a variant may change and still train on the main run's bank (the rest of rl.* and these must match)
BANK_SETTINGS = ("bank", "observation", "candidate_source", "candidate_k")


def _gc_rows(calibrated: dict) -> list[dict]:
    return [r for r in calibrated["rows"] if r["family"] == "gc"]


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def _row_text(label: str, r: dict) -> str:
    if r.get("method") is None:
        return f"| {label} | {100 * r['target']:g}% | none certified | – | – | – |"
    ci = r.get("token_agreement_ci") or [None, None]
    return (f"| {label} | {100 * r['target']:g}% | `{r['method']}` | {_f(r.get('compute_ratio'))} | "
            f"{_f(r.get('token_agreement'))} [{_f(ci[0])}, {_f(ci[1])}] | "
            f"{_f(r.get('calibration_disagreement'))} / {_f(r.get('achieved_disagreement'))} |")


def _auc_text(label: str, who: str, r: dict, diff) -> str:
    ci = r.get("auc_mean_ci") or [None, None]
    d = "–" if diff is None else f"{diff['diff']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]"
    return (f"| {label} | {who} | " + " | ".join(_f(a) for a in r["auc_per_exit"])
            + f" | **{_f(r.get('auc_mean'))}** [{_f(ci[0])}, {_f(ci[1])}] | {d} |")


def shares_bank(main_cfg, vcfg, main_bank: Path) -> bool:
    """Whether variant ``vcfg`` can train on the main run's bank: the same bank settings, K/V strategy and
    seed, and observation features the bank recorded."""
    from greencode.rl.bank import MANIFEST

    if not (main_bank / MANIFEST).is_file():
        return False
    same = all(getattr(main_cfg.rl, k) == getattr(vcfg.rl, k) for k in BANK_SETTINGS)
    same = same and main_cfg.decoding.kv_strategy == vcfg.decoding.kv_strategy and main_cfg.seed == vcfg.seed
    recorded = read_json(main_bank / MANIFEST).get("observation_features", [])
    return same and set(vcfg.rl.observation_features) <= set(recorded)


def tuning_bank(cfg, paths: RunPaths, tokens: int, configs) -> Path:
    """The bank of the tuning slice's files (built once, reused while its key matches), recording every
    observation feature any of ``configs`` (the main run's and the variants') observes."""
    from greencode.decoding.controllers import OBSERVATION_FEATURES, uses_candidates
    from greencode.rl import build_bank

    wanted = {f for c in configs for f in c.rl.recording().observation_features}
    features = [f for f in OBSERVATION_FEATURES if f in wanted]
    sources = {(c.rl.candidate_source, c.rl.candidate_k) for c in configs
               if uses_candidates(c.rl.recording().observation_features)}
    if len(sources) > 1:
        raise ValueError(f"the agents observe candidate features from different sources {sorted(sources)}; one "
                         "tuning bank records one (ablate rl.candidate_source / rl.candidate_k in separate runs)")
    source, k = next(iter(sources)) if sources else (cfg.rl.candidate_source, cfg.rl.candidate_k)
    run_dir = paths.root.with_name(f"{paths.root.name}-ablate")
    bank_cfg = dataclasses.replace(cfg.rl.bank, split="tuning", decision_tokens=int(tokens), heldout_fraction=0.0,
                                   max_tokens=None, record_features=features)
    tcfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, bank=bank_cfg, observation_features=features,
                                                           candidate_source=source, candidate_k=k))
    return build_bank(tcfg, path=run_dir / "tuning_bank")


def decision_quality(bank_path: Path, agents: dict[str, tuple], seed: int) -> dict:
    """{label: {"gc": ..., "classifier": ...}} AUCs on the tuning bank (each agent through the view of its own
    observation features), each with its paired difference from the main run's."""
    from greencode.rl.bank import TrajectoryBank
    from greencode.rl.policy import decision_auc, load_policy
    from greencode.stats import paired_auc_difference

    full = TrajectoryBank.load(bank_path, mmap=True)
    out, draws = {}, {}
    for label, (policy_path, classifier_path) in agents.items():
        out[label] = {}
        for who, path in (("gc", policy_path), ("classifier", classifier_path)):
            if not Path(path).is_file():
                continue
            policy = load_policy(path)
            view = full.with_features(getattr(policy, "features", []) or [], getattr(policy, "candidates", None))
            r = decision_auc(policy, view, seed=seed)
            draws[(label, who)] = {"mean": r["auc_mean"], "mean_draws": r.pop("mean_draws")}
            out[label][who] = r
    main = next(iter(agents))
    for (label, who), d in draws.items():
        ref = draws.get((main, who))
        out[label][who]["auc_mean_minus_main"] = (paired_auc_difference(d, ref)
                                                 if ref is not None and label != main else None)
    return out


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--variant", action="append", required=True,
                        help="space-separated dotted overrides of one variant (repeat for each variant)")
    parser.add_argument("--tuning-tokens", type=int, default=30000,
                        help="decided tokens of the tuning-slice bank every agent is judged on")
    parser.add_argument("--tuning-only", action="store_true",
                        help="judge the agents on tuning tokens only (no calibration, no test-split evaluation)")
    parser.add_argument("--keep-records", action="store_true",
                        help="keep every variant's per-sample method files (several MB each); by default only "
                             "the summaries, calibration and calibrated tables are kept")
    args = parser.parse_args()
    cfg = load_from_args(args)
    paths = RunPaths.from_config(cfg)
    main_table = paths.results_eval / "calibrated.json"
    needed = [paths.finetuned / "config.json", paths.policy] + ([] if args.tuning_only else [main_table])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the main run is missing {', '.join(missing)}; run "
                                f"`python scripts/reproduce.py --config {args.config}` first")
    from greencode.eval import evaluate
    from greencode.eval.calibration import calibrate
    from greencode.rl import build_bank, train_agent

    out = paths.results / "ablations"
    variants, agents, configs = [], {"(main run)": (paths.policy, paths.classifier)}, [cfg]
    for k, variant in enumerate(args.variant):
        run_dir = paths.variant_run("ablate", k, ("corpus", "tokenizer", "finetuned"))
        over = list(args.overrides) + shlex.split(variant) + [f"run_dir={run_dir}", f"results_dir={out / str(k)}",
                                                              f"figures_dir={out / str(k) / 'figures'}"]
        vcfg = load_config(args.config, over)
        vcfg = dataclasses.replace(vcfg, calibration=dataclasses.replace(vcfg.calibration, families=["gc"]),
                                   eval=dataclasses.replace(vcfg.eval, timing_samples=0, overhead_ab=False))
        configs.append(vcfg)
        shared = shares_bank(cfg, vcfg, paths.bank)
        bank = paths.bank if shared else build_bank(vcfg)
        train_agent(vcfg, bank=bank, progress_bar=False, tensorboard=False)
        vpaths = RunPaths.from_config(vcfg)
        agents[variant] = (vpaths.policy, vpaths.classifier)
        manifest = read_json(Path(bank) / "manifest.json")
        entry = {"variant": variant, "shared_bank": shared,
                 "bank_tokens": read_json(vpaths.results_rl / "analysis.json")["bank"]["num_tokens"],
                 "bank_behaviour": manifest.get("bank_config", {}).get("behaviour"),
                 "bank_early_exit_share": manifest.get("behaviour_early_exit_share")}
        if not args.tuning_only:
            calibrate(vcfg)
            evaluate(vcfg, ["full", "calibrated"])
            entry["rows"] = _gc_rows(read_json(out / str(k) / "eval" / "calibrated.json"))
            if not args.keep_records:
                for d in (out / str(k) / "eval" / "methods", out / str(k) / "calibration" / "eval" / "methods"):
                    shutil.rmtree(d, ignore_errors=True)
        variants.append(entry)

    tb = tuning_bank(cfg, paths, args.tuning_tokens, configs)
    tmanifest = read_json(tb / "manifest.json")
    quality = decision_quality(tb, agents, cfg.seed)
    base = {"variant": "(main run)", "bank_tokens": read_json(paths.results_rl / "analysis.json")["bank"]["num_tokens"]
            if (paths.results_rl / "analysis.json").is_file() else None}
    if not args.tuning_only:
        base["rows"] = _gc_rows(read_json(main_table))
    meta = run_metadata(cfg, stage="ablate_agent")
    meta.pop("config", None)
    tuning = {"bank": {"split": "tuning", "num_tokens": tmanifest.get("num_tokens"),
                       "num_sequences": tmanifest.get("num_sequences"), "key": tmanifest.get("key")},
              "agents": quality}
    write_json(out / "agent.json", {"split": cfg.eval.split, "main": base, "variants": variants,
                                    "tuning_decision_auc": tuning, "run": meta})

    exits = tmanifest.get("exit_layers") or []
    lines = ["# Exit-agent ablations", "",
             "## Decision quality on tuning tokens", "",
             f"Every agent on the same {tmanifest.get('num_tokens'):,} decided tokens of "
             f"{tmanifest.get('num_sequences')} validation files of the tuning slice (never a calibration file): "
             "AUC of P(exit) (GC) or P(agree) (the classifier) against the oracle label (the exit's token == the "
             "final layer's on the recorded state) per exit point, the mean over exit points with a bootstrap over "
             "files, and its paired difference from the main run's.", "",
             "| agent | decision | " + " | ".join(f"exit {x}" for x in exits) + " | mean [95% CI] | "
             "vs main run [95% CI] |", "|---|---|" + "---|" * (len(exits) + 2)]
    bank_of = {"(main run)": base.get("bank_tokens"), **{v["variant"]: v["bank_tokens"] for v in variants}}
    for label, whos in quality.items():
        for who, r in whos.items():
            lines.append(_auc_text(f"`{label}` ({_f(bank_of.get(label), '{:,}')} bank tokens)", who, r,
                                   r.get("auc_mean_minus_main")))
    if not args.tuning_only:
        lines += ["", "## GC at calibrated targets (test split)", "",
                  f"GC only, thresholds calibrated on the validation split for each agent; {cfg.eval.split}-split "
                  "samples shared with the main run (accuracy only, so no latency). Disagreement = 1 - token "
                  "agreement with the full model.", "",
                  "| agent | target | method | compute ratio | token agreement [95% CI] | disagreement calib. / test |",
                  "|---|---|---|---|---|---|"]
        for v in [base] + variants:
            for r in v["rows"]:
                lines.append(_row_text(f"`{v['variant']}`", r))
    write_text(out / "agent.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
