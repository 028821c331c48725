"""One module per wire protocol, each over the one internal request type
(:class:`~greencode.serve.engine.GenRequest`) and the one stream of events
(:mod:`greencode.serve.requests`):

* :mod:`.hf`: seed / HF Inference API / TGI (``/api/generate`` with ``inputs``, ``/generate``,
  ``/generate_stream``, ``POST /``, ``/models/{model}``);
* :mod:`.ollama`: Ollama (``/api/generate`` with ``prompt``, ``/api/tags``, ``/api/show``, ``/api/version``);
* :mod:`.openai`: OpenAI completions (``/v1/completions``, ``/v1/models``).

Each parses a validated body into a ``GenRequest`` and turns the events into its own JSON,
SSE or NDJSON; none touches the model (see :class:`.common.ServeContext`). What they share is
written once in :mod:`.common`: building the request (``ServeContext.request``: threshold, target,
fidelity, mode, sampling, stops), answering whole or streamed (``ServeContext.respond``) and the
streaming loop (``relay``), so each protocol keeps only its wire format.
"""

from greencode.serve.protocols.common import ServeContext

__all__ = ["ServeContext"]
