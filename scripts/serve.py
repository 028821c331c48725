#!/usr/bin/env python
"""Serve a run's early-exit model + RL exit policy over HTTP (FastAPI + uvicorn).

Tiny CPU try-out (a random demo run; gibberish completions, real plumbing):
    python scripts/serve.py --config configs/smoke.yaml --demo runs/smoke-demo
    curl -s localhost:8000/api/generate -d '{"inputs": "def add(a, b):", "options": {"num_predict": 8, "RL_agent_thresh": 0.9}}'

A trained run (default: this config's run directory, runs/<name>):
    python scripts/serve.py --config configs/default.yaml [--run-dir runs/default] [--port 8000]

Binds 127.0.0.1 unless --host says otherwise; a non-loopback host needs GREENCODE_API_KEY
(or serve.api_key). Routes and client settings: README.md, section "Serving completions to an editor".
"""

from greencode.cli import base_parser, friendly_errors, load_from_args


@friendly_errors
def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--run-dir", default=None, help="run directory to serve (default: serve.run_dir, else runs/<name>)")
    p.add_argument("--host", default=None, help="bind address (default: serve.host = 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    p.add_argument("--allow-no-key", action="store_true", help="allow a non-loopback host without an API key")
    p.add_argument("--demo", metavar="DIR", default=None,
                   help="build a tiny random demo run in DIR (if it has none) and serve it: for trying the plumbing")
    args = p.parse_args()
    cfg = load_from_args(args)
    from greencode.serve import serve

    run_dir = args.run_dir
    if args.demo:
        from greencode.serve.demo import ensure_demo_run

        run_dir = ensure_demo_run(cfg, args.demo)
    serve(cfg, run_dir, host=args.host, port=args.port, allow_no_key=args.allow_no_key,
          log_level="debug" if args.verbose else "info")


if __name__ == "__main__":
    raise SystemExit(main())
