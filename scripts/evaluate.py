"""Evaluate every method on the same seeded line-completion samples and write
results/<name>/eval: methods/<id>.json (per-sample records), summary.csv, summary.md,
summary.json (+ overhead_ab.json). Methods: base, full_hf, full, fixed@L, confidence@T,
entropy@T, oracle, gc@T, hf_early_exit@L (layers 0-based); see greencode/eval/methods.py.

Tiny CPU run (after the pipeline stages up to the agent):
    python scripts/evaluate.py --config configs/smoke.yaml
Only some methods (families or ids; these must be runnable):
    python scripts/evaluate.py --config configs/smoke.yaml --methods full,fixed,gc@0.9
Sharded over processes (rank r takes samples i % N == r; rank 0 merges and writes):
    torchrun --nproc_per_node 2 scripts/evaluate.py --config configs/default.yaml        # CPU or GPU
    accelerate launch --multi_gpu --num_processes 4 scripts/evaluate.py --config <cfg>     # GPUs
"""

import os

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.eval import evaluate, summary_table


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method families or ids (comma- or space-separated), e.g. full fixed gc@0.9; "
                             "default: eval.methods of the config")
    args = parser.parse_args()
    cfg = load_from_args(args)
    out = evaluate(cfg, args.methods)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 of a sharded run prints the table
        return
    print(f"{'method':<20} {'CodeBLEU':>9} {'ΔCodeBLEU':>10} {'agree':>6} {'latency s':>10} {'Δlatency':>9} "
          f"{'tok/s':>8} {'compute':>8} {'exit L':>7}")

    def num(v, spec):
        return "–" if v is None else format(v, spec)

    for r in summary_table(out):
        def pct(k):
            v = r.get(f"{k}_delta_pct")
            return "–" if v is None else f"{v:+.1f}%"
        exit_l = "–" if r["mean_exit_layer"] is None else f"{r['mean_exit_layer']:.2f}"
        compute = "–" if r["compute_ratio"] is None else f"{r['compute_ratio']:.3f}"
        print(f"{r['id']:<20} {num(r['codebleu'], '.4f'):>9} {pct('codebleu'):>10} "
              f"{num(r.get('token_agreement'), '.3f'):>6} {num(r['latency_s'], '.4f'):>10} "
              f"{pct('latency_s'):>9} {num(r['tokens_per_s'], '.1f'):>8} {compute:>8} {exit_l:>7}")
    print(f"-> {out}/summary.md")


if __name__ == "__main__":
    raise SystemExit(main())
