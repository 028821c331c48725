"""The OpenAI completions protocol: ``POST /v1/completions``, ``GET /v1/models``.

Answers: a ``text_completion`` object (``choices[0].text``, ``finish_reason``, ``usage``, plus
``greencode``); streamed: Server-Sent Events, one chunk per token piece as it is produced, a last
chunk with ``finish_reason`` (and any text held back until the end), the usage chunk when
``stream_options.include_usage``, then ``data: [DONE]``. An error after the stream started is a
``data: {"error": {...}}`` event (the openai client raises it), then ``data: [DONE]``.

``logprobs: n`` (0..5) returns ``choices[0].logprobs`` = ``{tokens, token_logprobs, top_logprobs,
text_offset}``: each returned token's text (as the tokenizer decodes it alone), its log
probability under the layer that produced it, the ``n`` most likely alternatives, and where its
text starts in ``choices[0].text``. In a stream the token chunks carry ``logprobs: null`` for now
and the last chunk carries the whole object.

The schema states what is not served: ``n`` or ``best_of`` above 1, more than one prompt; a 422
says so. ``echo`` with ``logprobs`` is a 422 too (the prompt's log probabilities are not computed).
``suffix`` is the code after the cursor (fill in the middle).

``POST /v1/fim/completions`` is Mistral's fill-in-the-middle route (Codestral; Continue's Mistral
provider): ``{model, prompt, suffix, max_tokens, temperature, top_p, stop, stream, random_seed}``
answered as a ``chat.completion`` (``choices[0].message.content``), streamed as
``chat.completion.chunk`` events (``choices[0].delta.content``) ending with ``data: [DONE]``.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response

from greencode.serve.requests import Completion, GenRequest
from greencode.serve.errors import RequestError
from greencode.serve.requests import Event
from greencode.serve.protocols.common import (GENERATION_STATUSES, INFO_STATUSES, ServeContext, error_message,
                                              json_body, relay, responses, sse_data)
from greencode.serve.schemas import FimRequest, OpenAIRequest, check_text, validate

OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def parse(ctx: ServeContext, data: dict) -> tuple[OpenAIRequest, GenRequest, str]:
    """A validated body -> (body, the internal request, the prompt)."""
    body = validate(OpenAIRequest, data)
    prompt = body.prompt[0] if isinstance(body.prompt, list) else body.prompt  # the schema allows one
    if body.echo and body.logprobs is not None:
        raise RequestError(422, "body.echo with body.logprobs: the prompt's log probabilities are not computed; "
                                "send one of them", loc="body.logprobs")
    gen = ctx.request([body], prompt=check_text(prompt, "body.prompt"), suffix=check_text(body.suffix, "body.suffix"),
                      max_new_tokens=ctx.max_tokens(body.max_tokens, "body.max_tokens"), defaults=OPENAI_DEFAULTS,
                      temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                      stop=[body.stop], logprobs=body.logprobs)
    return body, gen, prompt


def logprobs(c: Completion, n: Optional[int]) -> Optional[dict]:
    """OpenAI's ``choices[0].logprobs`` of a completion (None when not asked)."""
    if n is None or c.token_info is None:
        return None
    infos = c.token_info
    top: Optional[list] = None
    if n:
        top = []
        for i in infos:
            alternatives: dict[str, float] = {}
            for _, text, lp in i.top:
                alternatives.setdefault(text, lp)
            top.append(alternatives)
    return {"tokens": [i.text for i in infos], "token_logprobs": [i.logprob for i in infos], "top_logprobs": top,
            "text_offset": [i.offset for i in infos]}


def _error_event(e: Exception) -> str:
    """An error after the stream started, as OpenAI sends it (the openai client raises it)."""
    status, message, kind = error_message(e)
    return sse_data({"error": {"message": message, "type": kind, "param": None, "code": status}})


DONE = "data: [DONE]\n\n"


def _stream(events: AsyncIterator[Event], token, final, first: tuple = ()) -> AsyncIterator[str]:
    """An OpenAI stream: the events as chunks, an error in-band, then ``[DONE]``."""
    return relay(events, token, final, _error_event, first=first, last=(DONE,))


def _finish(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def sse(ctx: ServeContext, events: AsyncIterator[Event], body: OpenAIRequest, gen: GenRequest,
        prefix: str) -> AsyncIterator[str]:
    cid, created = f"cmpl-{gen.request_id}", int(time.time())

    def chunk(text: str, finish_reason: Optional[str], lp: Optional[dict] = None, **extra) -> str:
        return sse_data({"id": cid, "object": "text_completion", "created": created, "model": ctx.name,
                         "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish_reason}],
                         **extra})

    def final(ev) -> list[str]:
        c = ev.completion
        out = [chunk(ev.tail, _finish(c), logprobs(c, gen.logprobs), greencode=c.stats)]
        if body.stream_options is not None and body.stream_options.include_usage:
            out.append(sse_data({"id": cid, "object": "text_completion", "created": created, "model": ctx.name,
                                 "choices": [], "usage": _usage(c)}))
        return out

    return _stream(events, lambda ev: ev.text and chunk(ev.text, None), final,
                   first=(chunk(prefix, None),) if prefix else ())


async def completions(ctx: ServeContext, request: Request) -> Response:
    body, gen, prompt = parse(ctx, await ctx.read_json(request))
    prefix = prompt if body.echo else ""

    def answer(c: Completion) -> dict[str, Any]:
        return {"id": f"cmpl-{gen.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": ctx.name,
                "choices": [{"text": prefix + c.text, "index": 0, "logprobs": logprobs(c, gen.logprobs),
                             "finish_reason": _finish(c)}],
                "usage": _usage(c), "greencode": c.stats}

    return await ctx.respond(request, gen, "openai", bool(body.stream), answer,
                             lambda events: sse(ctx, events, body, gen, prefix))


def parse_fim(ctx: ServeContext, data: dict) -> tuple[GenRequest, bool]:
    """A validated ``/v1/fim/completions`` body -> (the internal request, streamed)."""
    body = validate(FimRequest, data)
    return ctx.request([body], prompt=check_text(body.prompt, "body.prompt"), suffix=check_text(body.suffix, "body.suffix"),
                       max_new_tokens=ctx.max_tokens(body.max_tokens, "body.max_tokens"), defaults=OPENAI_DEFAULTS,
                       temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                       seed=body.random_seed if body.random_seed is not None else body.seed,
                       stop=[body.stop]), bool(body.stream)


def fim_sse(ctx: ServeContext, events: AsyncIterator[Event], gen: GenRequest) -> AsyncIterator[str]:
    cid, created = f"fim-{gen.request_id}", int(time.time())

    def chunk(delta: dict, finish_reason: Optional[str], **extra) -> str:
        return sse_data({"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})

    def final(ev) -> list[str]:
        c = ev.completion
        return [chunk({"content": ev.tail}, _finish(c), usage=_usage(c), greencode=c.stats)]

    return _stream(events, lambda ev: ev.text and chunk({"content": ev.text}, None), final,
                   first=(chunk({"role": "assistant", "content": ""}, None),))


async def fim_completions(ctx: ServeContext, request: Request) -> Response:
    gen, stream = parse_fim(ctx, await ctx.read_json(request))

    def answer(c: Completion) -> dict[str, Any]:
        return {"id": f"fim-{gen.request_id}", "object": "chat.completion", "created": int(time.time()),
                "model": ctx.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text, "tool_calls": None},
                             "finish_reason": _finish(c)}],
                "usage": _usage(c), "greencode": c.stats}

    return await ctx.respond(request, gen, "fim", stream, answer, lambda events: fim_sse(ctx, events, gen))


def register(router: APIRouter, ctx: ServeContext) -> None:
    async def openai_completions(request: Request) -> Response:
        return await completions(ctx, request)

    async def fim_route(request: Request) -> Response:
        return await fim_completions(ctx, request)

    async def openai_models() -> dict:
        return {"object": "list", "data": [{"id": ctx.name, "object": "model", "created": int(ctx.started),
                                            "owned_by": "greencode", "greencode": ctx.info}]}

    router.add_api_route("/v1/completions", openai_completions, methods=["POST"],
                         openapi_extra=json_body(OpenAIRequest),
                         responses=responses(*GENERATION_STATUSES, openai=True, stream="text/event-stream"),
                         summary="OpenAI completions (streams with \"stream\": true)")
    router.add_api_route("/v1/fim/completions", fim_route, methods=["POST"], openapi_extra=json_body(FimRequest),
                         responses=responses(*GENERATION_STATUSES, openai=True, stream="text/event-stream"),
                         summary="Mistral fill-in-the-middle completions (Codestral's route; streams with \"stream\": true)")
    router.add_api_route("/v1/models", openai_models, methods=["GET"],
                         responses=responses(*INFO_STATUSES, openai=True), summary="OpenAI: list models")
