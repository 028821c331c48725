"""Build (or reuse) the trajectory bank the RL agent trains on.

For sampled training files: a context fraction from rl.bank.context_fraction, T greedy
tokens with the LITE fine-tuned model (runs/<name>/finetuned), then every exit point's
hidden state and prediction per token, stored in runs/<name>/bank (fp16 + manifest).

Tiny CPU run (after scripts/finetune.py):
    python scripts/build_bank.py --config configs/smoke.yaml
Force a rebuild:
    python scripts/build_bank.py --config configs/smoke.yaml --force
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.rl import TrajectoryBank, build_bank


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even when the stored bank matches")
    args = parser.parse_args()
    cfg = load_from_args(args)
    path = build_bank(cfg, force=args.force)
    bank = TrajectoryBank.load(path)
    m = bank.manifest
    print(f"trajectory bank: {bank.num_sequences} sequences ({int(bank.heldout.sum())} held out), "
          f"{bank.num_tokens} tokens, exit layers {m['exit_layers']} + final {m['final_layer']}, "
          f"observation {m['observation']}, {m['bytes_per_token']} B/token, {m['size_bytes'] / 1e6:.1f} MB -> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
