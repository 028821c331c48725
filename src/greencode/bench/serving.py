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

import asyncio
import contextlib
import json
import logging
import random
import sysconfig
import tempfile
from collections import Counter
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
# what the latency benchmark keeps of the server's ``GET /health``
SERVER_INFO = ("family", "num_layers", "exit_layers", "device", "dtype", "serving", "policy_loaded", "energy_source",
               "kv_strategy", "prompt_format", "policy_temperature")
PROMPTS_NOTE = "prefixes of Python standard-library files cut at a seeded line/column (bench_prompts)"
# the editors' fill-in-the-middle clients of run_fim_clients, in the order each sample is sent
FIM_CLIENTS = {"llm_vscode": "POST /models/greencode, StarCoder markers in inputs, llm-vscode's default "
                             "requestBody (max_new_tokens 60, temperature 0.2, top_p 0.95), server default knob",
               "continue_ollama": "POST /api/generate, prompt + suffix, raw, streamed NDJSON, temperature 0.01, "
                                  "server default knob",
               "mistral_fim": "POST /v1/fim/completions, greedy, full model",
               "openai_suffix": "openai client completions.create(suffix=...), greedy, full model",
               "openai_no_suffix": "the same without the suffix (left-to-right control)"}


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


def _ci(values: np.ndarray, idx) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high"}``: the mean of ``values`` and its 95% CI over the bootstrap
    resamples ``idx`` (greencode.eval.stats.mean_ci)."""
    return dict(zip(("mean", "ci_low", "ci_high"), mean_ci(values, idx)))


def _exact_match_without_boilerplate(rows: list[dict], seed: int) -> dict[str, Any]:
    """The share of the exact matches on boilerplate reference lines (licence headers, blank:
    greencode.eval.metrics.is_boilerplate) and exact match on the other lines, with its 95% CI."""
    flags = [is_boilerplate(r["reference"]) for r in rows]
    b = exact_match_breakdown([r["exact_match"] for r in rows], flags)
    rest = np.array([r["exact_match"] for r, f in zip(rows, flags) if not f], dtype=float)
    return {"exact_match_boilerplate_share": b["exact_match_boilerplate_share"],
            "exact_match_no_boilerplate": _ci(rest, bootstrap_indices(len(rest), 2000, seed)) if len(rest) else None,
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


def _benchmark_settings(thresholds: Sequence[float]) -> list[tuple[str, float]]:
    """The latency benchmark's settings as (name, threshold): the full model first, then each
    threshold below it (``threshold_<t>``). A threshold outside [0, 1] raises ValueError."""
    from greencode.serve.engine import FULL_MODEL_THRESHOLD

    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold {t} is outside [0, 1]")
    return [("full_model", FULL_MODEL_THRESHOLD)] + [(f"threshold_{t:g}", float(t)) for t in thresholds
                                                     if t < FULL_MODEL_THRESHOLD]


def _ask(client, prompt: str, threshold: float, n_new: int) -> dict:
    """One greedy ``/api/generate`` request at ``threshold``. Returns the client's round trip
    (``rtt_s``) and the server's own numbers (:data:`SERVER_STATS`); a status other than 200 raises
    RuntimeError."""
    body = {"inputs": prompt, "options": {"num_predict": n_new, "temperature": 0, "RL_agent_thresh": threshold}}
    clock = Stopwatch()
    r = client.post("/api/generate", json=body)
    rtt = clock.elapsed
    if r.status_code != 200:
        raise RuntimeError(f"benchmark request failed with {r.status_code}: {r.text[:500]}")
    s = r.json()["greencode"]
    return {"rtt_s": rtt, **{k: s[k] for k in SERVER_STATS}}


def _latency_rows(client, prompts: list[str], settings: list[tuple[str, float]], n_new: int,
                  warmup: int) -> tuple[dict[str, list[dict]], list[float], float]:
    """``warmup`` rounds (dropped), then every setting asked in turn per prompt, a ``GET /health``
    after each prompt. Returns the rows per setting (:func:`_ask`), the health round trips and the
    wall seconds of the measured rounds."""
    for i in range(warmup):
        for _, thr in settings:
            _ask(client, prompts[i % len(prompts)], thr, n_new)
    rows: dict[str, list[dict]] = {name: [] for name, _ in settings}
    health_rtt = []
    total = Stopwatch()
    for i, prompt in enumerate(prompts):
        for name, thr in settings:
            rows[name].append(_ask(client, prompt, thr, n_new))
        clock = Stopwatch()
        client.get("/health")
        health_rtt.append(clock.elapsed)
        log.info("benchmark: prompt %d/%d done", i + 1, len(prompts))
    return rows, health_rtt, total.elapsed


def _setting_summaries(rows: dict[str, list[dict]], settings: list[tuple[str, float]],
                       num_layers: int) -> dict[str, dict]:
    """Per setting: its threshold, the :func:`_summary` of its rows and its generation speed-up
    over the full model (ratio of the p50s; None where its p50 is zero or missing)."""
    summaries = {name: {"threshold": thr, **_summary(rows[name], num_layers)} for name, thr in settings}
    full_p50 = summaries["full_model"]["generation_ms"]["p50"]
    for s in summaries.values():
        p50 = s["generation_ms"]["p50"]
        s["generation_speedup_vs_full_p50"] = (full_p50 / p50) if p50 else None
    return summaries


def run_benchmark(cfg, run_dir: Optional[Union[str, Path]] = None, *, num_requests: int = 20,
                  thresholds: Optional[Sequence[float]] = None, max_new_tokens: Optional[int] = None,
                  warmup: int = 3, out_path: Optional[Union[str, Path]] = None, demo: bool = False,
                  prompt_chars: int = 3000) -> dict[str, Any]:
    """Benchmark the endpoint serving ``run_dir`` (default: the config's run); writes
    ``results/benchmark/serve_<config name>.json`` (or ``out_path``) and returns the result.
    ``prompt_chars``: the most characters of a prompt (an editor sends the file up to the cursor)."""
    import httpx

    from greencode.serve.engine import run_root

    _quiet_clients()
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    settings = _benchmark_settings(list(cfg.eval.gc_thresholds if thresholds is None else thresholds))
    n_new = int(max_new_tokens or cfg.eval.max_new_tokens)
    root = run_root(cfg, run_dir)
    if prompt_chars < 1:
        raise ValueError(f"prompt_chars={prompt_chars} must be >= 1")
    prompts = bench_prompts(num_requests, cfg.seed, max_chars=prompt_chars)
    out_path = _result_path(cfg, out_path, "serve")

    load_before = load_average_1m()
    with _server(cfg, root, []) as srv, \
            httpx.Client(base_url=srv.url, timeout=max(60.0, cfg.serve.request_timeout_s + 10)) as client:
        health = client.get("/health").json()
        num_layers = int(health["num_layers"])
        rows, health_rtt, wall_s = _latency_rows(client, prompts, settings, n_new, warmup)

    overhead = percentiles([r["rtt_s"] - r["generation_s"] for v in rows.values() for r in v], 1e3)
    result = {
        "what": "endpoint latency per setting (full model = threshold 1.0) and the server's overhead per request",
        "run_dir": str(root),
        "demo_run": bool(demo),
        "server": {k: health.get(k) for k in SERVER_INFO},
        "requests_per_setting": num_requests,
        "max_new_tokens": n_new,
        "format": "seed (/api/generate with inputs + options), greedy",
        "prompts": PROMPTS_NOTE,
        "prompt_chars": {"max": prompt_chars, "median": int(np.median([len(p) for p in prompts]))},
        "settings": _setting_summaries(rows, settings, num_layers),
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


# --------------------------------------------------------------------------- streamed completions (openai client)
def _async_openai(url: str):
    """An ``openai.AsyncOpenAI`` client of the server at ``url`` (no retries, 600 s timeout)."""
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600.0)


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


# --------------------------------------------------------------------------- concurrent streaming clients
async def _one_stream(client, prompt: str, tokens: int, extra: dict) -> dict:
    """One streamed completion (:func:`_stream`). Returns ``ok``, the seconds to its first chunk and
    to its end and its chunk count; a failure is recorded (``ok: False`` and the error), not raised."""
    clock = Stopwatch()
    try:
        await _stream(client, prompt, tokens, extra, clock)
        first = clock.stamps[0] if clock.stamps else None
        return {"ok": True, "first_chunk_s": first, "total_s": clock.elapsed, "chunks": len(clock.stamps)}
    except Exception as e:  # noqa: BLE001 - recorded: the target is that none fails
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}", "total_s": clock.elapsed}


async def _stream_clients(url: str, prompts: list[str], tokens: int) -> tuple[list[dict], float]:
    """Every prompt streamed at once (the full model), one coroutine each, through one
    ``openai.AsyncOpenAI`` client. Returns each one's :func:`_one_stream` row and the wall seconds."""
    extra = {"exit_threshold": 1.0}  # the full model: the comparison is about batching, not exits
    client = _async_openai(url)
    clock = Stopwatch()
    rows = await asyncio.gather(*[_one_stream(client, p, tokens, extra) for p in prompts])
    wall = clock.elapsed
    await client.close()
    return list(rows), wall


def _lone_request(client, prompt: str, tokens: int) -> dict:
    """The server's ``greencode`` block of a lone full-model request (sent twice; the second is kept)."""
    lone = None
    for _ in range(2):
        lone = client.post("/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": tokens, "RL_agent_thresh": 1.0}}).json()["greencode"]
    return lone


def _load_setting(cfg, root: Path, prompts: list[str], batch_size: int, tokens: int) -> dict:
    """One ``serve.max_batch_size``: a server with it and room for every client, a lone request
    (the server's own prefill and step times), then every prompt streamed at once. Returns the
    setting's record (served count, first-chunk and total latency, tokens/s, the lone request)."""
    import httpx

    clients = len(prompts)
    overrides = [f"serve.max_batch_size={int(batch_size)}", f"serve.queue_size={max(clients, 8)}",
                 f"serve.max_new_tokens_cap={max(tokens, 16)}", "serve.request_timeout_s=600"]
    with _server(cfg, root, overrides) as srv, httpx.Client(base_url=srv.url, timeout=120.0) as c:
        lone = _lone_request(c, prompts[0], tokens)
        step_s = lone["decode_s"] / max(1, lone["decode_steps"])
        rows, wall = asyncio.run(_stream_clients(srv.url, prompts, tokens))
    served = [r for r in rows if r["ok"]]
    firsts = [r["first_chunk_s"] for r in served if r["first_chunk_s"] is not None]
    record = {
        "max_batch_size": int(batch_size), "clients": clients, "served": len(served),
        "all_served": len(served) == clients,
        "errors": [r["error"] for r in rows if not r["ok"]][:5],
        "first_chunk_ms": percentiles(firsts, 1e3), "total_ms": percentiles([r["total_s"] for r in served], 1e3),
        "wall_s": wall, "tokens_per_s": len(served) * tokens / wall if wall else None,
        "lone_request": {"prefill_ms": lone["prefill_s"] * 1e3, "decode_step_ms": step_s * 1e3,
                         "prefill_plus_one_step_ms": (lone["prefill_s"] + step_s) * 1e3,
                         "generation_ms": lone["generation_s"] * 1e3},
    }
    log.info("load: max_batch_size=%s: %d/%d served, first chunk p50 %.0f ms, wall %.1f s", batch_size,
             len(served), clients, record["first_chunk_ms"]["p50"] or -1, wall)
    return record


class _Burst:
    """``requests`` simultaneous non-streamed ``tokens``-token completions of one prompt against a
    server with the configured admission (deadline-based) and ``serve.max_batch_size=batch_size``
    (:meth:`run`)."""

    def __init__(self, prompt: str, requests: int, tokens: int, batch_size: int):
        self.requests, self.tokens, self.batch_size = requests, tokens, batch_size
        self.body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens}}

    def run(self, cfg, root: Path) -> dict:
        """The burst against a fresh server of ``root``. Returns its record (:meth:`summary`)."""
        # the server's own admission (serve.* as configured, batch of batch_size): deadlines, not a count
        overrides = [f"serve.max_batch_size={int(self.batch_size)}", f"serve.max_new_tokens_cap={max(self.tokens, 16)}"]
        with _server(cfg, root, overrides) as srv:
            answers, alive, metrics_ok = asyncio.run(self._send(srv.url))
        return self.summary(answers, alive, metrics_ok, float(cfg.serve.request_timeout_s))

    async def _send(self, url: str) -> tuple[list[tuple[Any, float]], bool, bool]:
        """A warm-up batch (so the server has measured its drain rate at that size), then the burst.
        Returns each request's (response or exception, seconds) and whether ``/health`` and
        ``/metrics`` answered 200 afterwards."""
        import httpx

        async with httpx.AsyncClient(base_url=url, timeout=600.0,
                                     limits=httpx.Limits(max_connections=self.requests + 10)) as c:
            for r in await asyncio.gather(*[c.post("/generate", json=self.body) for _ in range(self.batch_size)]):
                r.raise_for_status()
            answers = await asyncio.gather(*[self._timed_post(c) for _ in range(self.requests)])
            alive = (await c.get("/health")).status_code == 200
            metrics_ok = (await c.get("/metrics")).status_code == 200
        return list(answers), alive, metrics_ok

    async def _timed_post(self, client) -> tuple[Any, float]:
        """One request of the burst: its response (or the exception it raised) and its seconds."""
        clock = Stopwatch()
        try:
            r = await client.post("/generate", json=self.body)
            return r, clock.elapsed
        except Exception as e:  # noqa: BLE001 - recorded: the target is that none fails
            return e, clock.elapsed

    def summary(self, answers: list[tuple[Any, float]], alive: bool, metrics_ok: bool, timeout_s: float) -> dict:
        """The burst's record: counts per status, whether every answer was JSON, every 503 had
        ``Retry-After``, every served answer was complete and within ``timeout_s``; latency of the
        served and the refused, the first refusal messages, the server alive afterwards."""
        codes: Counter = Counter()
        json_ok = retry_after_ok = complete = True
        served_s, refused_s, retry_after, messages = [], [], [], []
        for r, dt in answers:
            if isinstance(r, Exception):
                codes[type(r).__name__] += 1
                json_ok = False
                continue
            codes[str(r.status_code)] += 1
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
        return {"requests": self.requests, "max_new_tokens": self.tokens, "request_timeout_s": timeout_s,
                "status_counts": dict(codes), "all_json": json_ok, "every_503_has_retry_after": retry_after_ok,
                "server_alive_after": alive, "metrics_answered_after": metrics_ok, "served": len(served_s),
                "refused": len(refused_s), "served_latency_s": percentiles(served_s),
                "refused_latency_s": percentiles(refused_s), "retry_after_s": percentiles(retry_after),
                "refusal_messages": messages, "every_served_within_deadline": all(t <= timeout_s for t in served_s),
                "every_served_answer_complete": complete}


def _merge_burst(cfg, root: Path, out_path: Path, burst: Optional[dict], load_before: Optional[float]) -> dict:
    """``burst`` written into the existing load result at ``out_path`` (its previous burst kept as
    ``burst_previous``) with its run record and load average. Returns the whole result."""
    previous = (read_json(out_path) if out_path.is_file() else {}).get("burst")
    kept = {"burst_previous": previous} if previous is not None else {}
    return merge_result(out_path, **kept, burst=burst, burst_run=run_record(cfg, "bench_serve_burst", _weights(root)),
                        burst_load_average_1m=load_record(load_before))


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
    from greencode.serve.engine import run_root

    _quiet_clients()
    if clients < 1 or burst < 0 or max_new_tokens < 1:
        raise ValueError(f"clients={clients} (>= 1), burst={burst} (>= 0), max_new_tokens={max_new_tokens} (>= 1)")
    root = run_root(cfg, run_dir)
    prompts = bench_prompts(clients, cfg.seed)
    out_path = _result_path(cfg, out_path, "serve_load")

    load_before = load_average_1m()
    settings: dict[str, Any] = {f"max_batch_size_{b}": _load_setting(cfg, root, prompts, b, max_new_tokens)
                                for b in ([] if burst_only else batch_sizes)}
    burst_result = _Burst(prompts[0], burst, burst_tokens, burst_batch_size).run(cfg, root) if burst else None
    if burst_only:
        return _merge_burst(cfg, root, out_path, burst_result, load_before)
    result = {
        "what": f"{clients} concurrent streaming clients (openai.AsyncOpenAI, SSE, greedy, full model, "
                f"{max_new_tokens} tokens each) per serve.max_batch_size; then {burst} simultaneous requests",
        "run_dir": str(root), "demo_run": bool(demo),
        "prompts": PROMPTS_NOTE,
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
def _median_of(rows: list[dict], key: str) -> Optional[float]:
    """The median of the rows' ``key`` where not None; None for none."""
    return percentile([r[key] for r in rows if r[key] is not None], 50)


def _ms(seconds: Optional[float]) -> Optional[float]:
    """``seconds`` in milliseconds; None where missing (or zero)."""
    return seconds * 1e3 if seconds else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``; None where either is missing (or zero)."""
    return a / b if a and b else None


def _throughput(rows: list[dict], seconds: float) -> dict[str, float]:
    """The wall ``seconds`` of completions ``rows``, their tokens and the tokens per second."""
    tokens = sum(r["tokens"] for r in rows)
    return {"wall_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


class _LosslessMix:
    """The requests of :func:`run_lossless_mix` through one ``openai.AsyncOpenAI`` client
    (:meth:`measure`): a streamed lossy probe alone and beside background requests, and the
    lossless batching."""

    def __init__(self, prompts: list[str], *, lossless_requests: int, lossless_tokens: int, probe_tokens: int,
                 batch: int, batch_tokens: int, repeats: int):
        self.prompts, self.lossless_requests, self.lossless_tokens = prompts, lossless_requests, lossless_tokens
        self.probe_tokens, self.batch, self.batch_tokens, self.repeats = probe_tokens, batch, batch_tokens, repeats
        self.lossless = {"mode": "lossless"}
        self.client = None

    async def measure(self, url: str) -> dict:
        """Every measurement against the server at ``url``. Returns the probe's rows per key
        (``alone``, ``beside_lossless``, ``beside_lossy``) and the ``batching`` record."""
        self.client = _async_openai(url)
        out: dict[str, Any] = await self._no_stall()
        batching = await self._batching()
        await self.client.close()
        out["batching"] = batching
        return out

    async def _probe(self, prompt: str) -> dict:
        """A streamed lossy probe. Returns the seconds to its first chunk, its chunk count and its
        p95 gap between chunks."""
        clock = await _stream(self.client, prompt, self.probe_tokens)
        return {"first_chunk_s": clock.stamps[0] if clock.stamps else None, "chunks": len(clock.stamps),
                "gap_p95_s": percentile(clock.gaps(), 95)}

    async def _complete(self, prompt: str, tokens: int, extra: dict) -> dict:
        """A non-streamed greedy completion. Returns its text, its token count and its seconds."""
        clock = Stopwatch()
        r = await self.client.completions.create(model="greencode", prompt=prompt, max_tokens=tokens, temperature=0,
                                                 extra_body=extra)
        return {"text": r.choices[0].text, "tokens": r.usage.completion_tokens, "s": clock.elapsed}

    async def _no_stall(self) -> dict[str, list[dict]]:
        """After a warm-up probe, ``repeats`` tries of the probe alone, beside lossless requests and
        (the control) beside the same requests in lossy mode with the full model. Returns the rows
        per key."""
        out: dict[str, list[dict]] = {"alone": [], "beside_lossless": [], "beside_lossy": []}
        await self._probe(self.prompts[0])  # warm-up
        for k in range(self.repeats):
            probe = self.prompts[self.batch + k] if self.batch + k < len(self.prompts) else self.prompts[k]
            out["alone"].append(await self._probe(probe))
            # beside lossless requests, then (the control) beside the same requests in lossy mode with the full
            # model: what three more rows in the batch cost anyway
            for key, extra in (("beside_lossless", self.lossless), ("beside_lossy", {"exit_threshold": 1.0})):
                out[key].append(await self._beside(probe, extra))
        return out

    async def _beside(self, probe: str, extra: dict) -> dict:
        """The probe while ``lossless_requests`` background requests (``extra``: their mode) decode.
        Returns its row with how many were in flight at its start and end and their token counts."""
        background = [asyncio.create_task(self._complete(self.prompts[i], self.lossless_tokens, extra))
                      for i in range(self.lossless_requests)]
        await asyncio.sleep(0.5)  # the background requests are prefilled and decoding
        running = sum(not t.done() for t in background)
        row = await self._probe(probe)
        row["background_in_flight_at_start"] = running
        row["background_in_flight_at_end"] = sum(not t.done() for t in background)
        done = await asyncio.gather(*background)
        row["background_tokens"] = [d["tokens"] for d in done]
        return row

    async def _every_text(self, extra: dict, together: bool) -> tuple[list[dict], float]:
        """Every text completed, one at a time or all at once; and the wall seconds it took."""
        texts = self.prompts[:self.batch]
        clock = Stopwatch()
        if together:
            rs = list(await asyncio.gather(*[self._complete(p, self.batch_tokens, extra) for p in texts]))
        else:
            rs = [await self._complete(p, self.batch_tokens, extra) for p in texts]
        return rs, clock.elapsed

    async def _batching(self) -> dict:
        """Lossless batching: the texts one at a time, then all at once, and the full model's (lossy)
        answers the same two ways. Returns tokens/s of each and every answer checked against the
        full model's."""
        one, one_s = await self._every_text(self.lossless, together=False)
        many, many_s = await self._every_text(self.lossless, together=True)
        full, _ = await self._every_text({"exit_threshold": 1.0}, together=False)
        full_many, full_many_s = await self._every_text({"exit_threshold": 1.0}, together=True)
        full_one = _throughput(full, sum(r["s"] for r in full))["tokens_per_s"]
        full_concurrent = _throughput(full_many, full_many_s)["tokens_per_s"]
        return {
            "requests": self.batch, "tokens_each": self.batch_tokens,
            "one_at_a_time": _throughput(one, one_s),
            "concurrent": _throughput(many, many_s),
            "full_model_lossy_reference": {"one_at_a_time_tokens_per_s": full_one,
                                           "concurrent_tokens_per_s": full_concurrent,
                                           "speedup": full_concurrent / full_one},
            "equal_to_full_model": [a["text"] == f["text"] for a, f in zip(many, full)],
            "one_at_a_time_equal_to_full_model": [a["text"] == f["text"] for a, f in zip(one, full)],
        }


def _no_stall_section(raw: dict) -> dict:
    """The lossless mix's ``no_stall`` record: the probe's medians (first chunk, p95 gap) alone,
    beside lossless requests and beside lossy full-model ones, their ratios to alone, every try."""
    alone, lossless, lossy = raw["alone"], raw["beside_lossless"], raw["beside_lossy"]
    alone_first, beside_first = _median_of(alone, "first_chunk_s"), _median_of(lossless, "first_chunk_s")
    alone_gap, beside_gap = _median_of(alone, "gap_p95_s"), _median_of(lossless, "gap_p95_s")
    lossy_first, lossy_gap = _median_of(lossy, "first_chunk_s"), _median_of(lossy, "gap_p95_s")
    return {"first_chunk_ms": {"alone": _ms(alone_first), "beside_lossless": _ms(beside_first)},
            "gap_p95_ms": {"alone": _ms(alone_gap), "beside_lossless": _ms(beside_gap)},
            "ratios": {"first_chunk": _ratio(beside_first, alone_first), "gap_p95": _ratio(beside_gap, alone_gap)},
            "control_beside_lossy_full_model": {
                "first_chunk_ms": _ms(lossy_first), "gap_p95_ms": _ms(lossy_gap),
                "first_chunk_ratio": _ratio(lossy_first, alone_first), "gap_p95_ratio": _ratio(lossy_gap, alone_gap)},
            "tries": {k: v for k, v in raw.items() if k != "batching"}}


def _lossless_targets(ratios: dict, batching: dict, speedup: float) -> dict[str, bool]:
    """The lossless mix's targets: the probe's first chunk and p95 gap beside lossless requests
    within 2x of alone, lossless batching at least 2.5x one at a time, every lossless answer equal
    to the full model's."""
    return {
        "first_chunk_within_2x": ratios["first_chunk"] is not None and ratios["first_chunk"] <= 2.0,
        "gap_p95_within_2x": ratios["gap_p95"] is not None and ratios["gap_p95"] <= 2.0,
        "lossless_batch_speedup_2_5x": speedup >= 2.5,
        "every_lossless_answer_equals_full_model": all(batching["equal_to_full_model"])
        and all(batching["one_at_a_time_equal_to_full_model"]),
    }


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
    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    prompts = bench_prompts(max(batch, lossless_requests) + repeats, cfg.seed)
    out_path = _result_path(cfg, out_path, "serve_lossless")
    mix = _LosslessMix(prompts, lossless_requests=lossless_requests, lossless_tokens=lossless_tokens,
                       probe_tokens=probe_tokens, batch=batch, batch_tokens=batch_tokens, repeats=repeats)

    load_before = load_average_1m()
    overrides = [f"serve.max_batch_size={max(batch, lossless_requests + 1)}", "serve.queue_size=16",
                 f"serve.max_new_tokens_cap={max(lossless_tokens, batch_tokens, probe_tokens)}",
                 "serve.request_timeout_s=600"]
    with _server(cfg, root, overrides) as srv:
        raw = asyncio.run(mix.measure(srv.url))
    no_stall, b = _no_stall_section(raw), raw["batching"]
    speedup = b["concurrent"]["tokens_per_s"] / b["one_at_a_time"]["tokens_per_s"]
    result = {
        "what": (f"a streamed lossy probe ({probe_tokens} tokens, openai client) alone and beside {lossless_requests} "
                 f"lossless requests of {lossless_tokens} tokens ({repeats} tries each, medians); {batch} concurrent "
                 f"lossless requests of {batch_tokens} tokens vs one at a time, checked against the full model"),
        "run_dir": portable_path(root), "demo_run": bool(demo),
        "prompts": PROMPTS_NOTE,
        "no_stall": no_stall,
        "lossless_batching": {**b, "speedup": speedup},
        "targets": _lossless_targets(no_stall["ratios"], b, speedup),
        "load_average_1m": load_record(load_before),
    }
    write_result(out_path, result, cfg=cfg, stage="bench_serve_lossless", weights=_weights(root), meta_key="run")
    return result


# --------------------------------------------------------------------------- long prompts joining a running stream
class _JoiningPrompts:
    """A streamed full-model probe alone and while ``joiners`` clients keep sending long prompts,
    one after another (:meth:`measure`), through one ``openai.AsyncOpenAI`` client."""

    PROBE_PROMPT = "def fibonacci(n):\n    "

    def __init__(self, long_prompts: list[str], *, probe_tokens: int, joiners: int, joiner_tokens: int,
                 repeats: int):
        self.long_prompts, self.probe_tokens, self.repeats = long_prompts, probe_tokens, repeats
        self.joiners, self.joiner_tokens = joiners, joiner_tokens
        self.client, self.joined = None, 0

    async def measure(self, url: str) -> dict:
        """After a warm-up probe, ``repeats`` probes alone, then as many while the joiners run.
        Returns both lists of probe rows (:meth:`_probe`) and how many long prompts were answered."""
        self.client, self.joined = _async_openai(url), 0
        await self._probe()  # warm-up
        alone = [await self._probe() for _ in range(self.repeats)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._joiner(k, stop)) for k in range(self.joiners)]
        await asyncio.sleep(1.0)
        beside = [await self._probe() for _ in range(self.repeats)]
        stop.set()
        await asyncio.gather(*tasks)
        await self.client.close()
        return {"alone": alone, "beside_joining_prompts": beside, "prompts_joined": self.joined}

    async def _probe(self) -> dict:
        """The streamed probe. Returns its chunk count and its p95 and p50 gaps between chunks."""
        clock = await _stream(self.client, self.PROBE_PROMPT, self.probe_tokens, {"exit_threshold": 1.0})
        gaps = clock.gaps()
        return {"chunks": len(clock.stamps), "gap_p95_s": percentile(gaps, 95), "gap_p50_s": percentile(gaps, 50)}

    async def _joiner(self, k: int, stop: asyncio.Event) -> None:
        """Client ``k``: every ``joiners``-th long prompt from the ``k``-th on, one after another,
        until ``stop`` (each answer counted in :attr:`joined`); returns nothing."""
        i = k
        while not stop.is_set():
            await self.client.completions.create(model="greencode",
                                                 prompt=self.long_prompts[i % len(self.long_prompts)],
                                                 max_tokens=self.joiner_tokens, temperature=0,
                                                 extra_body={"exit_threshold": 1.0})
            self.joined += 1
            i += self.joiners


def _chunked_setting(budget: int, raw: dict) -> dict:
    """One prefill budget's record: the probe's p95 gap (the median over tries) alone and beside
    the joining prompts, their ratio, and the raw tries."""
    a = percentile([r["gap_p95_s"] for r in raw["alone"]], 50)
    b = percentile([r["gap_p95_s"] for r in raw["beside_joining_prompts"]], 50)
    return {"max_prefill_tokens": int(budget), "gap_p95_ms_alone": a * 1e3, "gap_p95_ms_beside": b * 1e3,
            "ratio": b / a, **raw}


def run_chunked_prefill(cfg, run_dir: Optional[Union[str, Path]] = None, *, budgets: Sequence[int] = (256, 4096),
                        probe_tokens: int = 64, joiners: int = 2, joiner_tokens: int = 4, repeats: int = 3,
                        out_path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """A running stream while long prompts keep joining, measured with the official ``openai``
    client: a streamed probe of ``probe_tokens`` tokens alone, then while ``joiners`` clients keep
    sending ~3,000-character prompts (``joiner_tokens`` tokens each, one after another); the probe's
    p95 gap between chunks and its ratio to alone (target: at most 3x), per ``serve.max_prefill_tokens``
    in ``budgets`` (the first the default; a budget above the prompts' length is the unchunked join).
    Written into ``results/benchmark/serve_load_<config name>.json`` as ``chunked_prefill``."""
    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    long_prompts = [p for p in bench_prompts(40, cfg.seed) if len(p) >= 2500][:10]
    out_path = _result_path(cfg, out_path, "serve_load")
    joining = _JoiningPrompts(long_prompts, probe_tokens=probe_tokens, joiners=joiners, joiner_tokens=joiner_tokens,
                              repeats=repeats)

    results = {}
    for budget in budgets:
        overrides = [f"serve.max_prefill_tokens={int(budget)}", "serve.request_timeout_s=600",
                     f"serve.max_new_tokens_cap={max(probe_tokens, 16)}"]
        with _server(cfg, root, overrides) as srv:
            raw = asyncio.run(joining.measure(srv.url))
        results[f"max_prefill_tokens_{budget}"] = _chunked_setting(budget, raw)
    section = {
        "what": (f"a streamed probe ({probe_tokens} tokens, full model, openai client) alone and while {joiners} "
                 f"clients keep sending prompts of 2,500-3,000 characters ({joiner_tokens} tokens each); p95 gap "
                 f"between the probe's chunks, median of {repeats} tries; target: at most 3x alone"),
        "settings": results,
        "target_met_at_default": results[f"max_prefill_tokens_{budgets[0]}"]["ratio"] <= 3.0,
        "load_average_1m": load_average_1m(),
    }
    return merge_result(out_path, cfg=cfg, stage="bench_serve_chunked_prefill", weights=_weights(root),
                        chunked_prefill=section)


# --------------------------------------------------------------------------- the server's memory over many requests
def _soak_request(i: int, prompts: list[str], tokens: int) -> tuple[str, dict]:
    """Request ``i`` of the memory soak as (path, body): every wire format in turn (TGI, OpenAI
    plain or streamed, Ollama, lossless TGI) for ``tokens`` tokens."""
    p = prompts[i % len(prompts)]
    kind = i % 4
    if kind == 0:
        return "/generate", {"inputs": p, "parameters": {"max_new_tokens": tokens}}
    if kind == 1:
        return "/v1/completions", {"prompt": p, "max_tokens": tokens, "temperature": 0, "stream": i % 8 == 1}
    if kind == 2:
        return "/api/generate", {"model": "greencode", "prompt": p, "stream": False,
                                 "options": {"num_predict": tokens}}
    return "/generate", {"inputs": p, "parameters": {"max_new_tokens": tokens, "mode": "lossless"}}


def _rss_mb(pid: int) -> Optional[float]:
    """The resident memory of process ``pid`` in MB (``VmRSS`` of ``/proc/<pid>/status``); None
    where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _soak(url: str, pid: int, prompts: list[str], *, requests: int, concurrency: int, tokens: int,
                every: int) -> dict:
    """``requests`` soak requests (:func:`_soak_request`) from ``concurrency`` clients against the
    server at ``url`` (process ``pid``). Returns its RSS before and every ``every`` answers, the
    count per status, and whether ``/health`` and ``/metrics`` answered 200 afterwards."""
    import httpx

    samples, codes, done = [{"requests": 0, "rss_mb": _rss_mb(pid)}], Counter(), [0]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as c:
        async def one(i: int) -> None:
            path, b = _soak_request(i, prompts, tokens)
            async with sem:
                r = await c.post(path, json=b)
            codes[str(r.status_code)] += 1
            done[0] += 1
            if done[0] % every == 0:
                samples.append({"requests": done[0], "rss_mb": _rss_mb(pid)})

        await asyncio.gather(*[one(i) for i in range(requests)])
        alive = (await c.get("/health")).status_code == 200 and (await c.get("/metrics")).status_code == 200
    return {"samples": samples, "status_counts": dict(codes), "alive_after": alive}


def run_memory_soak(cfg, run_dir: Optional[Union[str, Path]] = None, *, requests: int = 2000, concurrency: int = 8,
                    max_new_tokens: int = 8, every: int = 200,
                    out_path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """``requests`` completions (every wire format in turn, some streamed, some lossless) from
    ``concurrency`` clients against a real server, its resident memory read from ``/proc`` every
    ``every`` requests: is it flat? Every answer must be 200 and complete. Written into
    ``results/benchmark/serve_load_<config name>.json`` as ``memory_soak``."""
    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    prompts = [p[-600:] for p in bench_prompts(20, cfg.seed)]
    out_path = _result_path(cfg, out_path, "serve_load")

    with _server(cfg, root, ["serve.request_timeout_s=600"]) as srv:
        raw, wall = timed(None, lambda: asyncio.run(_soak(srv.url, srv.proc.pid, prompts, requests=requests,
                                                          concurrency=concurrency, tokens=max_new_tokens, every=every)))
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


# --------------------------------------------------------------------------- editors' fill-in-the-middle requests
def _first_line(text: str) -> str:
    """``text`` up to its first newline."""
    return text.split("\n", 1)[0]


def _fim_samples(cfg, root: Path, samples: int, max_new_tokens: int) -> list:
    """The infilling slice's first ``samples`` samples of ``eval.split`` (the same seeded choice as
    results/<name>/infill), cut with the tokenizer of the run at ``root``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "finetuned"))
    e = cfg.eval
    return make_infill_samples(load_corpus(cfg)[e.split], tok, num_samples=samples, seed=e.sample_seed,
                               max_context_tokens=e.max_context_tokens, max_new_tokens=max_new_tokens,
                               sep=text_sep(cfg), offset=e.sample_offset)


class _FimClients:
    """The editors' requests of :data:`FIM_CLIENTS` against the server at ``url`` (``http``: an
    ``httpx.Client`` of it); each client's request for a sample returns (status, answer text, the
    server's ``greencode`` block)."""

    def __init__(self, http, url: str, max_new_tokens: int):
        import openai

        self.http, self.max_new_tokens = http, max_new_tokens
        self.oa = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
        self.full = {"RL_agent_thresh": 1.0}
        self.clients = {"llm_vscode": self.llm_vscode, "continue_ollama": self.continue_ollama,
                        "mistral_fim": self.mistral_fim,
                        "openai_suffix": lambda s: self.openai_completion(s, s.suffix_text),
                        "openai_no_suffix": lambda s: self.openai_completion(s, None)}

    def records(self, samples: list) -> dict[str, list[dict]]:
        """Every client's request for each sample in turn. Returns the records per client (:func:`_fim_record`)."""
        rows: dict[str, list[dict]] = {name: [] for name in FIM_CLIENTS}
        for s in samples:
            for name, ask in self.clients.items():
                (status, text, stats), rtt = timed(None, lambda: ask(s))
                rows[name].append(_fim_record(s, status, text, stats, rtt))
        return rows

    def llm_vscode(self, s) -> tuple:
        """llm-vscode's default body: StarCoder markers in ``inputs``, temperature 0.2."""
        r = self.http.post("/models/greencode", json={
            "inputs": f"<fim_prefix>{s.prefix_text}<fim_suffix>{s.suffix_text}<fim_middle>",
            "parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95, "return_full_text": False}})
        j = r.json()
        j = j[0] if isinstance(j, list) else j
        return r.status_code, j.get("generated_text", ""), j.get("greencode", {})

    def continue_ollama(self, s) -> tuple:
        """Continue's Ollama autocomplete body: ``prompt`` + ``suffix``, raw, streamed NDJSON."""
        options = {"temperature": 0.01, "num_predict": self.max_new_tokens, "num_ctx": 1024,
                   "stop": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>", "\n\n", "```"]}
        with self.http.stream("POST", "/api/generate", json={
                "model": "greencode", "prompt": s.prefix_text, "suffix": s.suffix_text, "raw": True, "stream": True,
                "keep_alive": 1800, "options": options}) as resp:
            lines = [json.loads(x) for x in resp.read().decode().split("\n") if x]
        return resp.status_code, "".join(x.get("response", "") for x in lines), lines[-1].get("greencode", {})

    def mistral_fim(self, s) -> tuple:
        """Mistral's ``/v1/fim/completions``, greedy, the full model."""
        r = self.http.post("/v1/fim/completions", json={"model": "greencode", "prompt": s.prefix_text,
                                                        "suffix": s.suffix_text, "max_tokens": self.max_new_tokens,
                                                        "temperature": 0, "stop": ["\n"], **self.full})
        j = r.json()
        return (r.status_code, j["choices"][0]["message"]["content"] if r.status_code == 200 else "",
                j.get("greencode", {}))

    def openai_completion(self, s, suffix: Optional[str]) -> tuple:
        """The openai client's ``completions.create`` with ``suffix`` (None: left to right), greedy, the full model."""
        res = self.oa.completions.create(model="greencode", prompt=s.prefix_text, suffix=suffix,
                                         max_tokens=self.max_new_tokens, temperature=0, stop=["\n"],
                                         extra_body=self.full)
        return 200, res.choices[0].text, res.model_extra["greencode"]


def _fim_record(s, status: int, text: str, stats: dict, rtt: float) -> dict:
    """One answer's record: its status, the answer (200 characters), its first line scored against
    the held-out line (exact match, edit similarity), whether the server answered it as FIM or
    ignored the suffix, the threshold, the round trip and the layers skipped."""
    em, es = line_scores(_first_line(text), s.reference)
    return {"id": s.id, "status": status, "answer": text[:200], "reference": s.reference,
            "exact_match": em, "edit_similarity": es, "fim": bool(stats.get("fim")),
            "suffix_ignored": bool(stats.get("suffix_ignored")),
            "threshold": stats.get("threshold"), "rtt_s": rtt,
            "layers_skipped_share": stats.get("layers_skipped_share")}


def _fim_summary(rs: list[dict], idx, seed: int) -> dict:
    """One client's summary: requests, all 200, answered as FIM, answered with a middle line, exact
    match (also without boilerplate lines) and edit similarity with their 95% CIs, round trips."""
    em = np.array([r["exact_match"] for r in rs])
    es = np.array([r["edit_similarity"] for r in rs])
    return {"requests": len(rs), "all_200": all(r["status"] == 200 for r in rs),
            "answered_as_fim": sum(r["fim"] for r in rs),
            "answered_with_a_middle_line": sum(bool(_first_line(r["answer"]).strip()) for r in rs),
            "exact_match": _ci(em, idx),
            **_exact_match_without_boilerplate(rs, seed),
            "edit_similarity": _ci(es, idx),
            "rtt_ms": percentiles([r["rtt_s"] for r in rs], 1e3)}


def run_fim_clients(cfg, run_dir: Optional[Union[str, Path]] = None, *, samples: int = 40, max_new_tokens: int = 48,
                    out_path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Editors' fill-in-the-middle requests against a real server, on held-out lines of the test split
    (the infilling slice's samples, :mod:`greencode.eval.infill`): llm-vscode's default body (StarCoder
    markers in ``inputs``, temperature 0.2), Continue's Ollama autocomplete body (``prompt`` + ``suffix``,
    raw, streamed), Mistral's ``/v1/fim/completions`` and the openai client's ``suffix`` (greedy), and the
    openai client without the suffix as the left-to-right control. Each answer's first line is scored
    against the held-out line (exact match, edit similarity). -> ``results/benchmark/serve_fim_<name>.json``."""
    import httpx

    from greencode.serve.engine import run_root

    _quiet_clients()
    root = run_root(cfg, run_dir)
    # the slice's own sample order (the first ``samples`` of the same seeded choice as results/<name>/infill)
    picked = _fim_samples(cfg, root, samples, max_new_tokens)
    out_path = _result_path(cfg, out_path, "serve_fim")

    with _server(cfg, root, ["serve.request_timeout_s=600"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=600.0) as http:
        rows = _FimClients(http, srv.url, max_new_tokens).records(picked)
        alive = http.get("/health").status_code == 200
    idx = bootstrap_indices(len(picked), 2000, cfg.seed)
    summary = {name: _fim_summary(rs, idx, cfg.seed) for name, rs in rows.items()}
    d = np.array([a["exact_match"] - b["exact_match"] for a, b in zip(rows["openai_suffix"], rows["openai_no_suffix"])])
    result = {"what": (f"{len(picked)} held-out lines of the {cfg.eval.split} split (the infilling slice's first "
                       "samples), each sent as editors send fill-in-the-middle requests; answers' first lines scored "
                       "against the line"),
              "clients": dict(FIM_CLIENTS),
              "summary": summary,
              "exact_match_suffix_minus_no_suffix": _ci(d, idx),
              "health_after": alive, "records": rows, "load_average_1m": load_average_1m()}
    write_result(out_path, result, cfg=cfg, stage="bench_serve_fim", weights=_weights(root), meta_key="run")
    return result
