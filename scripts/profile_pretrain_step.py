"""What one pretraining step costs on this machine: the plain recipe (the final layer's loss) against
the early-exit recipe of the config (its curriculum, token sampling and self-distillation), with and
without bf16 autocast, side by side through the one timing harness (interleaved rounds, so a drift of
the machine hits every cell alike). Each step is forward + backward + AdamW on a batch of the config's
shape (``pretrain.batch_size`` x ``pretrain.seq_len``) of random token ids -> results/benchmark/
pretrain_step.{json,md} (or ``--out``).

    python scripts/profile_pretrain_step.py --config configs/base.yaml
    python scripts/profile_pretrain_step.py --config configs/smoke.yaml --rounds 1 --warmup 0   # tiny

The early-exit step is also split into its parts (``--parts``): the plain step plus the exit
losses without self-distillation, and with every position instead of the sampled fraction.
"""

from __future__ import annotations

from pathlib import Path

from greencode.cli import base_parser, friendly_errors, load_from_args


def _cells(parts: bool, precisions: list[str]) -> list[tuple[str, str]]:
    recipes = ["plain", "early_exit"] + (["ee_no_distill", "ee_all_tokens"] if parts else [])
    return [(r, p) for p in precisions for r in recipes]


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (every cell once a round)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds, dropped")
    parser.add_argument("--parts", action="store_true", help="also time the early-exit step's parts")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16"],
                        help="time these precisions (repeatable; default both)")
    parser.add_argument("--out", default="results/benchmark/pretrain_step.json")
    args = parser.parse_args()
    cfg = load_from_args(args)

    import torch

    from greencode.bench import timing
    from greencode.models import EarlyExitModel
    from greencode.training import early_exit_loss as eel
    from greencode.runinfo import run_metadata
    from greencode.utils import REPO_ROOT, set_seed, setup_torch

    setup_torch(cfg.hardware)
    stage = cfg.pretrain
    ee_cfg = stage.early_exit
    vocab = cfg.tokenizer.vocab_size + 8
    set_seed(cfg.seed)
    model = EarlyExitModel.from_config(cfg.model, vocab_size=vocab)
    model.hf.train()
    opt = torch.optim.AdamW(model.hf.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = torch.randint(0, vocab, (stage.batch_size, stage.seq_len), generator=gen)
    scales = eel.loss_scales(model.exit_layers, ee_cfg.scale)
    curriculum = eel.ExitCurriculum(len(scales), ee_cfg.curriculum, ee_cfg.curriculum_period)
    period = max(1, ee_cfg.curriculum_period if ee_cfg.curriculum == "rotational" else 1)

    def step(cell) -> float:
        """Seconds per optimizer step, averaged over one full turn of the curriculum (every phase once, so
        each cell trains the same exits)."""
        recipe, precision = cell
        distill = 0.0 if recipe in ("plain", "ee_no_distill") else ee_cfg.distill
        fraction = 1.0 if recipe == "ee_all_tokens" else ee_cfg.token_fraction

        def run():
            for phase in range(period):
                active = [] if recipe == "plain" else curriculum.active(phase)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss, _ = eel.early_exit_loss(model, batch, active=active, scales=scales,
                                                  e_scale=ee_cfg.e_scale, distill=distill,
                                                  distill_temperature=ee_cfg.distill_temperature,
                                                  token_fraction=fraction, generator=gen)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return timing.timed("cpu", run)[1] / period

    cells = _cells(args.parts, args.precision or ["fp32", "bf16"])
    with timing.Noise() as noise:
        times = timing.interleaved_rounds([cells], args.rounds, args.warmup, step)
    plain = {p: times[("plain", p)] for _, p in cells}
    rows = []
    for (recipe, precision), ts in times.items():
        q = timing.quartiles(ts)
        rows.append({"recipe": recipe, "precision": precision, "seconds": ts, **q,
                     "tokens_per_s": stage.batch_size * stage.seq_len / q["median"],
                     "ratio_to_plain_same_precision": timing.paired_median(ts, plain[precision]),
                     "ratio_to_plain_fp32": timing.paired_median(ts, plain["fp32"]) if "fp32" in plain else None})
    result = {"config_name": cfg.name, "batch_size": stage.batch_size, "seq_len": stage.seq_len,
              "exit_layers": list(model.exit_layers),
              "early_exit": {"curriculum": ee_cfg.curriculum, "period": ee_cfg.curriculum_period,
                             "token_fraction": ee_cfg.token_fraction, "distill": ee_cfg.distill},
              "rounds": args.rounds, "warmup": args.warmup, "rows": rows,
              "threads": torch.get_num_threads(), **run_metadata(cfg),
              "noise": noise.record()}

    def markdown(r: dict) -> str:
        lines = [f"# Pretraining step cost ({r['config_name']}: {r['batch_size']} x {r['seq_len']} tokens, "
                 f"{r['rounds']} interleaved rounds)", "",
                 "| recipe | precision | median s/step | IQR | tokens/s | x plain (same precision) | x plain fp32 |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['recipe']} | {row['precision']} | {row['median']:.3f} | {row['iqr']:.3f} | "
                         f"{row['tokens_per_s']:.0f} | {row['ratio_to_plain_same_precision']:.3f} | "
                         f"{row['ratio_to_plain_fp32'] or float('nan'):.3f} |")
        return "\n".join(lines)

    out = Path(args.out)
    timing.write_result(out if out.is_absolute() else REPO_ROOT / out, result, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()
