"""Decoding speed benchmark: seconds per new token of HF generate (greedy, KV cache) and of
our loop (never-exit, fixed exit at every exit point, confidence, an MLP policy check), same
prompts, one process, interleaved; writes results/benchmark/<config name>.json and prints a
table. Works before any training (random model of the config's shape, random prompts).

Tiny CPU run:
    python scripts/benchmark.py --config configs/smoke.yaml --repeats 2 --context-tokens 32 --new-tokens 8
The default shape (make benchmark / make demo):
    python scripts/benchmark.py --config configs/default.yaml
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.eval.benchmark import format_table, run_benchmark
from greencode.utils import read_json


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--context-tokens", type=int, default=200, help="prompt length in model tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per generation (all methods)")
    parser.add_argument("--prompts", type=int, default=4, help="number of random prompts")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds over all prompts and methods")
    parser.add_argument("--warmup", type=int, default=1, help="warmup rounds (not timed)")
    parser.add_argument("--out", default=None, help="output JSON (default results/benchmark/<config name>.json)")
    args = parser.parse_args()
    cfg = load_from_args(args)
    path = run_benchmark(cfg, context_tokens=args.context_tokens, new_tokens=args.new_tokens,
                         num_prompts=args.prompts, repeats=args.repeats, warmup=args.warmup, out_path=args.out)
    print(format_table(read_json(path)))
    print(f"-> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
