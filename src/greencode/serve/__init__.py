"""The online phase: the early-exit model and its RL exit policy behind an HTTP endpoint that
speaks the formats editors use (seed/HF, TGI, Ollama, OpenAI completions). See the README, section "Serving completions to an editor".

    app = create_app(cfg)                 # FastAPI app over the config's run
    serve(cfg, run_dir=None)              # uvicorn, 127.0.0.1 by default
"""

from greencode.serve.app import create_app
from greencode.serve.engine import FULL_MODEL_THRESHOLD, Completion, Engine, GenRequest, load_run
from greencode.serve.errors import RequestError
from greencode.serve.server import ServerProcess, serve

__all__ = ["FULL_MODEL_THRESHOLD", "Completion", "Engine", "GenRequest", "RequestError", "ServerProcess",
           "create_app", "load_run", "serve"]
