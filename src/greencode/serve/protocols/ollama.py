"""The Ollama protocol: ``POST /api/generate`` with ``prompt`` (shared with the HF/seed format,
told apart by its fields), ``GET /api/tags``, ``POST /api/show``, ``GET /api/version``.

Answers: Ollama's object (``response``, ``done``, ``done_reason``, ``context``, token counts and
durations in ns, plus ``greencode``); streamed (``"stream"`` is true unless false, as in
Ollama): newline-terminated JSON lines, one per token piece as it is produced, the last with
``done: true``, the stats, and any text held back until the end. An error after the stream
started is a last ``{"error": ...}`` line, which the ollama client raises.

A ``suffix`` is the code after the cursor (fill in the middle, as Continue sends it): a model trained
with FIM fills the middle; a left-to-right one continues the prefix and ``greencode.suffix_ignored``
says so.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from greencode.serve.requests import Completion
from greencode.serve.requests import Event
from greencode.serve.protocols.common import (INFO_STATUSES, ServeContext, error_message, json_body, now_iso, relay,
                                              responses)
from greencode.serve.schemas import OllamaRequest, SeedOptions, ShowRequest, check_text, validate

OLLAMA_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
NDJSON = "application/x-ndjson"


def final(c: Completion, model: str, response: str) -> dict:
    s = c.stats
    ns = lambda x: int(round((x or 0.0) * 1e9))  # noqa: E731
    return {"model": model, "created_at": now_iso(), "response": response, "done": True,
            "done_reason": "length" if c.finish_reason == "length" else "stop",
            "context": c.prompt_ids + c.tokens, "total_duration": ns(s.get("latency_s")), "load_duration": 0,
            "prompt_eval_count": c.prompt_tokens, "prompt_eval_duration": ns(s.get("prefill_s")),
            "eval_count": c.completion_tokens, "eval_duration": ns(s.get("decode_s")), "greencode": s}


def lines(events: AsyncIterator[Event], model: str) -> AsyncIterator[str]:
    """Ollama's stream: one JSON line per token piece, the final object, an error in-band as Ollama sends it."""
    return relay(events,
                 lambda ev: ev.text and json.dumps({"model": model, "created_at": now_iso(), "response": ev.text,
                                                    "done": False}) + "\n",
                 lambda ev: [json.dumps(final(ev.completion, model, ev.tail)) + "\n"],
                 lambda e: json.dumps({"error": error_message(e)[1]}) + "\n")


async def generate(ctx: ServeContext, request: Request, data: dict) -> Response:
    body = validate(OllamaRequest, data)
    model = body.model or ctx.name
    stream = True if body.stream is None else body.stream
    prompt = check_text(body.prompt, "body.prompt")
    suffix = check_text(body.suffix, "body.suffix")
    o = body.options or SeedOptions()
    max_new = ctx.max_tokens(o.num_predict, "body.options.num_predict", ollama=True)  # checked for a load call too
    if not prompt and not suffix:  # Ollama's "load the model" call
        done = {"model": model, "created_at": now_iso(), "response": "", "done": True, "done_reason": "load"}
        if stream:
            return StreamingResponse(iter([json.dumps(done) + "\n"]), media_type=NDJSON)
        return JSONResponse(done)
    gen = ctx.request([o, body], prompt=prompt, suffix=suffix, max_new_tokens=max_new, defaults=OLLAMA_DEFAULTS,
                      temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, seed=o.seed, stop=[o.stop],
                      stop_field="body.options.stop", num_ctx=o.num_ctx)
    return await ctx.respond(request, gen, "ollama", stream, lambda c: final(c, model, c.text),
                             lambda events: lines(events, model), media_type=NDJSON, headers=None)


def _details(ctx: ServeContext) -> dict:
    info = ctx.info
    return {"parent_model": "", "format": "safetensors", "family": info["family"], "families": [info["family"]],
            "parameter_size": _param_count(info["num_parameters"]),
            "quantization_level": info["dtype"].upper().replace("FLOAT", "F")}


def _param_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def register(router: APIRouter, ctx: ServeContext) -> None:
    """Ollama's listing and model-info routes (``/api/generate`` is wired by the app)."""
    info = ctx.info

    async def ollama_tags() -> dict:
        return {"models": [{"name": ctx.name, "model": ctx.name, "modified_at": _dt.datetime.fromtimestamp(
            ctx.started, _dt.timezone.utc).isoformat(), "size": ctx.size_bytes, "digest": ctx.digest,
            "details": _details(ctx)}]}

    async def ollama_show(request: Request) -> dict:
        validate(ShowRequest, await ctx.read_json(request))
        arch = info["family"]
        params = "\n".join(f"{k} {v}" for k, v in (("temperature", OLLAMA_DEFAULTS["temperature"]),
                                                   ("top_p", OLLAMA_DEFAULTS["top_p"]),
                                                   ("top_k", OLLAMA_DEFAULTS["top_k"]),
                                                   ("num_predict", ctx.default_tokens)))
        return {"license": "", "modelfile": f"# GREEN-CODE early-exit model served from {info['run_dir']}\n",
                "parameters": params, "template": "{{ .Prompt }}", "details": _details(ctx),
                "model_info": {"general.architecture": arch, "general.parameter_count": info["num_parameters"],
                               f"{arch}.context_length": info["context_window"],
                               f"{arch}.embedding_length": info["hidden_size"],
                               f"{arch}.block_count": info["num_layers"],
                               "greencode.exit_layers": info["exit_layers"],
                               "greencode.policy_loaded": info["policy_loaded"],
                               "greencode.serving": info["serving"],
                               "greencode.default_threshold": info["default_threshold"]},
                "capabilities": ["completion"], "modified_at": now_iso()}

    async def ollama_version() -> dict:
        return {"version": "0.0.0-greencode"}

    router.add_api_route("/api/tags", ollama_tags, methods=["GET"], responses=responses(*INFO_STATUSES),
                         summary="Ollama: list models")
    router.add_api_route("/api/show", ollama_show, methods=["POST"], openapi_extra=json_body(ShowRequest),
                         responses=responses(200, 400, 401, 408, 413, 422, 503), summary="Ollama: model info")
    router.add_api_route("/api/version", ollama_version, methods=["GET"], responses=responses(*INFO_STATUSES),
                         summary="Ollama: server version")
