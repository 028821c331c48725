"""A compiled decoder-layer step: the decode loop's one per-layer call, with static shapes.

The eager loop calls each HF decoder layer from Python, a few dozen kernel launches per layer.
On a GPU at batch 1 those launches can take as long as the layer's own work (a 3B model's
step moves ~6 GB of weights in ~2 ms on an H200), and then an early exit saves little wall
time. :class:`CompiledSteps` runs the same HF layer through ``torch.compile`` instead:

* **Static shapes.** The layer writes the new position's K/V into the cache's preallocated
  buffer (``index_copy_`` at a position held in a tensor, not a Python int) and attends over the
  whole buffer, the columns not yet written masked out; buffers grow by powers of two, so one
  compiled graph serves every step until the next doubling (and a new batch size).
* **One call between decision points.** The layers between two points where the loop needs the
  hidden state (a layer where some row's controller checks, the final layer) run as one compiled
  call: the never-exit loop is one call per token, a fixed exit two, the policy one per exit
  point. The layers are arguments (their weights graph inputs), so segments of the same length
  share one graph whichever layers they hold.
* **Modes.** ``default`` (Inductor's fused kernels), ``reduce-overhead`` (also CUDA graphs: one
  replay per layer), ``max-autotune``, ``max-autotune-no-cudagraphs``: ``torch.compile``'s own.

The loop (:class:`~greencode.decoding.generate.DecodeBatch`) uses it where every row of the
batch runs the layers (with it, rows that exited are carried along until every row has); a layer
run on a subset of rows, the prefill and the exit checks stay
eager. Tokens equal the eager path's (tested on CPU for every controller). Where compiling is
not possible (no C/C++ compiler or Triton, an old torch, a backend error) the first failing call
logs a warning and the loop continues eagerly; :attr:`CompiledSteps.fallback` says why.
It is an option of the loop: ``DecodeBatch(model, layer_step=...)``, ``generate(...,
layer_step=...)`` (a :class:`CompiledSteps`, or None for the eager step). Without one the loop
uses the model's default, which ``decoding.compile`` selects once for the evaluator, the
benchmarks and the endpoint (:func:`use_compiled_steps`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from greencode.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


def layer_step(layers, h: torch.Tensor, mask: torch.Tensor, slots, layer_kwargs: dict) -> torch.Tensor:
    """Consecutive decoder layers on every row for one new position (what is compiled)."""
    for layer, slot in zip(layers, slots):
        h = layer(h, attention_mask=mask, past_key_values=slot, use_cache=True, **layer_kwargs)
        h = h[0] if isinstance(h, tuple) else h
    return h


def _raise_recompile_limit(limit: int = 64) -> None:
    """One graph per (batch size, buffer size): allow more than dynamo's default 8 variants."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit * (4 if name.startswith("accumulated") else 1):
            setattr(cfg, name, limit * (4 if name.startswith("accumulated") else 1))


class CompiledSteps:
    """``torch.compile`` of :func:`layer_step`, falling back to eager on the first failure."""

    def __init__(self, mode: str = "default"):
        if mode not in COMPILE_MODES or mode == "off":
            raise ConfigError(f"decoding.compile={mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.fallback: Optional[str] = None  # why the loop runs eagerly after all
        self.compiled_calls = 0
        self._fn = None
        compile_fn = getattr(torch, "compile", None)
        if compile_fn is None:  # pragma: no cover - torch < 2.0
            self._fail(f"torch {torch.__version__} has no torch.compile")
            return
        _raise_recompile_limit()
        self._fn = compile_fn(layer_step, mode=None if mode == "default" else mode)
        # CUDA graph replays: each call starts a new step (torch's documented pattern), and its output is cloned out
        # of the graph's memory pool, which the next replay may overwrite (one [rows, 1, hidden] copy per call)
        self._step_begin = (getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
                            if mode in GRAPH_MODES and torch.cuda.is_available() else None)

    def _fail(self, reason: str) -> None:
        self.fallback = reason
        log.warning("decoding.compile=%s is not available here (%s); decoding eagerly", self.mode, reason)

    @property
    def active(self) -> bool:
        return self._fn is not None and self.fallback is None

    def prepare(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """CUDA graphs need buffers that stay at one address: say so once per buffer."""
        if self.mode not in GRAPH_MODES or not keys.is_cuda or getattr(keys, "_greencode_static", False):
            return
        mark = getattr(torch._dynamo, "mark_static_address", None)
        if mark is not None:
            for t in (keys, values):
                mark(t)
                t._greencode_static = True

    def __call__(self, layers, h, mask, slots, layer_kwargs):
        if self.active:
            try:
                if self._step_begin is not None:
                    self._step_begin()
                out = self._fn(layers, h, mask, slots, layer_kwargs)
                self.compiled_calls += 1
                return out if self._step_begin is None else out.clone()
            except Exception as e:  # a backend that cannot compile here: the eager step computes the same
                self._fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])
        return layer_step(layers, h, mask, slots, layer_kwargs)

    def describe(self) -> dict:
        return {"mode": self.mode, "active": self.active, "compiled_calls": self.compiled_calls,
                "fallback": self.fallback}


MODEL_DEFAULT = object()  # a loop's layer_step left unsaid: the model's default (use_compiled_steps)


def use_compiled_steps(model, mode: str = "default") -> Optional[CompiledSteps]:
    """Select the layer step the decode loops over ``model`` use when they are given none
    (``decoding.compile``): ``off`` is the eager step; any other mode compiles it. Returns the
    compiled step (None for ``off``); a loop may still be given another (``layer_step=``)."""
    steps = None if mode == "off" else CompiledSteps(mode)
    model.layer_step = steps
    return steps


def default_layer_step(model) -> Optional[CompiledSteps]:
    """The layer step a loop over ``model`` uses when given none (None: eager)."""
    return getattr(model, "layer_step", None)


def compile_info(model) -> dict:
    """What the decode loop of ``model`` runs by default: for result files."""
    steps = default_layer_step(model)
    return {"mode": "off", "active": False} if steps is None else steps.describe()
