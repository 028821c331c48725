"""Endpoint benchmark: latency of real completions over HTTP at several exit thresholds and
the full model, and the server's own overhead per request.

A real server (``scripts/serve.py``) runs in a child process on a free loopback port. For
each prompt, every setting (the full model = threshold 1.0, then each threshold) is asked in
turn, so slow drifts of a shared machine hit all settings alike. Per request we record the
client's round trip and what the server reports: ``generation_s`` (the decoding loop's
measurement window) and ``latency_s`` (the server's time from request arrival to response).

* overhead per request = round trip - generation_s (HTTP, JSON, validation, queue hand-off,
  tokenization, response building; the target is <= 5 ms);
* server-internal part = latency_s - generation_s; transport = round trip - latency_s;
* the HTTP floor = the round trip of ``GET /health``.

Prompts are prefixes of real source files (the interpreter's standard library, cut at a
seeded line and column, like an editor's cursor), converted by the server as any editor
request is (``serve.prompt_format``).

The other serving benchmarks of ``scripts/bench_serve.py``: :func:`run_streaming_load` (concurrent
streaming clients, then a burst against admission by deadline), :func:`run_lossless_mix`,
:func:`run_chunked_prefill`, :func:`run_memory_soak` and :func:`run_fim_clients`. Every clock,
percentile and result file goes through :mod:`greencode.bench.timing`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from greencode.bench.timing import (Stopwatch, load_average_1m, load_record, merge_result, percentile, percentiles,
                                    run_record, timed, write_result)
from greencode.config import dump_config
from greencode.data.corpus import load_corpus, text_sep
from greencode.eval.infill import make_infill_samples
from greencode.eval.metrics import exact_match_breakdown, is_boilerplate, line_scores
from greencode.eval.stats import bootstrap_indices, mean_ci
from greencode.provenance import weights_record
from greencode.utils import REPO_ROOT, portable_path, read_json

log = logging.getLogger(__name__)

OVERHEAD_TARGET_MS = 5.0
# what the latency benchmark keeps of the server's own numbers per request (its ``greencode`` block)
SERVER_STATS = ("generation_s", "latency_s", "completion_tokens", "decode_steps", "layers_run", "exit_layers",
                "energy_j", "prompt_tokens", "finish_reason", "queue_s", "tokenize_s", "postprocess_s",
                "request_parse_s", "worker_to_loop_s")


def bench_prompts(n: int, seed: int, max_chars: int = 3000) -> list[str]:
    """``n`` editor-like prompts: a standard-library file cut at a seeded line and column."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {stdlib} to build benchmark prompts from")
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        if len(lines) < 40:
            continue
        i = rng.randrange(20, len(lines))
        line = lines[i]
        col = rng.randrange(len(line) - len(line.lstrip()), max(len(line) - len(line.lstrip()) + 1, len(line.rstrip())))
        prompt = "".join(lines[:i]) + line[:col]
        if prompt.strip():
            prompts.append(prompt[-max_chars:])
    return prompts


@contextlib.contextmanager
def _server(cfg, root: Path, overrides: Sequence[str]):
    """A real server for ``cfg`` (written to a temporary config file) on ``root``, without an API key."""
    from greencode.serve.server import ServerProcess

    with tempfile.TemporaryDirectory(prefix="greencode-bench-") as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(dump_config(cfg))
        with ServerProcess(cfg_path, list(overrides), run_dir=root, env={"GREENCODE_API_KEY": ""}) as srv:
            yield srv


def _weights(root: Path) -> Optional[dict]:
    """The weights record of the run the server loads (``<run>/finetuned``; greencode.provenance)."""
    ft = Path(root) / "finetuned"
    return weights_record(ft) if (ft / "config.json").is_file() else None


def _exact_match_without_boilerplate(rows: list[dict], seed: int) -> dict[str, Any]:
    """The share of the exact matches on boilerplate reference lines (licence headers, blank:
    greencode.eval.metrics.is_boilerplate) and exact match on the other lines, with its 95% CI."""
    flags = [is_boilerplate(r["reference"]) for r in rows]
    b = exact_match_breakdown([r["exact_match"] for r in rows], flags)
    rest = np.array([r["exact_match"] for r, f in zip(rows, flags) if not f], dtype=float)
    return {"exact_match_boilerplate_share": b["exact_match_boilerplate_share"],
            "exact_match_no_boilerplate": (dict(zip(("mean", "ci_low", "ci_high"),
                                                    mean_ci(rest, bootstrap_indices(len(rest), 2000, seed))))
                                           if len(rest) else None),
            "num_samples_no_boilerplate": b["num_samples_no_boilerplate"]}


def _result_path(cfg, out_path: Optional[Union[str, Path]], prefix: str) -> Path:
    """``out_path``, else ``results/benchmark/<prefix>_<config name>.json``."""
    return Path(out_path) if out_path else REPO_ROOT / "results" / "benchmark" / f"{prefix}_{cfg.name}.json"


def _quiet_clients() -> None:
    """No INFO line per request or chunk from the HTTP clients."""
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _summary(rows: list[dict], num_layers: int) -> dict[str, Any]:
    rtt = [r["rtt_s"] for r in rows]
    gen = [r["generation_s"] for r in rows]
    steps = sum(r["decode_steps"] for r in rows)
    layers_run = sum(r["layers_run"] for r in rows)
    tokens = sum(r["completion_tokens"] for r in rows)
    exits = [e for r in rows for e in r["exit_layers"][1:]]
    energy = [r["energy_j"] for r in rows if r["energy_j"] is not None]
    return {
        "requests": len(rows),
        "round_trip_ms": percentiles(rtt, 1e3),
        "generation_ms": percentiles(gen, 1e3),
        "server_latency_ms": percentiles([r["latency_s"] for r in rows], 1e3),
        "overhead_ms": percentiles([a - b for a, b in zip(rtt, gen)], 1e3),
        "server_internal_overhead_ms": percentiles([r["latency_s"] - r["generation_s"] for r in rows], 1e3),
        "transport_ms": percentiles([r["rtt_s"] - r["latency_s"] for r in rows], 1e3),
        "handoff_to_worker_ms": percentiles([r["queue_s"] for r in rows], 1e3),
        "prompt_conversion_and_tokenize_ms": percentiles([r["tokenize_s"] for r in rows], 1e3),
        "postprocess_ms": percentiles([r["postprocess_s"] for r in rows], 1e3),
        "request_parse_ms": percentiles([r["request_parse_s"] for r in rows], 1e3),
        "worker_to_loop_ms": percentiles([r["worker_to_loop_s"] for r in rows], 1e3),
        "completion_tokens_mean": tokens / len(rows) if rows else None,
        "tokens_per_s": tokens / sum(gen) if sum(gen) > 0 else None,
        "mean_exit_layer": float(np.mean(exits)) if exits else None,
        "layers_skipped_share": 1 - layers_run / (steps * num_layers) if steps else None,
        "energy_j_mean": float(np.mean(energy)) if energy else None,
        "energy_measured_requests": len(energy),
    }


def run_benchmark(cfg, run_dir: Optional[Union[str, Path]] = None, *, num_requests: int = 20,
                  thresholds: Optional[Sequence[float]] = None, max_new_tokens: Optional[int] = None,
                  warmup: int = 3, out_path: Optional[Union[str, Path]] = None, demo: bool = False) -> dict[str, Any]:
    """Benchmark the endpoint serving ``run_dir`` (default: the config's run); writes
    ``results/benchmark/serve_<config name>.json`` (or ``out_path``) and returns the result."""
    import httpx

    from greencode.serve.engine import FULL_MODEL_THRESHOLD, run_root

    _quiet_clients()
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    thresholds = list(cfg.eval.gc_thresholds if thresholds is None else thresholds)
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold {t} is outside [0, 1]")
    settings = [("full_model", FULL_MODEL_THRESHOLD)] + [(f"threshold_{t:g}", float(t)) for t in thresholds
                                                         if t < FULL_MODEL_THRESHOLD]
    n_new = int(max_new_tokens or cfg.eval.max_new_tokens)
    root = run_root(cfg, run_dir)
    prompts = bench_prompts(num_requests, cfg.seed)
    out_path = _result_path(cfg, out_path, "serve")

    load_before = load_average_1m()
    with _server(cfg, root, []) as srv, \
            httpx.Client(base_url=srv.url, timeout=max(60.0, cfg.serve.request_timeout_s + 10)) as client:
        health = client.get("/health").json()
        num_layers = int(health["num_layers"])

        def ask(prompt: str, thr: float) -> dict:
            body = {"inputs": prompt, "options": {"num_predict": n_new, "temperature": 0, "RL_agent_thresh": thr}}
            clock = Stopwatch()
            r = client.post("/api/generate", json=body)
            rtt = clock.elapsed
            if r.status_code != 200:
                raise RuntimeError(f"benchmark request failed with {r.status_code}: {r.text[:500]}")
            s = r.json()["greencode"]
            return {"rtt_s": rtt, **{k: s[k] for k in SERVER_STATS}}

        for i in range(warmup):
            for _, thr in settings:
                ask(prompts[i % len(prompts)], thr)
        rows: dict[str, list[dict]] = {name: [] for name, _ in settings}
        health_rtt = []
        total = Stopwatch()
        for i, prompt in enumerate(prompts):
            for name, thr in settings:
                rows[name].append(ask(prompt, thr))
            clock = Stopwatch()
            client.get("/health")
            health_rtt.append(clock.elapsed)
            log.info("benchmark: prompt %d/%d done", i + 1, len(prompts))
        wall_s = total.elapsed

    summaries = {name: {"threshold": thr, **_summary(rows[name], num_layers)} for name, thr in settings}
    full_p50 = summaries["full_model"]["generation_ms"]["p50"]
    for s in summaries.values():
        p50 = s["generation_ms"]["p50"]
        s["generation_speedup_vs_full_p50"] = (full_p50 / p50) if p50 else None
    all_rows = [r for v in rows.values() for r in v]
    overhead = percentiles([r["rtt_s"] - r["generation_s"] for r in all_rows], 1e3)
    result = {
        "what": "endpoint latency per setting (full model = threshold 1.0) and the server's overhead per request",
        "run_dir": str(root),
        "demo_run": bool(demo),
        "server": {k: health.get(k) for k in ("family", "num_layers", "exit_layers", "device", "dtype", "serving",
                                              "policy_loaded", "energy_source", "kv_strategy", "prompt_format",
                                              "policy_temperature")},
        "requests_per_setting": num_requests,
        "max_new_tokens": n_new,
        "format": "seed (/api/generate with inputs + options), greedy",
        "prompts": "prefixes of Python standard-library files cut at a seeded line/column (bench_prompts)",
        "settings": summaries,
        "overhead_ms_all_requests": overhead,
        "overhead_target_ms": OVERHEAD_TARGET_MS,
        "overhead_p50_meets_target": overhead["p50"] is not None and overhead["p50"] <= OVERHEAD_TARGET_MS,
        "http_floor_ms": percentiles(health_rtt, 1e3),
        "wall_s": wall_s,
        "load_average_1m": load_record(load_before),
        "note": ("overhead = client round trip - the server's generation_s (time inside the decoding loop's "
                 "measurement window); it includes HTTP, JSON, validation, queue hand-off, prompt conversion "
                 "and tokenization. Energy is null where no counter is readable (never estimated)."),
    }
    write_result(out_path, result, cfg=cfg, stage="bench_serve", weights=_weights(root), meta_key="run")
    return result


# --------------------------------------------------------------------------- concurrent streaming clients
def run_streaming_load(cfg, run_dir: Optional[Union[str, Path]] = None, *, clients: int = 50,
                       batch_sizes: Sequence[int] = (1, 16, 64), max_new_tokens: int = 32, burst: int = 200,
                       burst_tokens: int = 16, burst_batch_size: int = 8, burst_only: bool = False,
                       out_path: Optional[Union[str, Path]] = None, demo: bool = False) -> dict[str, Any]:
    """``clients`` concurrent streaming completions with the official ``openai`` client (SSE)
    against a real server (one child process per ``serve.max_batch_size`` in ``batch_sizes``;
    ``serve.queue_size`` large enough that every client is admitted): per client the time to the
    first chunk and to the last, all served or not, and the server's own prefill and per-step
    times of a lone request (what first-chunk latency is compared with). Then ``burst``
    simultaneous non-streamed ``burst_tokens``-token requests against a server with the configured
    admission (deadline-based) and ``serve.max_batch_size=burst_batch_size``: every answer must be
    JSON, 200 within the deadline or 503 with ``Retry-After``, every served answer complete, the
    server (``/health``, ``/metrics``) alive afterwards; latency p50/p99 and the count refused.
    ``burst_only``: only the burst, written into the existing file (its previous burst kept as
    ``burst_previous``). Writes ``results/benchmark/serve_load_<config name>.json``."""
    import asyncio

    import httpx
    import openai

    from greencode.serve.engine import run_root

    _quiet_clients()
    if clients < 1 or burst < 0 or max_new_tokens < 1:
        raise ValueError(f"clients={clients} (>= 1), burst={burst} (>= 0), max_new_tokens={max_new_tokens} (>= 1)")
    root = run_root(cfg, run_dir)
    prompts = bench_prompts(clients, cfg.seed)
    out_path = _result_path(cfg, out_path, "serve_load")
    extra = {"exit_threshold": 1.0}  # the full model: the comparison is about batching, not exits

    async def one_stream(client, prompt: str) -> dict:
        clock = Stopwatch()
        try:
            await _stream(client, prompt, max_new_tokens, extra, clock)
            first = clock.stamps[0] if clock.stamps else None
            return {"ok": True, "first_chunk_s": first, "total_s": clock.elapsed, "chunks": len(clock.stamps)}
        except Exception as e:  # noqa: BLE001 - recorded: the target is that none fails
            return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}", "total_s": clock.elapsed}

    async def load(url: str) -> tuple[list[dict], float]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600.0)
        clock = Stopwatch()
        rows = await asyncio.gather(*[one_stream(client, p) for p in prompts])
        wall = clock.elapsed
        await client.close()
        return list(rows), wall

    async def flood(url: str, timeout_s: float) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=600.0,
                                     limits=httpx.Limits(max_connections=burst + 10)) as c:
            body = {"inputs": prompts[0], "parameters": {"max_new_tokens": burst_tokens}}
            # warm-up: one full batch, so the server has measured its drain rate at that size
            for r in await asyncio.gather(*[c.post("/generate", json=body) for _ in range(burst_batch_size)]):
                r.raise_for_status()

            async def one():
                clock = Stopwatch()
                try:
                    r = await c.post("/generate", json=body)
                    return r, clock.elapsed
                except Exception as e:  # noqa: BLE001 - recorded: the target is that none fails
                    return e, clock.elapsed

            rs = await asyncio.gather(*[one() for _ in range(burst)])
            alive = (await c.get("/health")).status_code == 200
            metrics_ok = (await c.get("/metrics")).status_code == 200
        codes: dict[str, int] = {}
        json_ok = retry_after_ok = complete = True
        served_s, refused_s, retry_after, messages = [], [], [], []
        for r, dt in rs:
            if isinstance(r, Exception):
                codes[type(r).__name__] = codes.get(type(r).__name__, 0) + 1
                json_ok = False
                continue
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
            json_ok &= r.headers.get("content-type", "").startswith("application/json")
            if r.status_code == 200:
                served_s.append(dt)
                g = r.json().get("greencode") or {}
                complete &= g.get("finish_reason") in ("length", "eos", "stop")
            elif r.status_code == 503:
                refused_s.append(dt)
                if len(messages) < 3:
                    messages.append(str(r.json().get("error", ""))[:300])
                retry_after_ok &= bool(r.headers.get("retry-after"))
                if r.headers.get("retry-after"):
                    retry_after.append(int(r.headers["retry-after"]))
        return {"requests": burst, "max_new_tokens": burst_tokens, "request_timeout_s": timeout_s,
                "status_counts": codes, "all_json": json_ok, "every_503_has_retry_after": retry_after_ok,
                "server_alive_after": alive, "metrics_answered_after": metrics_ok, "served": len(served_s),
                "refused": len(refused_s), "served_latency_s": percentiles(served_s),
                "refused_latency_s": percentiles(refused_s), "retry_after_s": percentiles(retry_after),
                "refusal_messages": messages, "every_served_within_deadline": all(t <= timeout_s for t in served_s),
                "every_served_answer_complete": complete}

    settings: dict[str, Any] = {}
    burst_result = None
    load_before = load_average_1m()
    for b in ([] if burst_only else batch_sizes):
        overrides = [f"serve.max_batch_size={int(b)}", f"serve.queue_size={max(clients, 8)}",
                     f"serve.max_new_tokens_cap={max(max_new_tokens, 16)}", "serve.request_timeout_s=600"]
        with _server(cfg, root, overrides) as srv, httpx.Client(base_url=srv.url, timeout=120.0) as c:
            # a lone request first (twice; the second is kept): the server's own prefill and step times
            lone = None
            for _ in range(2):
                lone = c.post("/generate", json={"inputs": prompts[0], "parameters": {
                    "max_new_tokens": max_new_tokens, "RL_agent_thresh": 1.0}}).json()["greencode"]
            step_s = lone["decode_s"] / max(1, lone["decode_steps"])
            rows, wall = asyncio.run(load(srv.url))
        served = [r for r in rows if r["ok"]]
        firsts = [r["first_chunk_s"] for r in served if r["first_chunk_s"] is not None]
        settings[f"max_batch_size_{b}"] = {
            "max_batch_size": int(b), "clients": clients, "served": len(served),
            "all_served": len(served) == clients,
            "errors": [r["error"] for r in rows if not r["ok"]][:5],
            "first_chunk_ms": percentiles(firsts, 1e3), "total_ms": percentiles([r["total_s"] for r in served], 1e3),
            "wall_s": wall, "tokens_per_s": len(served) * max_new_tokens / wall if wall else None,
            "lone_request": {"prefill_ms": lone["prefill_s"] * 1e3, "decode_step_ms": step_s * 1e3,
                             "prefill_plus_one_step_ms": (lone["prefill_s"] + step_s) * 1e3,
                             "generation_ms": lone["generation_s"] * 1e3},
        }
        log.info("load: max_batch_size=%s: %d/%d served, first chunk p50 %.0f ms, wall %.1f s", b,
                 len(served), clients, settings[f"max_batch_size_{b}"]["first_chunk_ms"]["p50"] or -1, wall)
    if burst:
        # the server's own admission (serve.* as configured, batch of burst_batch_size): deadlines, not a count
        overrides = [f"serve.max_batch_size={int(burst_batch_size)}",
                     f"serve.max_new_tokens_cap={max(burst_tokens, 16)}"]
        with _server(cfg, root, overrides) as srv:
            burst_result = asyncio.run(flood(srv.url, float(cfg.serve.request_timeout_s)))
    if burst_only:
        previous = (read_json(out_path) if out_path.is_file() else {}).get("burst")
        kept = {"burst_previous": previous} if previous is not None else {}
        return merge_result(out_path, **kept, burst=burst_result,
                            burst_run=run_record(cfg, "bench_serve_burst", _weights(root)),
                            burst_load_average_1m=load_record(load_before))
    result = {
        "what": f"{clients} concurrent streaming clients (openai.AsyncOpenAI, SSE, greedy, full model, "
                f"{max_new_tokens} tokens each) per serve.max_batch_size; then {burst} simultaneous requests",
        "run_dir": str(root), "demo_run": bool(demo),
        "prompts": "prefixes of Python standard-library files cut at a seeded line/column (bench_prompts)",
        "settings": settings,
        "burst": burst_result,
        "note": ("first chunk = time from sending the request to the first non-empty text chunk; with every "
                 "client admitted at once, the rows join one batch: their prompts are prefilled together, then "
                 "each step decodes one token for all of them. lone_request: one request alone on the same server "
                 "(its prefill and mean decode step), the floor a first chunk is compared with."),
        "load_average_1m": load_record(load_before),
    }
    write_result(out_path, result, cfg=cfg, stage="bench_serve_load", weights=_weights(root), meta_key="run")
    return result


# --------------------------------------------------------------------------- lossless rows beside lossy rows
async def _stream(client, prompt: str, tokens: int, extra: Optional[dict] = None,
                  clock: Optional[Stopwatch] = None) -> Stopwatch:
    """A streamed greedy completion with the ``openai`` client; the clock (started before the
    request) stamps every non-empty text chunk's arrival."""
    clock = clock if clock is not None else Stopwatch()
    stream = await client.completions.create(model="greencode", prompt=prompt, max_tokens=tokens, temperature=0,
                                             stream=True, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            clock.stamp()
    return clock


def run_lossless_mix(cfg, run_dir: Optional[Union[str, Path]] = None, *, lossless_requests: int = 3,
                     lossless_tokens: int = 200, probe_tokens: int = 64, batch: int = 8, batch_tokens: int = 64,
                     repeats: int = 3, out_path: Optional[Union[str, Path]] = None,
                     demo: bool = False) -> dict[str, Any]:
    """Lossless requests as rows of the batch, measured through a real server with the official
    ``openai`` client:

    * **no stall**: a streamed lossy probe of ``probe_tokens`` tokens alone, then while
      ``lossless_requests`` lossless requests of ``lossless_tokens`` tokens are in flight; its time
      to the first chunk and its p95 gap between chunks, each the median of ``repeats`` tries,
      and their ratios (target: each at most 2x); the control: the same requests in lossy mode
      with the full model beside it (what as many more rows cost anyway);
    * **lossless batching**: ``batch`` concurrent lossless requests of ``batch_tokens`` tokens
      against the same requests one at a time (tokens/s; target at least 2.5x), and every answer
      checked equal to the full model's greedy answer (``exit_threshold: 1.0``, lossy); the same
      for the full model in lossy mode as the reference (what batching gives on this machine).

    Writes ``results/benchmark/serve_lossless_<config name>.json``."""
    import asyncio

    import openai

    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    prompts = bench_prompts(max(batch, lossless_requests) + repeats, cfg.seed)
    out_path = _result_path(cfg, out_path, "serve_lossless")
    lossless = {"mode": "lossless"}

    async def stream_probe(client, prompt: str) -> dict:
        clock = await _stream(client, prompt, probe_tokens)
        return {"first_chunk_s": clock.stamps[0] if clock.stamps else None, "chunks": len(clock.stamps),
                "gap_p95_s": percentile(clock.gaps(), 95)}

    async def complete(client, prompt: str, tokens: int, extra: dict) -> dict:
        clock = Stopwatch()
        r = await client.completions.create(model="greencode", prompt=prompt, max_tokens=tokens, temperature=0,
                                            extra_body=extra)
        return {"text": r.choices[0].text, "tokens": r.usage.completion_tokens, "s": clock.elapsed}

    async def measure(url: str) -> dict:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600.0)
        out: dict[str, Any] = {"alone": [], "beside_lossless": [], "beside_lossy": []}
        await stream_probe(client, prompts[0])  # warm-up
        for k in range(repeats):
            probe = prompts[batch + k] if batch + k < len(prompts) else prompts[k]
            out["alone"].append(await stream_probe(client, probe))
            # beside lossless requests, then (the control) beside the same requests in lossy mode with the full
            # model: what three more rows in the batch cost anyway
            for key, extra in (("beside_lossless", lossless), ("beside_lossy", {"exit_threshold": 1.0})):
                background = [asyncio.create_task(complete(client, prompts[i], lossless_tokens, extra))
                              for i in range(lossless_requests)]
                await asyncio.sleep(0.5)  # the background requests are prefilled and decoding
                running = sum(not t.done() for t in background)
                row = await stream_probe(client, probe)
                row["background_in_flight_at_start"] = running
                row["background_in_flight_at_end"] = sum(not t.done() for t in background)
                done = await asyncio.gather(*background)
                row["background_tokens"] = [d["tokens"] for d in done]
                out[key].append(row)
        # lossless batching: one at a time, then all at once; the full model's answers to check them
        texts = prompts[:batch]

        async def every_text(extra: dict, together: bool) -> tuple[list[dict], float]:
            """Every text completed, one at a time or all at once; and the wall seconds it took."""
            clock = Stopwatch()
            if together:
                rs = list(await asyncio.gather(*[complete(client, p, batch_tokens, extra) for p in texts]))
            else:
                rs = [await complete(client, p, batch_tokens, extra) for p in texts]
            return rs, clock.elapsed

        one, one_s = await every_text(lossless, together=False)
        many, many_s = await every_text(lossless, together=True)
        full, _ = await every_text({"exit_threshold": 1.0}, together=False)
        full_many, full_many_s = await every_text({"exit_threshold": 1.0}, together=True)
        full_one_s = sum(r["s"] for r in full)
        await client.close()
        out["batching"] = {
            "requests": batch, "tokens_each": batch_tokens,
            "one_at_a_time": {"wall_s": one_s, "tokens": sum(r["tokens"] for r in one),
                              "tokens_per_s": sum(r["tokens"] for r in one) / one_s},
            "concurrent": {"wall_s": many_s, "tokens": sum(r["tokens"] for r in many),
                           "tokens_per_s": sum(r["tokens"] for r in many) / many_s},
            "full_model_lossy_reference": {
                "one_at_a_time_tokens_per_s": sum(r["tokens"] for r in full) / full_one_s,
                "concurrent_tokens_per_s": sum(r["tokens"] for r in full_many) / full_many_s,
                "speedup": (sum(r["tokens"] for r in full_many) / full_many_s) / (sum(r["tokens"] for r in full) / full_one_s)},
            "equal_to_full_model": [a["text"] == f["text"] for a, f in zip(many, full)],
            "one_at_a_time_equal_to_full_model": [a["text"] == f["text"] for a, f in zip(one, full)],
        }
        return out

    load_before = load_average_1m()
    overrides = [f"serve.max_batch_size={max(batch, lossless_requests + 1)}", "serve.queue_size=16",
                 f"serve.max_new_tokens_cap={max(lossless_tokens, batch_tokens, probe_tokens)}",
                 "serve.request_timeout_s=600"]
    with _server(cfg, root, overrides) as srv:
        raw = asyncio.run(measure(srv.url))

    def med(rows: list, key: str) -> Optional[float]:
        return percentile([r[key] for r in rows if r[key] is not None], 50)

    alone_first, beside_first = med(raw["alone"], "first_chunk_s"), med(raw["beside_lossless"], "first_chunk_s")
    alone_gap, beside_gap = med(raw["alone"], "gap_p95_s"), med(raw["beside_lossless"], "gap_p95_s")
    lossy_first, lossy_gap = med(raw["beside_lossy"], "first_chunk_s"), med(raw["beside_lossy"], "gap_p95_s")
    b = raw["batching"]
    speedup = b["concurrent"]["tokens_per_s"] / b["one_at_a_time"]["tokens_per_s"]
    ratios = {"first_chunk": beside_first / alone_first if alone_first and beside_first else None,
              "gap_p95": beside_gap / alone_gap if alone_gap and beside_gap else None}
    result = {
        "what": (f"a streamed lossy probe ({probe_tokens} tokens, openai client) alone and beside {lossless_requests} "
                 f"lossless requests of {lossless_tokens} tokens ({repeats} tries each, medians); {batch} concurrent "
                 f"lossless requests of {batch_tokens} tokens vs one at a time, checked against the full model"),
        "run_dir": portable_path(root), "demo_run": bool(demo),
        "prompts": "prefixes of Python standard-library files cut at a seeded line/column (bench_prompts)",
        "no_stall": {"first_chunk_ms": {"alone": alone_first * 1e3 if alone_first else None,
                                        "beside_lossless": beside_first * 1e3 if beside_first else None},
                     "gap_p95_ms": {"alone": alone_gap * 1e3 if alone_gap else None,
                                    "beside_lossless": beside_gap * 1e3 if beside_gap else None},
                     "ratios": ratios,
                     "control_beside_lossy_full_model": {
                         "first_chunk_ms": lossy_first * 1e3 if lossy_first else None,
                         "gap_p95_ms": lossy_gap * 1e3 if lossy_gap else None,
                         "first_chunk_ratio": lossy_first / alone_first if lossy_first and alone_first else None,
                         "gap_p95_ratio": lossy_gap / alone_gap if lossy_gap and alone_gap else None},
                     "tries": {k: v for k, v in raw.items() if k != "batching"}},
        "lossless_batching": {**{k: v for k, v in b.items()}, "speedup": speedup},
        "targets": {
            "first_chunk_within_2x": ratios["first_chunk"] is not None and ratios["first_chunk"] <= 2.0,
            "gap_p95_within_2x": ratios["gap_p95"] is not None and ratios["gap_p95"] <= 2.0,
            "lossless_batch_speedup_2_5x": speedup >= 2.5,
            "every_lossless_answer_equals_full_model": all(b["equal_to_full_model"])
            and all(b["one_at_a_time_equal_to_full_model"]),
        },
        "load_average_1m": load_record(load_before),
    }
    write_result(out_path, result, cfg=cfg, stage="bench_serve_lossless", weights=_weights(root), meta_key="run")
    return result


def run_chunked_prefill(cfg, run_dir: Optional[Union[str, Path]] = None, *, budgets: Sequence[int] = (256, 4096),
                        probe_tokens: int = 64, joiners: int = 2, joiner_tokens: int = 4, repeats: int = 3,
                        out_path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """A running stream while long prompts keep joining, measured with the official ``openai``
    client: a streamed probe of ``probe_tokens`` tokens alone, then while ``joiners`` clients keep
    sending ~3,000-character prompts (``joiner_tokens`` tokens each, one after another); the probe's
    p95 gap between chunks and its ratio to alone (target: at most 3x), per ``serve.max_prefill_tokens``
    in ``budgets`` (the first the default; a budget above the prompts' length is the unchunked join).
    Written into ``results/benchmark/serve_load_<config name>.json`` as ``chunked_prefill``."""
    import asyncio

    import openai

    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    long_prompts = [p for p in bench_prompts(40, cfg.seed) if len(p) >= 2500][:10]
    probe_prompt = "def fibonacci(n):\n    "
    out_path = _result_path(cfg, out_path, "serve_load")

    async def probe(client) -> dict:
        clock = await _stream(client, probe_prompt, probe_tokens, {"exit_threshold": 1.0})
        gaps = clock.gaps()
        return {"chunks": len(clock.stamps), "gap_p95_s": percentile(gaps, 95), "gap_p50_s": percentile(gaps, 50)}

    async def measure(url: str) -> dict:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600.0)
        await probe(client)  # warm-up
        alone = [await probe(client) for _ in range(repeats)]
        beside, joined, stop = [], [0], asyncio.Event()

        async def joiner(k: int) -> None:
            i = k
            while not stop.is_set():
                await client.completions.create(model="greencode", prompt=long_prompts[i % len(long_prompts)],
                                                max_tokens=joiner_tokens, temperature=0,
                                                extra_body={"exit_threshold": 1.0})
                joined[0] += 1
                i += joiners

        tasks = [asyncio.create_task(joiner(k)) for k in range(joiners)]
        await asyncio.sleep(1.0)
        for _ in range(repeats):
            beside.append(await probe(client))
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()
        return {"alone": alone, "beside_joining_prompts": beside, "prompts_joined": joined[0]}

    results = {}
    for budget in budgets:
        overrides = [f"serve.max_prefill_tokens={int(budget)}", "serve.request_timeout_s=600",
                     f"serve.max_new_tokens_cap={max(probe_tokens, 16)}"]
        with _server(cfg, root, overrides) as srv:
            raw = asyncio.run(measure(srv.url))
        a = percentile([r["gap_p95_s"] for r in raw["alone"]], 50)
        b = percentile([r["gap_p95_s"] for r in raw["beside_joining_prompts"]], 50)
        results[f"max_prefill_tokens_{budget}"] = {"max_prefill_tokens": int(budget), "gap_p95_ms_alone": a * 1e3,
                                                   "gap_p95_ms_beside": b * 1e3, "ratio": b / a, **raw}
    return merge_result(out_path, cfg=cfg, stage="bench_serve_chunked_prefill", weights=_weights(root), chunked_prefill={
        "what": (f"a streamed probe ({probe_tokens} tokens, full model, openai client) alone and while {joiners} "
                 f"clients keep sending prompts of 2,500-3,000 characters ({joiner_tokens} tokens each); p95 gap "
                 f"between the probe's chunks, median of {repeats} tries; target: at most 3x alone"),
        "settings": results,
        "target_met_at_default": results[f"max_prefill_tokens_{budgets[0]}"]["ratio"] <= 3.0,
        "load_average_1m": load_average_1m(),
    })


def run_memory_soak(cfg, run_dir: Optional[Union[str, Path]] = None, *, requests: int = 2000, concurrency: int = 8,
                    max_new_tokens: int = 8, every: int = 200,
                    out_path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """``requests`` completions (every wire format in turn, some streamed, some lossless) from
    ``concurrency`` clients against a real server, its resident memory read from ``/proc`` every
    ``every`` requests: is it flat? Every answer must be 200 and complete. Written into
    ``results/benchmark/serve_load_<config name>.json`` as ``memory_soak``."""
    import asyncio

    import httpx

    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    prompts = [p[-600:] for p in bench_prompts(20, cfg.seed)]
    out_path = _result_path(cfg, out_path, "serve_load")

    def body(i: int) -> tuple[str, dict]:
        p = prompts[i % len(prompts)]
        kind = i % 4
        if kind == 0:
            return "/generate", {"inputs": p, "parameters": {"max_new_tokens": max_new_tokens}}
        if kind == 1:
            return "/v1/completions", {"prompt": p, "max_tokens": max_new_tokens, "temperature": 0,
                                       "stream": i % 8 == 1}
        if kind == 2:
            return "/api/generate", {"model": "greencode", "prompt": p, "stream": False,
                                     "options": {"num_predict": max_new_tokens}}
        return "/generate", {"inputs": p, "parameters": {"max_new_tokens": max_new_tokens, "mode": "lossless"}}

    def rss_mb(pid: int) -> Optional[float]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    async def soak(url: str, pid: int) -> dict:
        samples, codes, done = [{"requests": 0, "rss_mb": rss_mb(pid)}], {}, [0]
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600.0) as c:
            async def one(i: int) -> None:
                path, b = body(i)
                async with sem:
                    r = await c.post(path, json=b)
                codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
                done[0] += 1
                if done[0] % every == 0:
                    samples.append({"requests": done[0], "rss_mb": rss_mb(pid)})

            await asyncio.gather(*[one(i) for i in range(requests)])
            alive = (await c.get("/health")).status_code == 200 and (await c.get("/metrics")).status_code == 200
        return {"samples": samples, "status_counts": codes, "alive_after": alive}

    with _server(cfg, root, ["serve.request_timeout_s=600"]) as srv:
        raw, wall = timed(None, lambda: asyncio.run(soak(srv.url, srv.proc.pid)))
    rss = [s["rss_mb"] for s in raw["samples"] if s["rss_mb"] is not None]
    after_warm = rss[1:] if len(rss) > 2 else rss
    return merge_result(out_path, cfg=cfg, stage="bench_serve_memory", weights=_weights(root), memory_soak={
        "what": (f"{requests} requests (TGI, OpenAI plain and streamed, Ollama, lossless TGI in turn; {max_new_tokens} "
                 f"tokens, prompts of up to 600 characters) from {concurrency} clients; server RSS every {every}"),
        **raw, "wall_s": wall,
        "rss_mb_first_window": after_warm[0] if after_warm else None, "rss_mb_last": rss[-1] if rss else None,
        "rss_growth_after_first_window_mb": (rss[-1] - after_warm[0]) if after_warm else None,
        "all_200": set(raw["status_counts"]) == {"200"}, "load_average_1m": load_average_1m(),
    })


def run_fim_clients(cfg, run_dir: Optional[Union[str, Path]] = None, *, samples: int = 40, max_new_tokens: int = 48,
                    out_path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Editors' fill-in-the-middle requests against a real server, on held-out lines of the test split
    (the infilling slice's samples, :mod:`greencode.eval.infill`): llm-vscode's default body (StarCoder
    markers in ``inputs``, temperature 0.2), Continue's Ollama autocomplete body (``prompt`` + ``suffix``,
    raw, streamed), Mistral's ``/v1/fim/completions`` and the openai client's ``suffix`` (greedy), and the
    openai client without the suffix as the left-to-right control. Each answer's first line is scored
    against the held-out line (exact match, edit similarity). -> ``results/benchmark/serve_fim_<name>.json``."""
    import json as _json

    import httpx
    import openai
    from transformers import AutoTokenizer

    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    tok = AutoTokenizer.from_pretrained(str(root / "finetuned"))
    e = cfg.eval
    # the slice's own sample order (the first ``samples`` of the same seeded choice as results/<name>/infill)
    picked = make_infill_samples(load_corpus(cfg)[e.split], tok, num_samples=samples, seed=e.sample_seed,
                                 max_context_tokens=e.max_context_tokens, max_new_tokens=max_new_tokens,
                                 sep=text_sep(cfg), offset=e.sample_offset)
    out_path = _result_path(cfg, out_path, "serve_fim")
    full = {"RL_agent_thresh": 1.0}

    def first_line(text: str) -> str:
        return text.split("\n", 1)[0]

    rows: dict[str, list[dict]] = {k: [] for k in ("llm_vscode", "continue_ollama", "mistral_fim", "openai_suffix",
                                                   "openai_no_suffix")}
    with _server(cfg, root, ["serve.request_timeout_s=600"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=600.0) as http:
        oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="anything", max_retries=0)

        # each client's request for a sample -> (status, answer text, the server's greencode block)
        def llm_vscode(s) -> tuple:
            r = http.post("/models/greencode", json={
                "inputs": f"<fim_prefix>{s.prefix_text}<fim_suffix>{s.suffix_text}<fim_middle>",
                "parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95, "return_full_text": False}})
            j = r.json()
            j = j[0] if isinstance(j, list) else j
            return r.status_code, j.get("generated_text", ""), j.get("greencode", {})

        def continue_ollama(s) -> tuple:
            with http.stream("POST", "/api/generate", json={
                    "model": "greencode", "prompt": s.prefix_text, "suffix": s.suffix_text, "raw": True, "stream": True,
                    "keep_alive": 1800, "options": {"temperature": 0.01, "num_predict": max_new_tokens, "num_ctx": 1024,
                                                    "stop": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>",
                                                             "<|endoftext|>", "\n\n", "```"]}}) as resp:
                lines = [_json.loads(x) for x in resp.read().decode().split("\n") if x]
            return resp.status_code, "".join(x.get("response", "") for x in lines), lines[-1].get("greencode", {})

        def mistral_fim(s) -> tuple:
            r = http.post("/v1/fim/completions", json={"model": "greencode", "prompt": s.prefix_text,
                                                       "suffix": s.suffix_text, "max_tokens": max_new_tokens,
                                                       "temperature": 0, "stop": ["\n"], **full})
            j = r.json()
            return (r.status_code, j["choices"][0]["message"]["content"] if r.status_code == 200 else "",
                    j.get("greencode", {}))

        def openai_client(s, suffix: Optional[str]) -> tuple:
            res = oa.completions.create(model="greencode", prompt=s.prefix_text, suffix=suffix,
                                        max_tokens=max_new_tokens, temperature=0, stop=["\n"], extra_body=full)
            return 200, res.choices[0].text, res.model_extra["greencode"]

        clients = {"llm_vscode": llm_vscode, "continue_ollama": continue_ollama, "mistral_fim": mistral_fim,
                   "openai_suffix": lambda s: openai_client(s, s.suffix_text),
                   "openai_no_suffix": lambda s: openai_client(s, None)}
        for s in picked:
            for name, ask in clients.items():
                (status, text, stats), rtt = timed(None, lambda: ask(s))
                em, es = line_scores(first_line(text), s.reference)
                rows[name].append({"id": s.id, "status": status, "answer": text[:200], "reference": s.reference,
                                   "exact_match": em, "edit_similarity": es, "fim": bool(stats.get("fim")),
                                   "suffix_ignored": bool(stats.get("suffix_ignored")),
                                   "threshold": stats.get("threshold"), "rtt_s": rtt,
                                   "layers_skipped_share": stats.get("layers_skipped_share")})
        alive = http.get("/health").status_code == 200
    idx = bootstrap_indices(len(picked), 2000, cfg.seed)
    summary = {}
    for name, rs in rows.items():
        em = np.array([r["exact_match"] for r in rs])
        es = np.array([r["edit_similarity"] for r in rs])
        summary[name] = {"requests": len(rs), "all_200": all(r["status"] == 200 for r in rs),
                         "answered_as_fim": sum(r["fim"] for r in rs),
                         "answered_with_a_middle_line": sum(bool(first_line(r["answer"]).strip()) for r in rs),
                         "exact_match": dict(zip(("mean", "ci_low", "ci_high"), mean_ci(em, idx))),
                         **_exact_match_without_boilerplate(rs, cfg.seed),
                         "edit_similarity": dict(zip(("mean", "ci_low", "ci_high"), mean_ci(es, idx))),
                         "rtt_ms": percentiles([r["rtt_s"] for r in rs], 1e3)}
    d = np.array([a["exact_match"] - b["exact_match"] for a, b in zip(rows["openai_suffix"], rows["openai_no_suffix"])])
    result = {"what": (f"{len(picked)} held-out lines of the {e.split} split (the infilling slice's first samples), each "
                       "sent as editors send fill-in-the-middle requests; answers' first lines scored against the line"),
              "clients": {"llm_vscode": "POST /models/greencode, StarCoder markers in inputs, llm-vscode's default "
                                        "requestBody (max_new_tokens 60, temperature 0.2, top_p 0.95), server default knob",
                          "continue_ollama": "POST /api/generate, prompt + suffix, raw, streamed NDJSON, temperature 0.01, "
                                             "server default knob",
                          "mistral_fim": "POST /v1/fim/completions, greedy, full model",
                          "openai_suffix": "openai client completions.create(suffix=...), greedy, full model",
                          "openai_no_suffix": "the same without the suffix (left-to-right control)"},
              "summary": summary,
              "exact_match_suffix_minus_no_suffix": dict(zip(("mean", "ci_low", "ci_high"), mean_ci(d, idx))),
              "health_after": alive, "records": rows, "load_average_1m": load_average_1m()}
    write_result(out_path, result, cfg=cfg, stage="bench_serve_fim", weights=_weights(root), meta_key="run")
    return result
