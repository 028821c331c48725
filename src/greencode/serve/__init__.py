"""The online phase: the early-exit model and its RL exit policy behind an HTTP endpoint that
speaks the formats editors use (seed/HF, TGI, Ollama, OpenAI completions). See the README, section "Serving completions to an editor".

    app = create_app(cfg)                 # FastAPI app over the config's run
    serve(cfg, run_dir=None)              # uvicorn, 127.0.0.1 by default

Layout: ``engine`` (the model side: prepare, run, finish), ``scheduler`` (admission, the worker,
deadlines, cancellation, token events), ``events`` (the one event stream), ``protocols/`` (one
module per wire format), ``app`` (wiring: routes, auth, errors, middleware).
"""

from greencode.serve.app import create_app
from greencode.serve.engine import FULL_MODEL_THRESHOLD, Engine, load_run
from greencode.serve.errors import RequestError
from greencode.serve.requests import Completion, FinalEvent, GenRequest, TokenEvent
from greencode.serve.scheduler import RequestStream, Scheduler
from greencode.serve.server import ServerProcess, serve

__all__ = ["FULL_MODEL_THRESHOLD", "Completion", "Engine", "FinalEvent", "GenRequest", "RequestError",
           "RequestStream", "Scheduler", "ServerProcess", "TokenEvent", "create_app", "load_run", "serve"]
