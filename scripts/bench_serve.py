#!/usr/bin/env python
"""Benchmark the endpoint over HTTP: latency p50/p90/p99 of real completions at several exit
thresholds and the full model, plus the server's own overhead per request (target <= 5 ms).
Writes results/benchmark/serve_<config name>.json.

Tiny CPU check (a random demo run; numbers say nothing about quality):
    python scripts/bench_serve.py --config configs/smoke.yaml --demo runs/smoke-demo --num-requests 10

A trained run (default: this config's run directory):
    python scripts/bench_serve.py --config configs/default.yaml [--run-dir runs/default] --num-requests 50
Editor-sized prompts (the file up to the cursor, at most N characters; default 3,000):
    python scripts/bench_serve.py --config configs/default.yaml --num-requests 30 --prompt-chars 16000

--load: 50 concurrent streaming clients (the official openai client) per serve.max_batch_size, first-chunk
latency against a lone request's prefill + one step, then a burst of 200 simultaneous requests
(results/benchmark/serve_load_<name>.json):
    python scripts/bench_serve.py --config configs/smoke.yaml --demo runs/smoke-demo --load --clients 6 \
        --batch-sizes 1,4 --burst 20 --max-new-tokens 8
--load --burst-only: only the burst (200 simultaneous 16-token requests against the configured admission by
deadline), written into the existing serve_load file (the previous burst kept as burst_previous):
    python scripts/bench_serve.py --config configs/default.yaml --load --burst-only [serve.request_timeout_s=20]

--chunked-prefill: a running stream's p95 gap between chunks alone and while 3,000-character prompts keep
joining, at serve.max_prefill_tokens 256 and 4096 (into serve_load_<name>.json, key chunked_prefill):
    python scripts/bench_serve.py --config configs/default.yaml --chunked-prefill

--memory-soak: 2,000 requests in every format (some streamed, some lossless), the server's resident memory
every 200 (into serve_load_<name>.json, key memory_soak):
    python scripts/bench_serve.py --config configs/default.yaml --memory-soak

--lossless-mix: lossless requests as batch rows: a lossy stream's first chunk and p95 gap alone and beside 3
lossless 200-token requests, and 8 concurrent lossless requests against one at a time (tokens/s, every
answer checked equal to the full model's; results/benchmark/serve_lossless_<name>.json):
    python scripts/bench_serve.py --config configs/default.yaml --lossless-mix

--fim: editors' fill-in-the-middle bodies (llm-vscode, Continue's Ollama, Mistral's /v1/fim/completions, the
openai client's suffix) on held-out lines of the test split, scored against the line, with a left-to-right
control (results/benchmark/serve_fim_<name>.json):
    python scripts/bench_serve.py --config configs/default.yaml --fim [--num-requests 40]
"""

from greencode.cli import base_parser, friendly_errors, load_from_args


@friendly_errors
def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--run-dir", default=None, help="run directory to serve (default: serve.run_dir, else runs/<name>)")
    p.add_argument("--demo", metavar="DIR", default=None, help="build a tiny random demo run in DIR and benchmark it")
    p.add_argument("--num-requests", type=int, default=20, help="prompts per setting")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens per request (default: eval.max_new_tokens)")
    p.add_argument("--thresholds", type=float, nargs="*", default=None, help="default: eval.gc_thresholds")
    p.add_argument("--out", default=None, help="output JSON (default results/benchmark/serve_<name>.json)")
    p.add_argument("--prompt-chars", type=int, default=3000,
                   help="the most characters of a prompt (the code up to the cursor; default 3000)")
    p.add_argument("--clients", type=int, default=50, help="--load: concurrent streaming clients")
    p.add_argument("--batch-sizes", default="1,16,64", help="--load: serve.max_batch_size values (comma list)")
    p.add_argument("--burst", type=int, default=200, help="--load: simultaneous requests of the burst (0 = none)")
    p.add_argument("--burst-only", action="store_true",
                   help="--load: only the burst (16-token completions against the configured admission), written "
                        "into the existing serve_load file")
    modes = p.add_mutually_exclusive_group()  # instead of the latency benchmark, one of:
    for flag, what in (
            ("--load", "concurrent streaming clients per serve.max_batch_size, then a burst (serve_load_<name>.json)"),
            ("--chunked-prefill", "a running stream's p95 gap while long prompts keep joining, at "
                                  "serve.max_prefill_tokens 256 and 4096 (into serve_load_<name>.json)"),
            ("--memory-soak", "2,000 requests in every format, the server's memory every 200 (into "
                              "serve_load_<name>.json)"),
            ("--lossless-mix", "lossless rows beside lossy ones, and lossless batching (serve_lossless_<name>.json)"),
            ("--fim", "editors' fill-in-the-middle bodies on held-out lines of the test split (serve_fim_<name>.json)")):
        modes.add_argument(flag, action="store_true", help=f"instead: {what}; in results/benchmark/")
    p.add_argument("--lossless-tokens", type=int, default=200, help="--lossless-mix: tokens of each lossless request")
    p.add_argument("--batch", type=int, default=8, help="--lossless-mix: concurrent lossless requests")
    p.add_argument("--repeats", type=int, default=3, help="--lossless-mix: tries of the probe alone and beside")
    args = p.parse_args()
    cfg = load_from_args(args)
    from greencode.bench.serving import (run_benchmark, run_chunked_prefill, run_fim_clients, run_lossless_mix,
                                         run_memory_soak, run_streaming_load)

    run_dir = args.run_dir
    if args.demo:
        from greencode.serve.demo import ensure_demo_run

        run_dir = ensure_demo_run(cfg, args.demo)
    if args.fim:
        res = run_fim_clients(cfg, run_dir, samples=args.num_requests, out_path=args.out)
        for name, r in res["summary"].items():
            print(f"{name:<18} 200: {r['all_200']}  as FIM: {r['answered_as_fim']}/{r['requests']}  exact match "
                  f"{100 * r['exact_match']['mean']:.1f}%  edit similarity {r['edit_similarity']['mean']:.1f}")
        d = res["exact_match_suffix_minus_no_suffix"]
        print(f"exact match, suffix - no suffix: {100 * d['mean']:+.1f} points [{100 * d['ci_low']:+.1f}, "
              f"{100 * d['ci_high']:+.1f}]")
        return
    if args.memory_soak:
        res = run_memory_soak(cfg, run_dir, out_path=args.out)["memory_soak"]
        print(f"status {res['status_counts']}; RSS MB {[s['rss_mb'] for s in res['samples']]}; "
              f"growth after the first window {res['rss_growth_after_first_window_mb']:.1f} MB; {res['wall_s']:.0f} s")
        return
    if args.chunked_prefill:
        res = run_chunked_prefill(cfg, run_dir, out_path=args.out)["chunked_prefill"]
        for name, r in res["settings"].items():
            print(f"{name}: p95 gap {r['gap_p95_ms_alone']:.1f} ms alone, {r['gap_p95_ms_beside']:.1f} ms while "
                  f"{r['prompts_joined']} prompts joined (x{r['ratio']:.2f})")
        return
    if args.lossless_mix:
        res = run_lossless_mix(cfg, run_dir, lossless_tokens=args.lossless_tokens, batch=args.batch,
                               probe_tokens=args.max_new_tokens or 64, batch_tokens=args.max_new_tokens or 64,
                               repeats=args.repeats, out_path=args.out, demo=bool(args.demo))
        ns, lb = res["no_stall"], res["lossless_batching"]
        print(f"lossy probe first chunk: alone {ns['first_chunk_ms']['alone']:.0f} ms, beside lossless "
              f"{ns['first_chunk_ms']['beside_lossless']:.0f} ms (x{ns['ratios']['first_chunk']:.2f}); p95 gap "
              f"{ns['gap_p95_ms']['alone']:.1f} -> {ns['gap_p95_ms']['beside_lossless']:.1f} ms "
              f"(x{ns['ratios']['gap_p95']:.2f}); control beside lossy full-model rows: first chunk "
              f"x{ns['control_beside_lossy_full_model']['first_chunk_ratio']:.2f}, p95 gap "
              f"x{ns['control_beside_lossy_full_model']['gap_p95_ratio']:.2f}")
        print(f"{lb['requests']} concurrent lossless: {lb['concurrent']['tokens_per_s']:.1f} tokens/s vs "
              f"{lb['one_at_a_time']['tokens_per_s']:.1f} one at a time (x{lb['speedup']:.2f}); equal to the full "
              f"model: {sum(lb['equal_to_full_model'])}/{lb['requests']}; the full model lossy: "
              f"x{lb['full_model_lossy_reference']['speedup']:.2f}")
        print(f"targets: {res['targets']}")
        return
    if args.load:
        res = run_streaming_load(cfg, run_dir, clients=args.clients, max_new_tokens=args.max_new_tokens or 32,
                                 batch_sizes=[int(x) for x in args.batch_sizes.split(",") if x.strip()],
                                 burst=args.burst, burst_only=args.burst_only, out_path=args.out,
                                 demo=bool(args.demo))
        if args.burst_only:
            print(f"burst: {res['burst']}")
            return
        print(f"{'max_batch_size':<16}{'served':>8}{'first p50 ms':>14}{'first p90 ms':>14}{'total p50 ms':>14}"
              f"{'tokens/s':>10}{'lone prefill+step ms':>22}")
        for s in res["settings"].values():
            f, t = s["first_chunk_ms"], s["total_ms"]
            print(f"{s['max_batch_size']:<16}{s['served']:>5}/{s['clients']:<2}{f['p50'] or 0:>14.0f}{f['p90'] or 0:>14.0f}"
                  f"{t['p50'] or 0:>14.0f}{s['tokens_per_s'] or 0:>10.1f}"
                  f"{s['lone_request']['prefill_plus_one_step_ms']:>22.1f}")
        if res["burst"]:
            print(f"burst: {res['burst']}")
        return
    res = run_benchmark(cfg, run_dir, num_requests=args.num_requests, thresholds=args.thresholds,
                        max_new_tokens=args.max_new_tokens, out_path=args.out, demo=bool(args.demo),
                        prompt_chars=args.prompt_chars)
    print(f"{'setting':<18}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'gen p50':>9}{'overhead p50':>14}{'exit layer':>11}"
          f"{'skipped':>9}")
    for name, s in res["settings"].items():
        rt, g, o = s["round_trip_ms"], s["generation_ms"], s["overhead_ms"]
        mel = "-" if s["mean_exit_layer"] is None else f"{s['mean_exit_layer']:.2f}"
        sk = "-" if s["layers_skipped_share"] is None else f"{s['layers_skipped_share']:.2f}"
        print(f"{name:<18}{rt['p50']:>9.1f}{rt['p90']:>9.1f}{rt['p99']:>9.1f}{g['p50']:>9.1f}{o['p50']:>14.2f}"
              f"{mel:>11}{sk:>9}")
    o = res["overhead_ms_all_requests"]
    print(f"server overhead per request: p50 {o['p50']:.2f} ms, p90 {o['p90']:.2f} ms (target <= "
          f"{res['overhead_target_ms']:g} ms); HTTP floor p50 {res['http_floor_ms']['p50']:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
