"""The FastAPI app: wiring only. Routes from the protocol modules (:mod:`greencode.serve.protocols`),
the API key, error handlers and middleware; the model side is :mod:`greencode.serve.engine`, the
queue, deadlines and token events :mod:`greencode.serve.scheduler`.

Overload is answered by the app, always as JSON 503 with ``Retry-After`` and counted in
``/metrics`` (``greencode_rejected_total{reason=...}``): a generation that could not finish within
its deadline at the measured drain rate is refused at once (``deadline``), the waiting room holds at
most ``serve.max_queued_tokens`` prompt tokens and ``serve.queue_size`` requests (``busy``), and at
most :func:`max_concurrent_requests` HTTP requests are in progress at once (``overload``; ``/health``
and ``/metrics`` always answer). Bodies are read
with a size cap (413), must be UTF-8 JSON (400) and are validated strictly (422); no bad input
reaches a 500. The README's serving section documents the formats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from greencode.energy import make_meter
from greencode.serve.engine import Engine, load_run
from greencode.serve.errors import RequestError, error_body
from greencode.serve.metrics import ServeMetrics
from greencode.serve.protocols import hf, ollama, openai
from greencode.serve.protocols.common import (ERROR_SCHEMAS, GENERATION_STATUSES, INFO_STATUSES, ServeContext,
                                              json_body, responses)
from greencode.serve.scheduler import Scheduler
from greencode.serve.schemas import FimRequest, HFRequest, OllamaRequest, OpenAIRequest, ShowRequest
from greencode.utils import REPO_ROOT

log = logging.getLogger(__name__)

API_KEY_ENV = "GREENCODE_API_KEY"
ROUTES = ("POST /api/generate", "POST /", "POST /generate", "POST /generate_stream", "POST /models/{model}",
          "POST /v1/completions", "POST /v1/fim/completions", "GET /v1/models",
          "GET /api/tags", "POST /api/show", "GET /api/version", "GET /health", "GET /metrics")
_KNOWN_PATHS = {"/", "/api/generate", "/api/generate/", "/generate", "/generate_stream", "/v1/completions",
                "/v1/fim/completions", "/v1/models", "/api/tags",
                "/api/show", "/api/version", "/health", "/metrics"}
BODY_MODELS = (HFRequest, OllamaRequest, OpenAIRequest, FimRequest, ShowRequest)
ALWAYS_ANSWERED = ("/health", "/metrics")  # never refused by the connection bound (probes, scrapes)


def max_concurrent_requests(queue_size: int) -> int:
    """HTTP requests in progress at once (reading bodies, waiting, streaming) before the app answers
    503: well above the generation queue, so the queue's own ``busy`` answer comes first."""
    return max(64, 8 * (int(queue_size) + 1))


# --------------------------------------------------------------------------- middleware
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


class _Admission:
    """Pure ASGI middleware: at most ``limit`` HTTP requests in progress; past that a JSON 503 with
    ``Retry-After`` (the server layer itself never refuses: uvicorn runs without a concurrency limit)."""

    def __init__(self, app, limit: int, metrics: ServeMetrics):
        self.app = app
        self.limit = int(limit)
        self.metrics = metrics
        self.active = 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in ALWAYS_ANSWERED:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self.metrics.rejected.labels(reason="overload").inc()
            path = scope.get("path", "")
            msg = (f"server overloaded: {self.active} requests in progress (limit {self.limit}); retry shortly")
            response = JSONResponse(error_body(path, 503, msg, "server_busy"), status_code=503,
                                    headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _state_token_counts(components: dict, cap: int) -> None:
    """The token-count fields as this server takes them: 1..``serve.max_new_tokens_cap`` (Ollama's
    ``num_predict`` also -1 and -2, "up to the cap"), so a schema-valid count is served."""
    counts = {"minimum": 1, "maximum": int(cap), "type": "integer"}
    for model, field, extra in (("HFParameters", "max_new_tokens", None), ("OpenAIRequest", "max_tokens", None),
                                ("FimRequest", "max_tokens", None),
                                ("SeedOptions", "num_predict", {"enum": [-1, -2], "type": "integer"})):
        prop = components.get(model, {}).get("properties", {}).get(field)
        if prop is not None:
            prop["anyOf"] = [dict(counts)] + ([extra] if extra else []) + [{"type": "null"}]


def _methods_of(app, path: str) -> list[str]:
    """The methods some route of ``app`` answers on ``path`` (included routers opened up)."""
    from starlette.routing import Match

    methods: set[str] = set()

    def walk(routes):
        for r in routes:
            inner = getattr(r, "original_router", None)
            if inner is not None:
                walk(inner.routes)
                continue
            matches = getattr(r, "matches", None)
            if matches is None or not getattr(r, "methods", None):
                continue
            match, _ = matches({"type": "http", "path": path, "method": next(iter(r.methods)), "root_path": ""})
            if match != Match.NONE:
                methods.update(r.methods)

    walk(app.routes)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _public_info(info: dict) -> dict:
    """``engine.describe()`` for the open /health route: the run directory by name only and no
    absolute paths in the notes (the full facts stay behind the key, in /api/show)."""
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


# --------------------------------------------------------------------------- the engine and the context
def _load_engine(cfg, run_dir, model, tokenizer, policy, meter) -> Engine:
    """The engine of ``cfg``'s run (``run_dir``), or of the injected model (``policy=None``: the full model)."""
    root, notes, calibration, classifier = None, [], None, None
    if model is None:
        run = load_run(cfg, run_dir)
        model, tokenizer, policy, root, notes = run.model, run.tokenizer, run.policy, run.root, run.notes
        calibration, classifier = run.calibration, run.classifier
    if meter is None:
        meter = make_meter(cfg.eval.energy, model.device)
    return Engine(model, tokenizer, policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding, meter=meter,
                  run_root=root, notes=notes, language=cfg.data.language, literal_mode=cfg.data.literal_mode,
                  calibration=calibration, classifier=classifier)


def _context(engine: Engine, scfg) -> ServeContext:
    """The scheduler, the metrics and what every route reads (name, caps, the model's digest)."""
    holder: dict = {}
    metrics = ServeMetrics(in_flight=lambda: holder["scheduler"].in_flight, energy_source=engine.meter.source)
    scheduler = holder["scheduler"] = Scheduler(engine, scfg.queue_size, scfg.request_timeout_s,
                                                on_rejected=lambda reason: metrics.rejected.labels(reason=reason).inc(),
                                                max_batch_size=scfg.max_batch_size,
                                                max_prefill_tokens=scfg.max_prefill_tokens,
                                                max_queued_tokens=scfg.max_queued_tokens,
                                                on_queue_wait=metrics.queue_wait_seconds.observe,
                                                admission_margin=scfg.admission_margin)
    cap = int(scfg.max_new_tokens_cap)
    info = engine.describe()
    return ServeContext(
        scheduler=scheduler, metrics=metrics, name=scfg.model_name, info=info, cap=cap,
        default_tokens=min(int(scfg.default_max_new_tokens), cap), max_request_bytes=int(scfg.max_request_bytes),
        request_timeout_s=float(scfg.request_timeout_s), started=time.time(),
        digest=hashlib.sha256(json.dumps(engine.model.fingerprint(), sort_keys=True, default=str).encode()).hexdigest(),
        size_bytes=int(info["num_parameters"] * engine.model.dtype.itemsize), num_layers=engine.model.num_layers,
        special_ids=frozenset(int(i) for i in (getattr(engine.tokenizer, "all_special_ids", None) or [])))


# --------------------------------------------------------------------------- errors
def _error(request: Request, status: int, message: str, kind: str, details=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, kind, details), status_code=status,
                        headers=headers)


async def _on_request_error(request: Request, exc: RequestError):
    return _error(request, exc.status, exc.message, exc.kind, exc.details, exc.headers)


async def _on_http_error(request: Request, exc: StarletteHTTPException):
    path = request.url.path[:200]
    if exc.status_code == 404:
        msg = f"no route {request.method} {path}; routes: {', '.join(ROUTES)}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        allowed = _methods_of(request.app, request.url.path)  # every route on this path, not the first one
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        msg = f"method {request.method} is not allowed on {path}; allowed: {', '.join(allowed)}"
    elif exc.status_code != 404:
        msg = str(exc.detail)
    return _error(request, exc.status_code, msg, "not_found" if exc.status_code == 404 else "http_error",
                  headers=headers)


async def _on_validation_error(request: Request, exc: RequestValidationError):
    details = [{"loc": ".".join(str(p) for p in e.get("loc", ())), "msg": e.get("msg", ""),
                "type": e.get("type", "")} for e in exc.errors()]
    return _error(request, 422, "invalid request: " + "; ".join(f"{d['loc']}: {d['msg']}" for d in details),
                  "invalid_request", details)


async def _on_crash(request: Request, exc: Exception):
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error(request, 500, f"internal server error ({type(exc).__name__}); see the server log",
                  "internal_error")


ERROR_HANDLERS = ((RequestError, _on_request_error), (StarletteHTTPException, _on_http_error),
                  (RequestValidationError, _on_validation_error), (Exception, _on_crash))


def _key_check(api_key: Optional[str]):
    """The dependency every route but /health runs: with a key, ``Authorization: Bearer <key>`` or 401."""

    async def require_key(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                               kind="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    return require_key


# --------------------------------------------------------------------------- routes
def _info_routes(app: FastAPI, api: APIRouter, ctx: ServeContext, scfg, api_key: Optional[str],
                 connection_limit: int) -> None:
    """``/`` and ``/metrics`` behind the key, ``/health`` open, and the schema behind the key when there is one."""
    scheduler, metrics = ctx.scheduler, ctx.metrics

    @api.get("/", response_class=PlainTextResponse, responses=responses(*INFO_STATUSES, media="text/plain"))
    async def root() -> str:
        return "GREEN-CODE completion server is running"

    if api_key:
        @api.get("/openapi.json", include_in_schema=False)
        async def openapi_guarded() -> JSONResponse:
            return JSONResponse(app.openapi())

    public_info = _public_info(ctx.info)

    @app.get("/health", responses=responses(200))
    async def health() -> dict:
        return {"status": "ok", "model": ctx.name, **public_info,
                "queue": {"in_flight": scheduler.in_flight, "capacity": scheduler.capacity,
                          "queue_size": scfg.queue_size, "max_queued_tokens": scfg.max_queued_tokens,
                          "max_batch_size": scheduler.max_batch_size},
                "max_concurrent_requests": connection_limit,
                "max_new_tokens_cap": ctx.cap, "default_max_new_tokens": ctx.default_tokens,
                "request_timeout_s": scfg.request_timeout_s, "auth_required": bool(api_key),
                "uptime_s": time.time() - ctx.started, "routes": list(ROUTES)}

    @api.get("/metrics", response_class=PlainTextResponse, responses=responses(200, 401, media="text/plain"))
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)


def _generation_routes(api: APIRouter, ctx: ServeContext) -> None:
    """``/api/generate`` (the seed / HF body or Ollama's, told apart by ``inputs``) and each protocol's own routes."""

    async def api_generate(request: Request) -> Response:
        data = await ctx.read_json(request)
        # {"inputs", ...} is the HF/seed format (a "prompt" beside it is an unknown field, ignored as any other);
        # anything else is Ollama's (which answers a body without a prompt by loading the model)
        if "inputs" in data:
            return await hf.generate(ctx, request, data)
        return await ollama.generate(ctx, request, data)

    generate_doc = dict(openapi_extra=json_body(HFRequest, OllamaRequest),
                        responses=responses(*GENERATION_STATUSES, stream="text/event-stream or application/x-ndjson"),
                        summary="seed / HF ('inputs') or Ollama ('prompt') generate")
    api.add_api_route("/api/generate", api_generate, methods=["POST"], **generate_doc)
    api.add_api_route("/api/generate/", api_generate, methods=["POST"], include_in_schema=False)
    hf.register(api, ctx)
    ollama.register(api, ctx)
    openai.register(api, ctx)


def _openapi(app: FastAPI, cap: int):
    """FastAPI's schema plus the request bodies' models (routes read raw bytes, so FastAPI does not
    see them) and the error bodies, built once."""

    def openapi_schema() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in BODY_MODELS],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        components.update(ERROR_SCHEMAS)
        _state_token_counts(components, cap)
        app.openapi_schema = schema
        return schema

    return openapi_schema


# --------------------------------------------------------------------------- the app
def create_app(cfg, run_dir=None, model=None, tokenizer=None, policy=None, *, engine: Optional[Engine] = None,
               meter=None) -> FastAPI:
    """The endpoint for ``cfg``. With no ``model``/``engine``, loads the run in ``run_dir``
    (default ``cfg.serve.run_dir``, else the config's run directory): fine-tuned model,
    tokenizer and exported policy. Injected objects are used as given (``policy=None`` then
    means the full model)."""
    scfg = cfg.serve
    if engine is None:
        engine = _load_engine(cfg, run_dir, model, tokenizer, policy, meter)
    api_key = scfg.api_key or os.environ.get(API_KEY_ENV) or None
    ctx = _context(engine, scfg)
    scheduler = ctx.scheduler
    connection_limit = max_concurrent_requests(scfg.queue_size)

    @asynccontextmanager
    async def lifespan(_app):
        # one tiny generation before the first request (and before /health answers under uvicorn):
        # the first forward pass pays one-off costs (kernel selection, allocations) of ~1 s on CPU
        scheduler.start()
        await scheduler.call(engine.warmup)
        yield
        scheduler.shutdown()

    # with an API key, the schema is served behind it (below) and the interactive docs are off: every route
    # but /health needs the key
    guarded_docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="GREEN-CODE completion endpoint", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="Energy-aware code completion with early exits; see the README, section Serving",
                  **guarded_docs)
    app.state.engine, app.state.scheduler, app.state.metrics, app.state.context = engine, scheduler, ctx.metrics, ctx
    app.add_middleware(_Admission, limit=connection_limit, metrics=ctx.metrics)
    app.add_middleware(_Observe, metrics=ctx.metrics)  # outermost: it sees the admission's 503s too
    for exc, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc, handler)
    api = APIRouter(dependencies=[Depends(_key_check(api_key))])
    _info_routes(app, api, ctx, scfg, api_key, connection_limit)
    _generation_routes(api, ctx)
    app.include_router(api)
    app.openapi = _openapi(app, ctx.cap)
    return app
