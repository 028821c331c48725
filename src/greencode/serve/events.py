"""The one stream of completion events every wire protocol turns into its own format.

A request submitted to the :class:`~greencode.serve.scheduler.Scheduler` yields, in order:

* one :class:`TokenEvent` per generated token, pushed as the decoding loop chooses the token
  (streamed requests only: ``GenRequest.stream``);
* one :class:`FinalEvent` with the finished :class:`~greencode.serve.engine.Completion`.

The concatenation of every ``TokenEvent.text`` and ``FinalEvent.tail`` is exactly
``completion.text``. An error (a deadline passed, the server shutting down, a crash) travels as
a :class:`~greencode.serve.errors.RequestError` (or another exception) raised from the stream in
place of the next event; nothing follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from greencode.serve.engine import Completion


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

    completion: "Completion"
    tail: str = ""


Event = Union[TokenEvent, FinalEvent]
