"""Ship a finished pretraining run as the embedded default's base model (assets/default-base).

    python scripts/pretrain.py --config configs/base.yaml      # ~88 min on 2 CPU cores
    python scripts/ship_base.py --config configs/base.yaml     # -> assets/default-base

(`make pretrain` runs both.) The folder holds the HF model and tokenizer, the pretraining
loss curve, the list of training files (path + sha1) and base_manifest.json: command,
config, data manifest hash, tokens seen, wall time, losses, commit, versions, hardware.
Replace the shipped checkpoint only when a change is worth its size in the history.
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.training.shipping import ship_base


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--out", default="assets/default-base", help="where to write the shipped base")
    args = parser.parse_args()
    cfg = load_from_args(args)
    out = ship_base(cfg, args.out)
    print(f"shipped base model -> {out}")


if __name__ == "__main__":
    raise SystemExit(main())
