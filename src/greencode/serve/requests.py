"""What goes into the endpoint and what comes out of it, whatever the wire format: a
:class:`GenRequest`, the stream of events a submitted request yields, and the finished
:class:`Completion`. Protocol modules import these without pulling in the engine.

A request submitted to the :class:`~greencode.serve.scheduler.Scheduler` yields, in order:

* one :class:`TokenEvent` per generated token, pushed as the decoding loop chooses the token
  (streamed requests only: ``GenRequest.stream``; a lossless request's once verified);
* one :class:`FinalEvent` with the finished :class:`Completion`.

The concatenation of every ``TokenEvent.text`` and ``FinalEvent.tail`` is exactly
``completion.text``. An error (a deadline passed, the server shutting down, a crash) travels as
a :class:`~greencode.serve.errors.RequestError` (or another exception) raised from the stream in
place of the next event; nothing follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from greencode.decoding.steps import Sampling


@dataclass
class GenRequest(Sampling):
    """One completion, whatever the wire format it came in (its sampling: :class:`Sampling`)."""

    prompt: str
    max_new_tokens: int
    suffix: Optional[str] = None  # the code after the cursor (fill in the middle); FIM markers in the prompt also say it
    stop: list[str] = field(default_factory=list)
    threshold: Optional[float] = None  # None = the server default
    max_disagreement: Optional[float] = None  # a calibrated fidelity target instead of a raw threshold
    fidelity: Optional[str] = None  # the target's criterion: sequence (None) | token | quality
    num_ctx: Optional[int] = None  # client's context limit (Ollama); the model's own is the ceiling
    stream: bool = False  # push a TokenEvent per token as it is produced
    # None: no log probabilities; 0: each returned token's own; n (<= MAX_LOGPROBS): also the n most likely
    logprobs: Optional[int] = None
    mode: Optional[str] = None  # lossy | lossless; None = the server default (serve.default_mode)
    request_id: str = ""
    # what the server says back about the request itself (e.g. a misspelt exit knob it ignored)
    notes: list[str] = field(default_factory=list)


@dataclass
class TokenInfo:
    """One returned token with its log probability (``GenRequest.logprobs``): the log-softmax of
    the logits of the layer that produced it (the exit layer's head; the final layer's for the full
    model), before any sampling temperature."""

    id: int
    text: str  # the token's own text, as the tokenizer decodes it alone
    logprob: float
    offset: int  # where this token's part of Completion.text starts
    special: bool
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), most likely first


@dataclass
class Completion:
    text: str
    prompt_ids: list[int]
    tokens: list[int]
    finish_reason: str  # length | eos | stop | cancelled (the decoding loop's words)
    stats: dict[str, Any]
    token_info: Optional[list[TokenInfo]] = None  # per returned token, when log probabilities were asked

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class TokenEvent:
    """One generated token, as it is produced.

    ``text`` is the editor-text increment this token adds; it may be ``""`` when the text is held
    back (it could still be the start of a stop string, a partial UTF-8 character, or whitespace
    the ``<EOL>`` -> newline conversion may still consume) and a later event or the final
    ``tail`` carries it. ``exit_layer`` is the 0-based layer that produced the token.

    ``logprob`` / ``top_logprobs`` are ``None`` in token events for now: the decoding loop hands
    its logits back only at the end, so per-token log probabilities come with the
    :class:`FinalEvent` (``completion.token_info``); batched decoding will fill them here.
    """

    index: int
    token_id: int
    text: str
    exit_layer: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None


@dataclass
class FinalEvent:
    """The finished completion. ``tail`` is the text no :class:`TokenEvent` carried yet (what
    was held back until the end), so streamed pieces + ``tail`` == ``completion.text``."""

    completion: Completion
    tail: str = ""


Event = Union[TokenEvent, FinalEvent]
