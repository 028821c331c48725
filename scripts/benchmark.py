"""Decoding speed benchmark: seconds per new token of HF generate (greedy, KV cache) and of
our loop (never-exit, fixed exit at every exit point, confidence, an MLP policy check), and the
lossless (self-speculative) methods by wall clock (lossless GC at eval.gc_thresholds, static
LayerSkip-style drafts, HF assistant_early_exit), same prompts, one process, interleaved; writes
results/benchmark/<config name>.json and prints a table. Works before any training (random model
of the config's shape, random prompts), written with a _random_init suffix (results/benchmark/
<config name>_random_init.json and likewise for the other modes) so that it never replaces a trained run's result.

--throughput instead measures tokens/s with the prompts decoded 1, 4, 8, 16 at a time (our loop,
full model and GC, against HF generate batched), writing results/benchmark/throughput_<config>.json
and .md.

--compiled measures the loop with its compiled layer step (decoding.compile; torch.compile mode
--compile-mode, default: reduce-overhead on CUDA, default on the CPU) against the eager loop, at
batch 1 and 8 (full model, fixed middle exit, GC), with HF generate as reference and a check that
the tokens are identical; writes results/benchmark/compiled_<config>.json and .md.

--profile shows where one batch of 8 (full model, fixed middle exit, GC) spends its time, part by part of
the decoding step (cProfile, a diagnostic: shares, not speeds); writes results/benchmark/profile_batch_<config>.

Tiny CPU run:
    python scripts/benchmark.py --config configs/smoke.yaml --repeats 2 --context-tokens 32 --new-tokens 8
    python scripts/benchmark.py --config configs/smoke.yaml --throughput --batch-sizes 1,2 --repeats 1 \
        --context-tokens 16 --new-tokens 4
    python scripts/benchmark.py --config configs/smoke.yaml --compiled --batch-sizes 1,2 --repeats 1 \
        --context-tokens 16 --new-tokens 4
    python scripts/benchmark.py --config configs/smoke.yaml --profile --batch-sizes 2 --context-tokens 16 \
        --new-tokens 4 --out /tmp/profile.json
The default shape (make benchmark / make demo):
    python scripts/benchmark.py --config configs/default.yaml
    python scripts/benchmark.py --config configs/default.yaml --throughput
    python scripts/benchmark.py --config configs/default.yaml --compiled
"""

from greencode.bench.compiled import format_compiled_markdown, run_compiled
from greencode.bench.decoding import LAYERSKIP_K, format_table, run_benchmark
from greencode.bench.profile import format_profile_markdown, run_profile
from greencode.bench.throughput import format_throughput_markdown, run_throughput
from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.utils import read_json


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--context-tokens", type=int, default=200, help="prompt length in model tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per generation (all methods)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="number of random prompts (default 4; --compiled: 8, one batch of 8)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds over all prompts and methods (default 5; throughput 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warmup rounds (not timed)")
    parser.add_argument("--out", default=None, help="output JSON (default results/benchmark/<config name>.json, "
                                                    "or throughput_<config name>.json; with _random_init before .json "
                                                    "when the run has no fine-tuned model yet)")
    parser.add_argument("--no-lossless", action="store_true", help="skip the lossless (self-speculative) methods")
    parser.add_argument("--layerskip-layers", default="mid",
                        help="static self-speculation exit layers: mid (the middle exit point), all (every exit "
                             "point) or a comma list of 0-based layers")
    parser.add_argument("--layerskip-k", default=",".join(map(str, LAYERSKIP_K)),
                        help="static self-speculation draft lengths (comma list)")
    parser.add_argument("--no-hf-early-exit", action="store_true", help="skip HF assistant_early_exit")
    parser.add_argument("--throughput", action="store_true",
                        help="measure batched throughput (tokens/s per batch size) instead")
    parser.add_argument("--compiled", action="store_true",
                        help="measure the compiled layer step against the eager loop instead")
    parser.add_argument("--compile-mode", default=None,
                        help="--compiled: torch.compile mode (default reduce-overhead on CUDA, default on the CPU)")
    parser.add_argument("--batch-sizes", default=None,
                        help="throughput / compiled: batch sizes (comma list; default 1,4,8,16 / 1,8)")
    parser.add_argument("--throughput-prompts", type=int, default=None,
                        help="throughput: prompts in the workload (default the largest batch size)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: where one batch (--batch-sizes' first, default 8) spends its time, per part of "
                             "the decoding step (cProfile; a diagnostic) -> results/benchmark/profile_batch_<config>")
    parser.add_argument("--gc-threshold", type=float, default=None,
                        help="throughput: GC's threshold (default the middle of eval.gc_thresholds)")
    args = parser.parse_args()
    cfg = load_from_args(args)
    if sum([args.throughput, args.compiled, args.profile]) > 1:
        parser.error("--throughput, --compiled and --profile are separate measurements; pick one")
    if args.profile:
        path = run_profile(cfg, batch=_ints(args.batch_sizes)[0] if args.batch_sizes else 8,
                           context_tokens=args.context_tokens, new_tokens=args.new_tokens, out_path=args.out)
        print(format_profile_markdown(read_json(path)))
        print(f"-> {path}")
        return
    if args.compiled:
        path = run_compiled(cfg, mode=args.compile_mode, batch_sizes=args.batch_sizes or "1,8",
                            context_tokens=args.context_tokens, new_tokens=args.new_tokens,
                            num_prompts=args.prompts if args.prompts is not None else 8, repeats=args.repeats if args.repeats is not None else 5,
                            warmup=max(1, args.warmup), gc_threshold=args.gc_threshold, out_path=args.out)
        print(format_compiled_markdown(read_json(path)))
        print(f"-> {path}")
        return
    if args.throughput:
        path = run_throughput(cfg, batch_sizes=args.batch_sizes or "1,4,8,16", context_tokens=args.context_tokens,
                              new_tokens=args.new_tokens, num_prompts=args.throughput_prompts,
                              repeats=args.repeats if args.repeats is not None else 3, warmup=args.warmup,
                              gc_threshold=args.gc_threshold, out_path=args.out)
        print(format_throughput_markdown(read_json(path)))
        print(f"-> {path}")
        return
    layers = args.layerskip_layers if args.layerskip_layers in ("mid", "all") else _ints(args.layerskip_layers)
    path = run_benchmark(cfg, context_tokens=args.context_tokens, new_tokens=args.new_tokens,
                         num_prompts=args.prompts if args.prompts is not None else 4, repeats=args.repeats if args.repeats is not None else 5,
                         warmup=args.warmup, out_path=args.out, lossless=not args.no_lossless,
                         layerskip_layers=layers, layerskip_k=_ints(args.layerskip_k),
                         hf_early_exit=not args.no_hf_early_exit)
    print(format_table(read_json(path)))
    print(f"-> {path}")


if __name__ == "__main__":
    raise SystemExit(main())
