"""The FastAPI app: every completion wire format an editor speaks, over one shared model.

The model runs one request at a time on a single worker thread. Requests wait in a bounded
queue (``serve.queue_size`` waiting beside the one running); past that the server answers 503
with ``Retry-After``, and a request still unanswered after ``serve.request_timeout_s`` gets
504. Bodies are read with a size cap (413), must be UTF-8 JSON (400) and are validated
strictly (422); no bad input reaches a 500. The README's serving section documents the formats.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from greencode.serve.engine import Completion, Engine, GenRequest, load_run
from greencode.serve.errors import RequestError, error_body
from greencode.serve.metrics import ServeMetrics
from greencode.serve.schemas import (HFRequest, OllamaRequest, OpenAIRequest, SeedOptions, ShowRequest, check_text,
                                     parse_json_bytes, stop_list, target_of, threshold_of, validate)

log = logging.getLogger(__name__)

API_KEY_ENV = "GREENCODE_API_KEY"
ROUTES = ("POST /api/generate", "POST /", "POST /generate", "POST /generate_stream", "POST /models/{model}",
          "POST /v1/completions", "GET /v1/models",
          "GET /api/tags", "POST /api/show", "GET /api/version", "GET /health", "GET /metrics")
_KNOWN_PATHS = {"/", "/api/generate", "/api/generate/", "/generate", "/generate_stream", "/v1/completions",
                "/v1/models", "/api/tags",
                "/api/show", "/api/version", "/health", "/metrics"}
# per-format sampling defaults when the request leaves a knob out
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


# --------------------------------------------------------------------------- the queue
class Scheduler:
    """One worker thread runs the model; at most ``queue_size`` requests wait beside it."""

    def __init__(self, queue_size: int, timeout_s: float):
        self.capacity = int(queue_size) + 1
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greencode-model")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _release(self, _future=None) -> None:
        with self._lock:
            self._in_flight -= 1

    async def run(self, fn: Callable[..., Any], *args) -> Any:
        with self._lock:
            if self._in_flight >= self.capacity:
                raise RequestError(503, f"server busy: {self._in_flight} requests running or queued (serve.queue_size="
                                        f"{self.capacity - 1}); retry shortly", kind="server_busy",
                                   headers={"Retry-After": "1"})
            self._in_flight += 1
        deadline = time.monotonic() + self.timeout_s

        def job():
            if time.monotonic() > deadline:  # timed out while queued: skip the work
                raise TimeoutError
            return fn(*args)

        try:
            cf = self._executor.submit(job)
        except RuntimeError:  # shutting down
            self._release()
            raise RequestError(503, "server is shutting down; retry against a running server", kind="server_busy",
                               headers={"Retry-After": "5"}) from None
        cf.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(cf), timeout=self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise RequestError(504, f"generation did not finish within serve.request_timeout_s={self.timeout_s:g} s; "
                                    "ask for fewer tokens or retry when the server is less busy",
                               kind="timeout") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- helpers
def _route_label(path: str) -> str:
    if path in _KNOWN_PATHS:
        return path.rstrip("/") or "/"
    if path.startswith("/models/"):
        return "/models/{model}"
    return "other"


class _Observe:
    """Pure ASGI middleware: request timer, per-route/status counter, one log line per request."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        scope["greencode_t0"] = t0
        status = 500

        async def _send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            dt = time.perf_counter() - t0
            self.metrics.observe_request(_route_label(scope.get("path", "")), status, dt)
            log.debug("%s %s -> %d in %.1f ms", scope.get("method"), scope.get("path"), status, dt * 1e3)


async def _read_json(request: Request, limit: int, timeout_s: float = 30.0) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise RequestError(400, f"Content-Length {cl!r} is not a number", kind="invalid_request") from None
        if n > limit:
            raise RequestError(413, f"request body of {n} bytes exceeds serve.max_request_bytes={limit}; send a "
                                    "shorter prompt (the server keeps only the end of long prompts anyway)",
                               kind="too_large")
    buf = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:
                raise RequestError(413, f"request body exceeds serve.max_request_bytes={limit}; send a shorter "
                                        "prompt", kind="too_large")

    try:  # a client trickling its body must not hold a connection forever
        await asyncio.wait_for(read(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s", kind="timeout") from None
    return parse_json_bytes(bytes(buf))


def _public_info(info: dict) -> dict:
    """``engine.describe()`` for the open /health route: the run directory by name only and no
    absolute paths in the notes (the full facts stay behind the key, in /api/show)."""
    from greencode.utils import REPO_ROOT

    out = dict(info)
    run_dir = info.get("run_dir")
    out["run_dir"] = Path(run_dir).name if run_dir else None
    notes = []
    for note in info.get("notes") or []:
        if run_dir:
            note = note.replace(str(run_dir), "<run_dir>")
        notes.append(note.replace(str(REPO_ROOT), "<repo>"))
    out["notes"] = notes
    return out


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _first(*values):
    return next((v for v in values if v is not None), None)


def _param_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- the app
def create_app(cfg, run_dir=None, model=None, tokenizer=None, policy=None, *, engine: Optional[Engine] = None,
               meter=None) -> FastAPI:
    """The endpoint for ``cfg``. With no ``model``/``engine``, loads the run in ``run_dir``
    (default ``cfg.serve.run_dir``, else the config's run directory): fine-tuned model,
    tokenizer and exported policy. Injected objects are used as given (``policy=None`` then
    means the full model)."""
    scfg = cfg.serve
    if engine is None:
        root, notes, calibration = None, [], None
        if model is None:
            run = load_run(cfg, run_dir)
            model, tokenizer, policy, root, notes = run.model, run.tokenizer, run.policy, run.root, run.notes
            calibration = run.calibration
        if meter is None:
            from greencode.eval.energy import make_meter

            meter = make_meter(cfg.eval.energy, model.device)
        engine = Engine(model, tokenizer, policy, serve_cfg=scfg, decoding_cfg=cfg.decoding, meter=meter,
                        run_root=root, notes=notes, language=cfg.data.language, literal_mode=cfg.data.literal_mode,
                        calibration=calibration)
    api_key = scfg.api_key or os.environ.get(API_KEY_ENV) or None
    scheduler = Scheduler(scfg.queue_size, scfg.request_timeout_s)
    metrics = ServeMetrics(in_flight=lambda: scheduler.in_flight, energy_source=engine.meter.source)
    cap = int(scfg.max_new_tokens_cap)
    default_tokens = min(int(scfg.default_max_new_tokens), cap)
    name = scfg.model_name
    started = time.time()
    info = engine.describe()
    digest = hashlib.sha256(json.dumps(engine.model.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()

    @asynccontextmanager
    async def lifespan(_app):
        # one tiny generation before the first request (and before /health answers under uvicorn):
        # the first forward pass pays one-off costs (kernel selection, allocations) of ~1 s on CPU
        await scheduler.run(engine.warmup)
        yield
        scheduler.shutdown()

    # with an API key, the schema is served behind it (below) and the interactive docs are off: every route
    # but /health needs the key
    guarded_docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="GREEN-CODE completion endpoint", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="Energy-aware code completion with early exits; see the README, section Serving",
                  **guarded_docs)
    app.state.engine = engine
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    # ------------------------------------------------------------------ errors
    def _error(request: Request, status: int, message: str, kind: str, details=None, headers=None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, status, message, kind, details), status_code=status,
                            headers=headers)

    @app.exception_handler(RequestError)
    async def _on_request_error(request: Request, exc: RequestError):
        if exc.status in (503, 504):
            metrics.rejected.labels(reason="busy" if exc.status == 503 else "timeout").inc()
        return _error(request, exc.status, exc.message, exc.kind, exc.details, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path[:200]
        if exc.status_code == 404:
            msg = f"no route {request.method} {path}; routes: {', '.join(ROUTES)}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {path}; routes: {', '.join(ROUTES)}"
        else:
            msg = str(exc.detail)
        return _error(request, exc.status_code, msg, "not_found" if exc.status_code == 404 else "http_error",
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        details = [{"loc": ".".join(str(p) for p in e.get("loc", ())), "msg": e.get("msg", ""),
                    "type": e.get("type", "")} for e in exc.errors()]
        return _error(request, 422, "invalid request: " + "; ".join(f"{d['loc']}: {d['msg']}" for d in details),
                      "invalid_request", details)

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(request, 500, f"internal server error ({type(exc).__name__}); see the server log",
                      "internal_error")

    # ------------------------------------------------------------------ auth
    async def require_key(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                               kind="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(dependencies=[Depends(require_key)])

    # ------------------------------------------------------------------ request -> GenRequest
    def max_tokens(value: Optional[int], field: str, *, ollama: bool = False) -> int:
        if value is None:
            return default_tokens
        if ollama and value in (-1, -2):  # Ollama: -1 = no limit, -2 = fill the context; both mean "up to the cap"
            return cap
        if value < 1:
            raise RequestError(422, f"{field}={value} must be at least 1 (the number of new tokens to generate)",
                               loc=field)
        if value > cap:
            raise RequestError(422, f"{field}={value} exceeds this server's cap of {cap} new tokens "
                                    f"(serve.max_new_tokens_cap); ask for at most {cap}", loc=field)
        return value

    def sampling(temperature, top_p, top_k, defaults: dict, do_sample: Optional[bool] = None) -> dict:
        t = _first(temperature, defaults["temperature"])
        sample = (t > 0) if do_sample is None else (bool(do_sample) and t > 0)
        return {"do_sample": sample, "temperature": float(t) if sample else 1.0,
                "top_p": float(_first(top_p, defaults["top_p"])), "top_k": int(_first(top_k, defaults["top_k"]))}

    def hf_request(body: HFRequest) -> tuple[GenRequest, dict]:
        from greencode.serve.schemas import HFParameters

        p = body.parameters or HFParameters()
        o = body.options or SeedOptions()
        if p.max_new_tokens is not None:
            n = max_tokens(p.max_new_tokens, "body.parameters.max_new_tokens")
        else:
            n = max_tokens(o.num_predict, "body.options.num_predict")
        temperature = _first(p.temperature, o.temperature)
        do_sample = p.do_sample if p.do_sample is not None else (temperature is not None and temperature > 0)
        gen = GenRequest(prompt=check_text(body.inputs, "body.inputs"), max_new_tokens=n,
                         **sampling(temperature, _first(p.top_p, o.top_p), _first(p.top_k, o.top_k),
                                    {"temperature": 1.0, "top_p": 1.0, "top_k": 0}, do_sample),
                         seed=_first(p.seed, o.seed), stop=stop_list(p.stop, p.stop_sequences, o.stop),
                         threshold=threshold_of(p, o, body), max_disagreement=target_of(p, o, body),
                         num_ctx=o.num_ctx)
        return gen, {"return_full_text": bool(p.return_full_text), "details": bool(p.details)}

    async def complete(request: Request, gen: GenRequest, fmt: str) -> Completion:
        gen.request_id = uuid.uuid4().hex[:16]
        submitted = time.perf_counter()
        c: Completion = await scheduler.run(engine.complete, gen, submitted, submitted + scheduler.timeout_s)
        now = time.perf_counter()
        c.stats["request_parse_s"] = submitted - request.scope.get("greencode_t0", submitted)
        c.stats["worker_to_loop_s"] = now - c.stats.pop("done_at", now)
        c.stats["latency_s"] = now - request.scope.get("greencode_t0", submitted)
        c.stats["format"] = fmt
        metrics.observe_completion(fmt, c.stats, engine.model.num_layers)
        s = c.stats
        log.info("%s %s: %d+%d tokens, %s, thr=%s, mean exit layer %s, %.1f ms", fmt, gen.request_id,
                 s["prompt_tokens"], s["completion_tokens"], s["controller"], s["threshold"],
                 None if s["mean_exit_layer"] is None else round(s["mean_exit_layer"], 2), s["latency_s"] * 1e3)
        return c

    # ------------------------------------------------------------------ HF / seed / TGI
    _TGI_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}

    def hf_response(c: Completion, body: HFRequest, extra: dict) -> dict:
        text = (body.inputs + c.text) if extra["return_full_text"] else c.text
        out: dict[str, Any] = {"generated_text": text}
        if extra["details"]:
            out["details"] = {"finish_reason": _TGI_FINISH.get(c.finish_reason, c.finish_reason),
                              "generated_tokens": c.completion_tokens, "seed": None, "prefill": [], "tokens": []}
        out["greencode"] = c.stats
        return out

    async def hf_generate(request: Request, data: dict, stream: Optional[bool] = None) -> Response:
        body = validate(HFRequest, data)
        gen, extra = hf_request(body)
        stream = bool(body.stream) if stream is None else stream
        gen.want_pieces = stream
        c = await complete(request, gen, "seed" if body.options is not None and body.parameters is None
                           else "huggingface")
        if not stream:
            return JSONResponse(hf_response(c, body, extra))
        return StreamingResponse(tgi_events(c, body, extra), media_type="text/event-stream")

    def tgi_events(c: Completion, body: HFRequest, extra: dict):
        """TGI's server-sent events: one per token ({"index", "token": {"id", "text", "logprob",
        "special"}}), the last with the whole ``generated_text`` (and ``details`` when asked). The
        events are sent once the generation is done (token-by-token streaming is not built yet)."""
        final = hf_response(c, body, extra)
        pieces = list(c.pieces) or [c.text]
        tokens = list(c.tokens) + [None] * max(0, len(pieces) - len(c.tokens))
        for i, (tok, piece) in enumerate(zip(tokens, pieces)):
            last = i == len(pieces) - 1
            event = {"index": i, "token": {"id": tok, "text": piece, "logprob": None, "special": False},
                     "generated_text": final["generated_text"] if last else None,
                     "details": final.get("details") if last else None}
            if last:
                event["greencode"] = c.stats
            yield f"data: {json.dumps(event)}\n\n"

    # ------------------------------------------------------------------ Ollama
    def ollama_final(c: Completion, model: str, response: str) -> dict:
        s = c.stats
        ns = lambda x: int(round((x or 0.0) * 1e9))  # noqa: E731
        return {"model": model, "created_at": _now_iso(), "response": response, "done": True,
                "done_reason": "length" if c.finish_reason == "length" else "stop",
                "context": c.prompt_ids + c.tokens, "total_duration": ns(s.get("latency_s")), "load_duration": 0,
                "prompt_eval_count": c.prompt_tokens, "prompt_eval_duration": ns(s.get("prefill_s")),
                "eval_count": c.completion_tokens, "eval_duration": ns(s.get("decode_s")), "greencode": s}

    async def ollama_generate(request: Request, data: dict) -> Response:
        body = validate(OllamaRequest, data)
        model = body.model or name
        stream = True if body.stream is None else body.stream
        prompt = check_text(body.prompt, "body.prompt")
        suffix = check_text(body.suffix, "body.suffix")
        if not prompt and not suffix:  # Ollama's "load the model" call
            done = {"model": model, "created_at": _now_iso(), "response": "", "done": True, "done_reason": "load"}
            if stream:
                return StreamingResponse(iter([json.dumps(done) + "\n"]), media_type="application/x-ndjson")
            return JSONResponse(done)
        o = body.options or SeedOptions()
        gen = GenRequest(prompt=prompt, max_new_tokens=max_tokens(o.num_predict, "body.options.num_predict",
                                                                  ollama=True),
                         **sampling(o.temperature, o.top_p, o.top_k, OLLAMA_DEFAULTS), seed=o.seed,
                         stop=stop_list(o.stop, field="body.options.stop"), threshold=threshold_of(o, body),
                         max_disagreement=target_of(o, body),
                         num_ctx=o.num_ctx, want_pieces=stream)
        c = await complete(request, gen, "ollama")
        if suffix:
            c.stats["suffix_ignored"] = True
        if not stream:
            return JSONResponse(ollama_final(c, model, c.text))

        def lines():
            for piece in c.pieces:
                if piece:
                    yield json.dumps({"model": model, "created_at": _now_iso(), "response": piece,
                                      "done": False}) + "\n"
            yield json.dumps(ollama_final(c, model, "")) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=PlainTextResponse)
    async def root() -> str:
        return "GREEN-CODE completion server is running"

    if api_key:
        @api.get("/openapi.json", include_in_schema=False)
        async def openapi_guarded() -> JSONResponse:
            return JSONResponse(app.openapi())

    public_info = _public_info(info)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, **public_info, "queue": {"in_flight": scheduler.in_flight,
                                                                  "capacity": scheduler.capacity,
                                                                  "queue_size": scfg.queue_size},
                "max_new_tokens_cap": cap, "default_max_new_tokens": default_tokens,
                "request_timeout_s": scfg.request_timeout_s, "auth_required": bool(api_key),
                "uptime_s": time.time() - started, "routes": list(ROUTES)}

    @api.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def api_generate(request: Request) -> Response:
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        if "inputs" in data and "prompt" in data:
            raise RequestError(422, "the body has both 'inputs' (HF/seed format) and 'prompt' (Ollama format); send "
                                    "one of them", loc="body")
        if "inputs" in data:
            return await hf_generate(request, data)
        if "prompt" in data or "model" in data:
            return await ollama_generate(request, data)
        raise RequestError(422, "the body needs 'inputs' (HF/seed format: {\"inputs\", \"parameters\" or \"options\"})"
                                " or 'prompt' (Ollama format: {\"model\", \"prompt\", \"options\", \"stream\"})",
                           loc="body.inputs")

    api.add_api_route("/api/generate", api_generate, methods=["POST"])
    api.add_api_route("/api/generate/", api_generate, methods=["POST"], include_in_schema=False)

    @api.post("/generate")
    async def tgi_generate(request: Request) -> Response:
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        return await hf_generate(request, data)

    @api.post("/generate_stream")
    async def tgi_generate_stream(request: Request) -> Response:
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        return await hf_generate(request, data, stream=True)

    @api.post("/", include_in_schema=False)  # TGI answers generation on its root too (InferenceClient(base_url))
    async def tgi_root(request: Request) -> Response:
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        return await hf_generate(request, data)

    @api.post("/models/{model_id:path}")
    async def hf_models(request: Request, model_id: str) -> Response:  # llm-ls' huggingface backend: {url}/models/{id}
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        return await hf_generate(request, data)

    @api.post("/v1/completions")
    async def openai_completions(request: Request) -> Response:
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        body = validate(OpenAIRequest, data)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError(422, f"body.prompt holds {len(prompt)} prompts; this server completes one prompt "
                                        "per request", loc="body.prompt")
            prompt = prompt[0]
        if body.n not in (None, 1):
            raise RequestError(422, f"body.n={body.n}: this server returns one completion per request; send n=1",
                               loc="body.n")
        if body.best_of not in (None, 1):
            raise RequestError(422, f"body.best_of={body.best_of}: this server generates one candidate per request; "
                                    "send best_of=1 or leave it out", loc="body.best_of")
        if body.logprobs is not None:
            raise RequestError(422, "body.logprobs: log probabilities are not returned by this server; leave "
                                    "logprobs out (the 'greencode' field reports each token's exit layer)",
                               loc="body.logprobs")
        stream = bool(body.stream)
        gen = GenRequest(prompt=check_text(prompt, "body.prompt"),
                         max_new_tokens=max_tokens(body.max_tokens, "body.max_tokens"),
                         **sampling(body.temperature, body.top_p, body.top_k, OPENAI_DEFAULTS), seed=body.seed,
                         stop=stop_list(body.stop), threshold=threshold_of(body), max_disagreement=target_of(body),
                         want_pieces=stream)
        check_text(body.suffix, "body.suffix")
        c = await complete(request, gen, "openai")
        cid = f"cmpl-{c.stats['request_id']}"
        created = int(time.time())
        finish = "length" if c.finish_reason == "length" else "stop"
        usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "total_tokens": c.prompt_tokens + c.completion_tokens}
        prefix = prompt if body.echo else ""
        if not stream:
            return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": name,
                                 "choices": [{"text": prefix + c.text, "index": 0, "logprobs": None,
                                              "finish_reason": finish}],
                                 "usage": usage, "greencode": c.stats})

        def chunk(text: str, finish_reason: Optional[str], **extra) -> str:
            obj = {"id": cid, "object": "text_completion", "created": created, "model": name,
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        def events():
            if prefix:
                yield chunk(prefix, None)
            for piece in c.pieces:
                if piece:
                    yield chunk(piece, None)
            yield chunk("", finish, greencode=c.stats)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                             "model": name, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/v1/models")
    async def openai_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(started),
                                            "owned_by": "greencode", "greencode": info}]}

    def model_details() -> dict:
        return {"parent_model": "", "format": "safetensors", "family": info["family"], "families": [info["family"]],
                "parameter_size": _param_count(info["num_parameters"]),
                "quantization_level": info["dtype"].upper().replace("FLOAT", "F")}

    @api.get("/api/tags")
    async def ollama_tags() -> dict:
        size = int(info["num_parameters"] * engine.model.dtype.itemsize)
        return {"models": [{"name": name, "model": name, "modified_at": _dt.datetime.fromtimestamp(
            started, _dt.timezone.utc).isoformat(), "size": size, "digest": digest, "details": model_details()}]}

    @api.post("/api/show")
    async def ollama_show(request: Request) -> dict:
        data = await _read_json(request, scfg.max_request_bytes, scfg.request_timeout_s)
        validate(ShowRequest, data)
        arch = info["family"]
        params = "\n".join(f"{k} {v}" for k, v in (("temperature", OLLAMA_DEFAULTS["temperature"]),
                                                   ("top_p", OLLAMA_DEFAULTS["top_p"]),
                                                   ("top_k", OLLAMA_DEFAULTS["top_k"]),
                                                   ("num_predict", default_tokens)))
        return {"license": "", "modelfile": f"# GREEN-CODE early-exit model served from {info['run_dir']}\n",
                "parameters": params, "template": "{{ .Prompt }}", "details": model_details(),
                "model_info": {"general.architecture": arch, "general.parameter_count": info["num_parameters"],
                               f"{arch}.context_length": info["context_window"],
                               f"{arch}.embedding_length": info["hidden_size"],
                               f"{arch}.block_count": info["num_layers"],
                               "greencode.exit_layers": info["exit_layers"],
                               "greencode.policy_loaded": info["policy_loaded"],
                               "greencode.serving": info["serving"],
                               "greencode.default_threshold": info["default_threshold"]},
                "capabilities": ["completion"], "modified_at": _now_iso()}

    @api.get("/api/version")
    async def ollama_version() -> dict:
        return {"version": "0.0.0-greencode"}

    app.include_router(api)
    return app
