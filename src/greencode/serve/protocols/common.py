"""What every wire protocol shares: the server's facts and limits, reading a body, turning
per-format knobs into a :class:`~greencode.serve.engine.GenRequest` (:meth:`ServeContext.request`),
submitting it to the scheduler and answering it whole or streamed (:meth:`ServeContext.respond`,
:func:`relay`), the final statistics, and the OpenAPI description of bodies and answers.

No protocol touches the model: they see the :class:`ServeContext` and the events of
:mod:`greencode.serve.requests`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from greencode.serve.requests import Completion, GenRequest
from greencode.serve.errors import RequestError
from greencode.serve.requests import Event, FinalEvent, TokenEvent
from greencode.serve.metrics import ServeMetrics
from greencode.serve.scheduler import RequestStream, Scheduler
from greencode.serve.schemas import fidelity_of, mode_of, parse_json_bytes, stop_list, target_of, threshold_of

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeContext:
    """The server's facts and shared services, as the protocol modules see them."""

    scheduler: Scheduler
    metrics: ServeMetrics
    name: str  # the served model's name
    info: dict  # Engine.describe()
    cap: int  # serve.max_new_tokens_cap
    default_tokens: int
    max_request_bytes: int
    request_timeout_s: float
    started: float  # time.time() at start-up
    digest: str  # sha256 of the model's fingerprint
    size_bytes: int  # parameters x dtype size
    num_layers: int
    special_ids: frozenset = frozenset()  # the tokenizer's special token ids (TGI marks them)

    # ------------------------------------------------------------------ request -> GenRequest
    def max_tokens(self, value: Optional[int], field: str, *, ollama: bool = False) -> int:
        if value is None:
            return self.default_tokens
        if ollama and value in (-1, -2):  # Ollama: -1 = no limit, -2 = fill the context; both mean "up to the cap"
            return self.cap
        if value < 1:
            raise RequestError(422, f"{field}={value} must be at least 1 (the number of new tokens to generate)",
                               loc=field)
        if value > self.cap:
            raise RequestError(422, f"{field}={value} exceeds this server's cap of {self.cap} new tokens "
                                    f"(serve.max_new_tokens_cap); ask for at most {self.cap}", loc=field)
        return value

    @staticmethod
    def sampling(temperature, top_p, top_k, defaults: dict, do_sample: Optional[bool] = None) -> dict:
        t = defaults["temperature"] if temperature is None else float(temperature)
        sample = (t > 0) if do_sample is None else (bool(do_sample) and t > 0)
        return {"do_sample": sample, "temperature": t if sample else 1.0,
                "top_p": defaults["top_p"] if top_p is None else float(top_p),
                "top_k": defaults["top_k"] if top_k is None else int(top_k)}

    def request(self, knobs: Sequence[Optional[BaseModel]], *, prompt: str, max_new_tokens: int, defaults: dict,
                temperature=None, top_p=None, top_k=None, do_sample: Optional[bool] = None, seed=None,
                stop: Sequence = (), stop_field: str = "body.stop", suffix: Optional[str] = None,
                **extra) -> GenRequest:
        """The internal request of any protocol: its prompt (and ``suffix``), token count, sampling
        (``defaults``: the protocol's own), ``stop`` strings (from each of these fields), and the exit
        knobs (threshold, target, fidelity, lossy/lossless mode) read from ``knobs`` (options or
        parameters first, then the top level); ``extra``: further :class:`GenRequest` fields. A field
        that looks like a misspelt knob (the bodies' ``_knob_hints``) is logged and noted in the answer."""
        notes = [h for k in knobs if k is not None for h in getattr(k, "_knob_hints", None) or ()]
        for h in notes:
            log.warning("request: %s", h)
        return GenRequest(notes=notes, prompt=prompt, suffix=suffix or None, max_new_tokens=max_new_tokens,
                          **self.sampling(temperature, top_p, top_k, defaults, do_sample), seed=seed,
                          stop=stop_list(*stop, field=stop_field), threshold=threshold_of(*knobs),
                          max_disagreement=target_of(*knobs), fidelity=fidelity_of(*knobs), mode=mode_of(*knobs),
                          **extra)

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object: 413 past ``serve.max_request_bytes``, 408 when it trickles in
        slower than ``serve.request_timeout_s``, 400 / 422 when it is not a JSON object."""
        limit = self.max_request_bytes
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
            await asyncio.wait_for(read(), timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.request_timeout_s:g} s",
                               kind="timeout") from None
        return parse_json_bytes(bytes(buf))

    # ------------------------------------------------------------------ running it
    async def submit(self, gen: GenRequest) -> RequestStream:
        """Admission (503 at once when full) and preparation (4xx) before any response byte."""
        gen.request_id = uuid.uuid4().hex[:16]
        return await self.scheduler.submit(gen)

    async def complete(self, request: Request, gen: GenRequest, fmt: str) -> Completion:
        """A non-streamed request: its completion with the final statistics. A client that hangs
        up while it waits cancels the generation."""
        gen.stream = False
        submitted = time.perf_counter()
        stream = await self.submit(gen)
        result = asyncio.ensure_future(stream.result())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                stream.cancel()
                raise RequestError(499, "the client closed the connection before the answer", kind="client_closed")
            c = result.result()
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
        self.finalize(request, c, fmt, submitted)
        return c

    async def respond(self, request: Request, gen: GenRequest, fmt: str, stream: bool,
                      answer: Callable[[Completion], dict],
                      lines: Callable[[AsyncIterator[Event]], AsyncIterator[str]],
                      media_type: str = "text/event-stream", headers: Optional[dict] = SSE_HEADERS) -> Response:
        """Run ``gen`` and answer in a protocol's format: ``answer(completion)`` as JSON, or, when
        ``stream``, the lines ``lines(events)`` makes of its events (see :func:`relay`)."""
        if stream:
            events = await self.stream(request, gen, fmt)
            return StreamingResponse(lines(events), media_type=media_type, headers=headers)
        return JSONResponse(answer(await self.complete(request, gen, fmt)))

    async def stream(self, request: Request, gen: GenRequest, fmt: str) -> AsyncIterator[Event]:
        """Submit a streamed request (admission and 4xx raised here, before the response starts)
        and return its events; the final event's completion gets the final statistics, and
        leaving the iteration early (the client went away) cancels the generation."""
        gen.stream = True
        submitted = time.perf_counter()
        stream = await self.submit(gen)
        return self._events(request, stream, fmt, submitted)

    async def _events(self, request: Request, stream: RequestStream, fmt: str,
                      submitted: float) -> AsyncIterator[Event]:
        try:
            async for event in stream:
                if isinstance(event, FinalEvent):
                    self.finalize(request, event.completion, fmt, submitted)
                yield event
        finally:
            stream.cancel()  # a no-op once finished; otherwise the generation stops between tokens

    def finalize(self, request: Request, c: Completion, fmt: str, submitted: float) -> None:
        now = time.perf_counter()
        t0 = request.scope.get("greencode_t0", submitted)
        c.stats["request_parse_s"] = submitted - t0
        c.stats["worker_to_loop_s"] = now - c.stats.pop("done_at", now)
        c.stats["latency_s"] = now - t0
        c.stats["format"] = fmt
        self.metrics.observe_completion(fmt, c.stats, self.num_layers)
        s = c.stats
        log.info("%s %s: %d+%d tokens, %s, thr=%s, mean exit layer %s, %.1f ms", fmt, s["request_id"],
                 s["prompt_tokens"], s["completion_tokens"], s["controller"], s["threshold"],
                 None if s["mean_exit_layer"] is None else round(s["mean_exit_layer"], 2), s["latency_s"] * 1e3)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (call only once the body has been read)."""
    for _ in range(64):
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return
    await asyncio.Event().wait()  # a server that keeps answering with empty body messages: never spin


async def relay(events: AsyncIterator[Event], token: Callable[[TokenEvent], Optional[str]],
                final: Callable[[FinalEvent], Iterable[str]], error: Callable[[Exception], str], *,
                first: Sequence[str] = (), last: Sequence[str] = ()) -> AsyncIterator[str]:
    """The one streaming loop, in a protocol's wire format: the ``first`` lines, ``token(event)`` for
    each token as it is produced (nothing when it gives no text), the ``final(event)`` lines, and
    when the stream fails after it started, the in-band ``error(exception)`` line; then the ``last``
    lines (OpenAI's ``[DONE]``)."""
    try:
        for line in first:
            yield line
        async for ev in events:
            if isinstance(ev, TokenEvent):
                line = token(ev)
                if line:
                    yield line
            else:
                for line in final(ev):
                    yield line
    except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in-band
        yield error(e)
    for line in last:
        yield line


def sse_data(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def first(*values):
    return next((v for v in values if v is not None), None)


def error_message(exc: BaseException) -> tuple[int, str, str]:
    """(status, message, kind) of an error raised from a stream, for a protocol's error event."""
    if isinstance(exc, RequestError):
        return exc.status, exc.message, exc.kind
    log.error("streamed generation failed: %s: %s", type(exc).__name__, exc)
    return 500, f"internal server error ({type(exc).__name__}); see the server log", "internal_error"


# --------------------------------------------------------------------------- OpenAPI
_STATUS_TEXT = {
    200: "the answer",
    400: "the body is not UTF-8 JSON (malformed, NaN, empty)",
    401: "missing or wrong API key (only when the server has one)",
    408: "the body did not arrive within serve.request_timeout_s",
    404: "no such route (e.g. a model id holding a line break, which the path does not take)",
    413: "the body exceeds serve.max_request_bytes",
    422: "a field has the wrong type or value, or asks for something this server does not do",
    503: "the server is busy (queue full or too many connections); retry after Retry-After seconds",
    504: "the generation did not finish within serve.request_timeout_s",
}


def json_body(*models: type[BaseModel]) -> dict:
    """``openapi_extra`` declaring a JSON request body of one of ``models`` (their schemas are
    put in the components by the app). Routes read the raw bytes themselves, so size, encoding
    and JSON errors stay clean 413 / 400 answers."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def responses(*codes: int, openai: bool = False, stream: Optional[str] = None, media: str = "application/json",
              ) -> dict:
    """FastAPI ``responses=`` for the status codes a route can answer (``media``: the 200 answer's
    type). Error bodies follow :func:`greencode.serve.errors.error_body` (OpenAI's shape on /v1)."""
    error_ref = {"$ref": "#/components/schemas/" + ("OpenAIErrorBody" if openai else "ErrorBody")}
    out: dict[int, dict] = {}
    for code in codes:
        if code == 200:
            content: dict[str, Any] = {media: {"schema": _body_schema(media)}}
            for kind in (stream or "").split(" or "):  # "text/event-stream or application/x-ndjson": both
                if kind:
                    content[kind] = {"schema": _body_schema(kind)}
            out[200] = {"description": _STATUS_TEXT[200] + (f" ({stream} when streamed)" if stream else ""),
                        "content": content}
        else:
            out[code] = {"description": _STATUS_TEXT[code], "content": {"application/json": {"schema": error_ref}}}
    return out


def _body_schema(media: str) -> dict:
    """A 200 answer's schema: JSON bodies and the events of a stream (each server-sent event's data,
    each NDJSON line) are objects; OpenAI's stream ends with the string ``[DONE]``."""
    if media == "text/event-stream":
        return {"anyOf": [{"type": "object"}, {"type": "string", "enum": ["[DONE]"]}],
                "description": "each event's data: a JSON object (OpenAI's stream ends with [DONE])"}
    if media in ("application/json", "application/x-ndjson"):
        return {"type": "object"}
    return {"type": "string"}


GENERATION_STATUSES = (200, 400, 401, 408, 413, 422, 503, 504)
INFO_STATUSES = (200, 401, 503)
ERROR_SCHEMAS = {
    "ErrorBody": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"},
                       "detail": {"type": "array", "items": {"type": "object"}}},
    },
    "OpenAIErrorBody": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message"],
                                 "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                "param": {"type": ["string", "null"]},
                                                "code": {"type": "integer"}}},
                       "detail": {"type": "array", "items": {"type": "object"}}},
    },
}
