"""Request bodies of every wire format the endpoint speaks, and their validation.

Bodies are parsed by hand (size limit, strict UTF-8, JSON without NaN/Infinity) and then
validated with pydantic in strict mode: a string where a number belongs, a fractional float where
an integer belongs or a boolean where a number belongs is a 422, never silently coerced (an
integral float such as ``5.0`` is the integer 5: JSON does not tell them apart).
Unknown fields are ignored, because editors put arbitrary extras into their request bodies
(llm-vscode's ``llm.requestBody`` is user-defined).

Formats (see the README, section "Serving completions to an editor"):

* seed / huggingface-vscode-endpoint-server: ``{"inputs", "options": {num_predict, temperature,
  top_p, RL_agent_thresh}}`` on ``/api/generate``;
* HF Inference API / TGI: ``{"inputs", "parameters": {max_new_tokens, temperature, top_p, top_k,
  do_sample, stop, return_full_text, seed, details, top_n_tokens}, "stream"}`` on ``/api/generate``,
  ``/generate``, ``/generate_stream``, ``/`` and ``/models/{model}``;
* Ollama: ``{"model", "prompt", "suffix", "options": {num_predict, temperature, top_p, top_k, stop,
  num_ctx, seed}, "stream"}`` on ``/api/generate``;
* OpenAI completions: ``{"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop",
  "stream", "echo", "seed", "logprobs"}`` on ``/v1/completions``.

These models are also the request bodies of the OpenAPI schema (``/openapi.json``), so
schema-driven clients and fuzzers send real bodies.

Every format also accepts the exit threshold as ``RL_agent_thresh`` or ``exit_threshold`` (in
``options`` / ``parameters``; top level for OpenAI), or instead a fidelity target
``max_disagreement`` (the largest expected share of tokens allowed to differ from the full
model's, free-running: sequence consistency), served at the threshold calibrated for it on the
validation split. ``fidelity`` names another calibrated criterion for that target: ``token``
(teacher-forced disagreement with the full model) or ``quality`` (loss of edit similarity
against the real code relative to the full model); ``sequence`` is the default. A setting sent at
both levels takes the inner value (options/parameters), ``exit_threshold`` before ``RL_agent_thresh``;
a target sent with a threshold wins over it; a fidelity without a target is ignored. What JSON Schema
can state is in the schema (one prompt, ``n`` and ``best_of`` 1).

Fill in the middle: ``suffix`` (Ollama, OpenAI, ``/v1/fim/completions``) or a FIM-formatted prompt
(StarCoder, CodeLlama, DeepSeek, Qwen markers, as llm-vscode sends them) is the code after the cursor.
"""

from __future__ import annotations

import difflib
import functools
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from greencode.serve.errors import RequestError

MAX_STOP_STRINGS = 64  # Continue sends ~20 for autocomplete
MAX_STOP_CHARS = 256

def _integral(value: Any) -> Any:
    """An integral float (``5.0``: what JavaScript clients send for 5) is the integer it stands for; any
    other float stays a float and is refused where an integer is meant."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2.0 ** 63:
        return int(value)
    return value


def _false(value: bool) -> bool:
    if value:
        raise ValueError("not supported: the prompt's log probabilities are not returned; send false or leave it out")
    return value


def _int(**bounds: int) -> Any:
    """An integer field with ``bounds`` (``ge``/``le``) that also takes integral floats (strict
    otherwise: no strings, no booleans, no 5.5); the bounds come first so the schema states them."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = _int(ge=0, le=1_000_000)
Seed = _int(ge=0, le=2**63 - 1)
TokenCount = _int(ge=-(2**31), le=2**31)  # range and sign checked per format with a clear message
Stop = Union[str, list[str]]
Mode = Literal["lossy", "lossless"]
Fidelity = Literal["sequence", "token", "quality"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    # fields no schema knows that look like an exit knob (misspelt_knobs), set by validate()
    _knob_hints: list[str] = PrivateAttr(default_factory=list)


# the exit knobs a request may carry (top level, options, parameters); unknown fields are ignored, as the
# protocols' own servers do, but one that looks like a knob is named back to the client (misspelt_knobs)
KNOB_FIELDS = ("exit_threshold", "RL_agent_thresh", "max_disagreement", "fidelity", "mode")


def misspelt_knobs(data: Any) -> list[str]:
    """A line for each field of the body, its ``options`` or its ``parameters`` that no schema reads
    and that is close to an exit knob's name (``exit_treshold``, ``RL_agent_threshold``)."""
    hints = []
    for where, part in (("body", data), ("body.options", (data or {}).get("options")),
                        ("body.parameters", (data or {}).get("parameters"))):
        if not isinstance(part, dict):
            continue
        for key in part:
            close = _close_knob(str(key))
            if close:
                hints.append(f"{where}.{key} is not a field this server reads and was ignored; did you mean "
                             f"{where}.{close}?")
    return hints


@functools.lru_cache(maxsize=1)
def _schema_fields() -> frozenset[str]:
    """Every field name and alias of the request schemas (the subclasses of the request body)."""
    names: set[str] = set(KNOB_FIELDS)
    todo = [_Body]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        for name, f in cls.model_fields.items():
            names.update(x for x in (name, f.alias, f.validation_alias) if isinstance(x, str))
    return frozenset(names)


@functools.lru_cache(maxsize=4096)
def _close_knob(key: str) -> Optional[str]:
    """The knob ``key`` looks like a misspelling of, if any: none for a field some request schema reads
    (``model`` is not a misspelt ``mode``). Cached: difflib costs ~10 µs a key, and clients send the
    same fields every request."""
    if key in _schema_fields():
        return None
    close = difflib.get_close_matches(key, KNOB_FIELDS, n=1, cutoff=0.75)
    return close[0] if close else None


class _Knobs(_Body):
    RL_agent_thresh: Optional[Threshold] = None
    exit_threshold: Optional[Threshold] = None
    max_disagreement: Optional[Fraction] = None
    fidelity: Optional[Fidelity] = None  # the criterion of max_disagreement: sequence (default) | token | quality
    mode: Optional[Mode] = None  # lossy (early exits; default) | lossless (drafted by exits, verified: the full model's output)
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    seed: Optional[Seed] = None
    stop: Optional[Stop] = None


class SeedOptions(_Knobs):
    """``options`` of the seed format and of Ollama (extra Ollama options are ignored)."""

    num_predict: Optional[TokenCount] = None
    num_ctx: Optional[_int(ge=1, le=2**31)] = None


class HFParameters(_Knobs):
    max_new_tokens: Optional[TokenCount] = None
    do_sample: Optional[bool] = None
    stop_sequences: Optional[Stop] = None
    return_full_text: Optional[bool] = None
    details: Optional[bool] = None  # finish reason, token count and each token's id, text and logprob
    top_n_tokens: Optional[_int(ge=0, le=5)] = None  # with details: the n most likely per token
    # the prompt's logprobs are not returned: false only (the schema says so)
    decoder_input_details: Optional[Annotated[bool, Field(json_schema_extra={"const": False}),
                                              AfterValidator(_false)]] = None
    best_of: Optional[_int(ge=1, le=1)] = None  # one candidate per request (the schema says so)


class _TopLevelThreshold(_Body):
    """Clients that can only add top-level body fields (Continue's ``extraBodyProperties``)."""

    RL_agent_thresh: Optional[Threshold] = None
    exit_threshold: Optional[Threshold] = None
    max_disagreement: Optional[Fraction] = None
    fidelity: Optional[Fidelity] = None
    mode: Optional[Mode] = None


class HFRequest(_TopLevelThreshold):
    inputs: str
    parameters: Optional[HFParameters] = None
    options: Optional[SeedOptions] = None  # the seed format (HF's own {use_cache, wait_for_model} parse as empty)
    stream: Optional[bool] = None


class OllamaRequest(_TopLevelThreshold):
    model: Optional[str] = None
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    options: Optional[SeedOptions] = None
    stream: Optional[bool] = None  # Ollama's default is true


class StreamOptions(_Body):
    include_usage: Optional[bool] = None


class OpenAIRequest(_Knobs):
    # echo with logprobs would ask for the prompt's log probabilities, which are not computed: stated here
    model_config = ConfigDict(json_schema_extra={"not": {"required": ["echo", "logprobs"], "properties": {
        "echo": {"const": True}, "logprobs": {"type": "integer"}}}})
    model: Optional[str] = None
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]  # one prompt per request
    suffix: Optional[str] = None  # the code after the cursor (fill in the middle)
    max_tokens: Optional[TokenCount] = None
    n: Optional[_int(ge=1, le=1)] = None  # one completion per request
    best_of: Optional[_int(ge=1, le=1)] = None
    logprobs: Optional[_int(ge=0, le=5)] = None  # each token's logprob and the n most likely
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    echo: Optional[bool] = None


class FimRequest(_Knobs):
    """Mistral's ``/v1/fim/completions`` (Codestral; Continue's Mistral provider): ``prompt`` is the code
    before the cursor, ``suffix`` the code after it."""

    model: Optional[str] = None
    prompt: str
    suffix: Optional[str] = None
    max_tokens: Optional[TokenCount] = None
    min_tokens: Optional[_int(ge=0, le=0)] = None  # a minimum length is not served
    stream: Optional[bool] = None
    random_seed: Optional[_int(ge=0)] = None


class ShowRequest(_Body):
    model: Optional[str] = None
    name: Optional[str] = None


# --------------------------------------------------------------------------- parsing
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send a finite number")


def parse_json_bytes(body: bytes) -> dict:
    """Strict UTF-8 JSON object, or a :class:`RequestError` (400 / 422) saying what is wrong."""
    if not body or not body.strip():
        raise RequestError(400, "the request body is empty; send a JSON object", kind="invalid_json")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start}); "
                                "send UTF-8 encoded JSON", kind="invalid_encoding") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}; send one JSON "
                                "object", kind="invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"malformed JSON: {e}", kind="invalid_json") from None
    if not isinstance(obj, dict):
        raise RequestError(422, f"the request body must be a JSON object, got a JSON {type(obj).__name__}",
                           kind="invalid_request")
    return obj


def _loc(loc: tuple) -> str:
    return ".".join(["body", *(str(p) for p in loc)])


def validate(model_cls: type[BaseModel], data: dict) -> Any:
    """``model_cls.model_validate(data)`` with errors turned into one 422 naming each field; the body
    keeps :func:`misspelt_knobs` of ``data`` (``_knob_hints``)."""
    try:
        body = model_cls.model_validate(data)
        body._knob_hints = misspelt_knobs(data) if isinstance(data, dict) else []
        return body
    except ValidationError as e:
        details = []
        for err in e.errors(include_url=False):
            loc = _loc(tuple(p for p in err["loc"] if not str(p).startswith(("function-", "union["))))
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg = f"{msg} (got {json.dumps(err['input'], default=str)[:60]})"
            details.append({"loc": loc, "msg": msg, "type": err["type"]})
        # collapse the per-branch errors of unions into one line per field
        seen: dict[str, dict] = {}
        for d in details:
            seen.setdefault(d["loc"], d)
        details = list(seen.values())
        message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details)
        raise RequestError(422, f"invalid request: {message}", kind="invalid_request", details=details) from None


def check_text(value: Optional[str], field: str) -> str:
    """Strings from JSON may hold unpaired surrogates (``"\\ud800"``) that no tokenizer can encode."""
    if value is None:
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(422, f"{field} contains an unpaired UTF-16 surrogate escape; send valid Unicode text",
                           kind="invalid_request", loc=field) from None
    return value


def stop_list(*values: Optional[Stop], field: str = "body.stop") -> list[str]:
    """Stop strings from any of the given fields (a string or a list of strings); empty ones dropped."""
    out: list[str] = []
    for v in values:
        if v is None:
            continue
        for s in [v] if isinstance(v, str) else v:
            check_text(s, field)
            if len(s) > MAX_STOP_CHARS:
                raise RequestError(422, f"{field}: a stop string is {len(s)} characters long; the limit is "
                                        f"{MAX_STOP_CHARS}", kind="invalid_request", loc=field)
            if s and s not in out:
                out.append(s)
    if len(out) > MAX_STOP_STRINGS:
        raise RequestError(422, f"{field}: {len(out)} stop strings given; the limit is {MAX_STOP_STRINGS}",
                           kind="invalid_request", loc=field)
    return out


def _first(knobs, *names: str) -> Any:
    """The first value given, in the order of ``knobs`` (options/parameters before the top level) and
    of ``names``; the same setting sent twice with different values is not an error: the first wins."""
    for k in knobs:
        if k is None:
            continue
        for name in names:
            v = getattr(k, name, None)
            if v is not None:
                return v
    return None


def target_of(*knobs: Optional[BaseModel]) -> Optional[float]:
    """``max_disagreement`` (options/parameters, else the top level)."""
    return _first(knobs, "max_disagreement")


def fidelity_of(*knobs: Optional[BaseModel]) -> Optional[str]:
    """``fidelity``: the criterion ``max_disagreement`` is calibrated under (options/parameters, else
    the top level)."""
    return _first(knobs, "fidelity")


def threshold_of(*knobs: Optional[BaseModel]) -> Optional[float]:
    """The exit threshold: ``exit_threshold`` or ``RL_agent_thresh`` (the same setting; options/
    parameters, else the top level; ``exit_threshold`` first); None when absent."""
    return _first(knobs, "exit_threshold", "RL_agent_thresh")


def mode_of(*knobs: Optional[BaseModel]) -> Optional[str]:
    """``mode`` (lossy | lossless) from options/parameters, else the top level; None when absent."""
    return _first(knobs, "mode")
