"""The seed / HF Inference API / TGI protocol.

Bodies: ``{"inputs", "options": {...}}`` (the seed format, huggingface-vscode-endpoint-server) or
``{"inputs", "parameters": {...}, "stream"}`` (HF / TGI), on ``POST /api/generate`` (shared with
Ollama, told apart by ``inputs``), ``/generate``, ``/generate_stream``, ``/`` (TGI answers
generation on its root; ``huggingface_hub.InferenceClient(base_url)`` posts there) and
``/models/{model}`` (llm-ls' huggingface backend).

Answers: ``{"generated_text", "details"?, "greencode"}``; streamed (``/generate_stream`` or
``"stream": true``): TGI's server-sent events, one ``{"index", "token": {"id", "text", "logprob",
"special"}}`` per token as it is produced, then a last event with ``generated_text`` (and
``details`` when asked) whose token carries the text held back until the end (often empty;
``special`` when it is). An error after the stream started is a last ``{"error", "error_type"}``
event, as TGI sends it.

``details: true`` returns each token's id, text, log probability and whether it is special (and
the ``top_n_tokens`` most likely alternatives per token as ``top_tokens``). In a stream each token
event carries its token's log probability as it is produced; the final event's ``details.tokens``
has them all.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response

from greencode.serve.requests import Completion, GenRequest
from greencode.serve.requests import Event, FinalEvent, TokenEvent
from greencode.serve.protocols.common import (GENERATION_STATUSES, ServeContext, error_message, first, json_body,
                                              relay, responses, sse_data)
from greencode.serve.schemas import HFParameters, HFRequest, SeedOptions, check_text, validate

TGI_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # greedy unless do_sample / a temperature


def parse(ctx: ServeContext, data: dict) -> tuple[HFRequest, GenRequest, dict]:
    """A validated HF/seed body -> the internal request and the answer's own options."""
    body = validate(HFRequest, data)
    p = body.parameters or HFParameters()
    o = body.options or SeedOptions()
    if p.max_new_tokens is not None:
        n = ctx.max_tokens(p.max_new_tokens, "body.parameters.max_new_tokens")
    else:
        n = ctx.max_tokens(o.num_predict, "body.options.num_predict", ollama=True)  # -1/-2 as in Ollama
    temperature = first(p.temperature, o.temperature)
    do_sample = p.do_sample if p.do_sample is not None else (temperature is not None and temperature > 0)
    details = bool(p.details)
    gen = ctx.request([p, o, body], prompt=check_text(body.inputs, "body.inputs"), max_new_tokens=n,
                      defaults=HF_DEFAULTS, temperature=temperature, top_p=first(p.top_p, o.top_p),
                      top_k=first(p.top_k, o.top_k), do_sample=do_sample, seed=first(p.seed, o.seed),
                      stop=[p.stop, p.stop_sequences, o.stop], num_ctx=o.num_ctx,
                      logprobs=(p.top_n_tokens or 0) if details else None)
    return body, gen, {"return_full_text": bool(p.return_full_text), "details": details,
                       "top_n_tokens": p.top_n_tokens or 0}


def _token(ctx: ServeContext, token_id: int, text: str, logprob: Optional[float]) -> dict:
    return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in ctx.special_ids}


def details(c: Completion, gen: GenRequest, extra: dict, *, stream: bool = False) -> dict:
    out: dict[str, Any] = {"finish_reason": TGI_FINISH.get(c.finish_reason, c.finish_reason),
                           "generated_tokens": c.completion_tokens,
                           "seed": gen.seed if gen.do_sample else None}
    if stream:
        out["input_length"] = c.prompt_tokens
    else:
        out["prefill"] = []
    infos = c.token_info or []
    out["tokens"] = [{"id": i.id, "text": i.text, "logprob": i.logprob, "special": i.special} for i in infos]
    if extra["top_n_tokens"]:
        out["top_tokens"] = [[{"id": t, "text": text, "logprob": lp, "special": False} for t, text, lp in i.top]
                             for i in infos]
    return out


def answer(c: Completion, body: HFRequest, gen: GenRequest, extra: dict) -> dict:
    text = (body.inputs + c.text) if extra["return_full_text"] else c.text
    out: dict[str, Any] = {"generated_text": text}
    if extra["details"]:
        out["details"] = details(c, gen, extra)
    out["greencode"] = c.stats
    return out


def sse(ctx: ServeContext, events: AsyncIterator[Event], body: HFRequest, gen: GenRequest,
        extra: dict) -> AsyncIterator[str]:
    """TGI's server-sent events, each sent as its token is produced; an error in-band, as TGI sends it."""
    seen = {"last_id": None, "n": 0}

    def token(ev: TokenEvent) -> str:
        seen["last_id"], seen["n"] = ev.token_id, ev.index + 1
        return sse_data({"index": ev.index, "token": _token(ctx, ev.token_id, ev.text, ev.logprob),
                         "generated_text": None, "details": None})

    def final(ev: FinalEvent) -> list[str]:
        c = ev.completion
        text = (body.inputs + c.text) if extra["return_full_text"] else c.text
        last = {"id": seen["last_id"] if seen["last_id"] is not None else 0, "text": ev.tail, "logprob": None,
                "special": ev.tail == ""}
        return [sse_data({"index": seen["n"], "token": last, "generated_text": text,
                          "details": details(c, gen, extra, stream=True) if extra["details"] else None,
                          "greencode": c.stats})]

    def error(e: Exception) -> str:
        _, message, kind = error_message(e)
        return sse_data({"error": message, "error_type": kind})

    return relay(events, token, final, error)


async def generate(ctx: ServeContext, request: Request, data: dict, stream: Optional[bool] = None) -> Response:
    body, gen, extra = parse(ctx, data)
    fmt = "seed" if body.options is not None and body.parameters is None else "huggingface"
    return await ctx.respond(request, gen, fmt, bool(body.stream) if stream is None else stream,
                             lambda c: answer(c, body, gen, extra), lambda events: sse(ctx, events, body, gen, extra))


def register(router: APIRouter, ctx: ServeContext) -> None:
    """TGI's routes (``/api/generate`` is wired by the app, shared with Ollama)."""
    body = json_body(HFRequest)
    statuses = responses(*GENERATION_STATUSES, stream="text/event-stream")

    async def tgi_generate(request: Request) -> Response:
        return await generate(ctx, request, await ctx.read_json(request))

    async def tgi_generate_stream(request: Request) -> Response:
        return await generate(ctx, request, await ctx.read_json(request), stream=True)

    async def hf_models(request: Request, model_id: str) -> Response:  # llm-ls' huggingface backend
        return await generate(ctx, request, await ctx.read_json(request))

    router.add_api_route("/generate", tgi_generate, methods=["POST"], openapi_extra=body, responses=statuses,
                         summary="TGI generate (streams with \"stream\": true)")
    router.add_api_route("/generate_stream", tgi_generate_stream, methods=["POST"], openapi_extra=body,
                         responses=responses(*GENERATION_STATUSES, stream="text/event-stream"),
                         summary="TGI generate, streamed as server-sent events")
    # TGI answers generation on its root too (InferenceClient(base_url) posts there)
    router.add_api_route("/", tgi_generate, methods=["POST"], openapi_extra=body, responses=statuses,
                         summary="TGI generate on the root", operation_id="tgi_root_generate")
    router.add_api_route("/models/{model_id:path}", hf_models, methods=["POST"], openapi_extra=body,
                         responses=responses(*sorted(set(GENERATION_STATUSES) | {404}),
                                             stream="text/event-stream"),
                         summary="HF Inference API (llm-ls' huggingface backend)")
