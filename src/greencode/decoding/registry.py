"""One registry of exit controllers: a controller is one class, registered once.

An entry says everything the rest of the project needs to know about a controller:

* ``name``: the method family in configs, method ids and results (``confidence``, ``gc@0.9``);
* ``param``: what its parameter is (``"threshold"``, ``"layer"``: a 0-based exit layer, or none),
  the allowed range of a threshold (``bounds``) and which end of it is the most conservative
  (``conservative``: ``"high"`` exits least at high thresholds, ``"low"`` at low ones);
* ``grid``: its default thresholds for evaluation, ``calibration_grid`` its default candidates for
  calibration (a config's ``eval.thresholds.<name>`` / ``calibration.thresholds.<name>``, or the
  older named keys such as ``eval.gc_thresholds``, replace them);
* ``needs``: what it needs beyond the hidden state: ``logits`` (the loop pays for the LM head at
  each checked exit point), ``policy`` (the run's exported RL policy), ``classifier`` (the
  supervised exit classifier); a method whose input is missing is skipped with the reason;
* ``cost``: the cost of one check, in words; the number that enters the compute ratio is what the
  loop counts at each check (``counters["controller_macs"]``): the instance's
  :meth:`~greencode.decoding.ExitController.check_macs` at that exit point (default ``macs_per_check``,
  set once it knows the model). The LM head it asks for is counted by the loop as an LM-head call, at
  every check with ``needs_logits`` or at the checks :meth:`~greencode.decoding.ExitController.logits_at`
  names (``cheap_confidence``: the first exit point only), and a token exiting there is chosen from
  those logits (never a second head);
* ``factory``: how to build it from its parameter and the run's :class:`Resources` (default:
  ``cls(param)``, or ``cls()`` without a parameter).

Adding a controller is its class and one call, as a decorator or not::

    @register_controller("depth_cap", param="threshold", grid=(0.5, 0.75),
                         description="exit at the first exit point at or past this share of the depth")
    class DepthCap(ExitController): ...

and it is evaluated (``eval.methods: [depth_cap]``), calibrated (``calibration.families``),
validated by the config and served (``serve.controller: depth_cap``) with no other edit.

The evaluator (method families, ``Runner.controller``), calibration (candidate families, grids and
their order), the methods tables, config validation and the endpoint read this registry; none of
them names a controller. Lossless methods (draft with a registered controller, verify with the full
model) are registered here too (:func:`register_lossless`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from greencode.decoding.controllers import (CheapConfidenceExit, ConfidenceExit, EntropyExit, ExitController,
                                            FixedExit, NeverExit, OracleExit, PolicyExit, SaturationExit)
from greencode.errors import ConfigError

PARAM_KINDS = ("threshold", "layer")
NEEDS = ("logits", "policy", "classifier")


@dataclass(frozen=True)
class Resources:
    """What a controller may be built from, beyond its parameter: the run's trained parts."""

    policy: Any = None  # the exported RL exit policy
    classifier: Any = None  # the supervised exit classifier (same file format)
    policy_temperature: float = 1.0  # decoding.policy_temperature
    # the run's candidate source for the cheap candidate features ({"source", "k"}: rl.candidate_source,
    # rl.candidate_k; what the learned controllers observe); None: first_full, k = 4
    candidates: Optional[dict] = None


@dataclass(frozen=True)
class ControllerInfo:
    """One registered controller (see the module docstring for the fields)."""

    name: str
    cls: type
    factory: Callable[[Resources, Optional[float]], ExitController]
    param: Optional[str] = None
    grid: tuple[float, ...] = ()
    calibration_grid: tuple[float, ...] = ()
    bounds: tuple[Optional[float], Optional[float]] = (0.0, 1.0)
    conservative: str = "high"
    needs: frozenset = field(default_factory=frozenset)
    cost: str = ""
    description: str = ""
    label: str = ""  # what a served completion's ``controller`` statistic calls it

    @property
    def inputs(self) -> tuple[str, ...]:
        """The run's trained parts it needs (``policy``, ``classifier``), in a fixed order."""
        return tuple(n for n in ("policy", "classifier") if n in self.needs)

    def check_param(self, value, where: str) -> float:
        """``value`` as this controller's parameter; a ConfigError naming ``where`` when it is not one."""
        if self.param is None:
            raise ConfigError(f"{where}: controller {self.name!r} takes no parameter")
        if self.param == "layer":
            if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float)
                                                                               and value.is_integer()):
                raise ConfigError(f"{where}={value!r}: {self.name!r} takes a 0-based layer index (an integer)")
            if value < 0:
                raise ConfigError(f"{where}={value!r} must be >= 0 (0-based)")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"{where}={value!r}: {self.name!r} takes a threshold (a number)")
        low, high = self.bounds
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{where}={value!r} is out of range; {self.name} thresholds must be {self.range_text()}")
        return float(value)

    def range_text(self) -> str:
        low, high = self.bounds
        if low is not None and high is not None:
            return f"in [{low:g}, {high:g}]"
        if low is not None:
            return f">= {low:g}"
        return "any number" if high is None else f"<= {high:g}"

    def missing(self, resources: Resources) -> list[str]:
        """The inputs it needs that ``resources`` lack."""
        return [n for n in self.inputs if getattr(resources, n) is None]

    def build(self, param: Optional[float] = None, resources: Resources = Resources()) -> ExitController:
        """A new controller instance at ``param`` (checked) from ``resources``."""
        if self.param is not None:
            if param is None:
                raise ConfigError(f"controller {self.name!r} needs its {self.param} ({self.name}@<{self.param}>)")
            param = self.check_param(param, f"{self.name}@{param}")
        elif param is not None:
            raise ConfigError(f"controller {self.name!r} takes no parameter (got {param!r})")
        missing = self.missing(resources)
        if missing:
            raise ConfigError(f"controller {self.name!r} needs the run's {' and '.join(missing)}, which is not loaded")
        return self.factory(resources, param)

    def candidates(self, grid: Sequence[float], exit_layers: Sequence[int]) -> list:
        """Calibration's candidates, most conservative first (an order fixed before any data):
        the deepest exit layer first for a layer, else from the conservative end of ``grid``."""
        if self.param == "layer":
            return [int(x) for x in sorted(exit_layers, reverse=True)]
        return [float(t) for t in sorted(set(grid), reverse=self.conservative == "high")]


_CONTROLLERS: dict[str, ControllerInfo] = {}
_LOSSLESS: dict[str, tuple[str, str]] = {}  # method family -> (drafting controller, description)


def _default_factory(cls: type, param: Optional[str]) -> Callable[[Resources, Optional[float]], ExitController]:
    if param is None:
        return lambda resources, value: cls()
    return lambda resources, value: cls(value)


def register_controller(name: str, cls: Optional[type] = None, *, param: Optional[str] = None,
                        grid: Sequence[float] = (), calibration_grid: Optional[Sequence[float]] = None,
                        bounds: tuple[Optional[float], Optional[float]] = (0.0, 1.0), conservative: str = "high",
                        needs: Sequence[str] = (), cost: str = "", description: str = "",
                        label: Optional[str] = None,
                        factory: Optional[Callable[[Resources, Optional[float]], ExitController]] = None):
    """Register controller ``name`` (see the module docstring). With ``cls`` it registers at once
    and returns the entry; without, it is a class decorator. ``logits`` is added to ``needs`` when
    the class says ``needs_logits``. Names are unique: registering one twice is an error (use
    :func:`unregister_controller` first)."""

    def add(klass: type):
        if not (isinstance(klass, type) and issubclass(klass, ExitController)):
            raise TypeError(f"controller {name!r}: {klass!r} is not an ExitController subclass")
        if not name or "@" in name or "," in name or name != name.strip():
            raise ValueError(f"controller name {name!r}: use a plain word (no '@', ',' or spaces around it)")
        if name in _CONTROLLERS or name in _LOSSLESS:
            raise ValueError(f"controller {name!r} is registered already")
        if param is not None and param not in PARAM_KINDS:
            raise ValueError(f"controller {name!r}: param={param!r}; use one of {PARAM_KINDS} or None")
        if conservative not in ("high", "low"):
            raise ValueError(f"controller {name!r}: conservative={conservative!r}; use 'high' or 'low'")
        wants = set(needs) | ({"logits"} if getattr(klass, "needs_logits", False) else set())
        unknown = wants - set(NEEDS)
        if unknown:
            raise ValueError(f"controller {name!r}: unknown needs {sorted(unknown)}; known: {NEEDS}")
        info = ControllerInfo(name=name, cls=klass, factory=factory or _default_factory(klass, param), param=param,
                              grid=tuple(float(t) for t in grid),
                              calibration_grid=tuple(float(t) for t in (grid if calibration_grid is None
                                                                        else calibration_grid)),
                              bounds=bounds, conservative=conservative, needs=frozenset(wants), cost=cost,
                              description=description or (klass.__doc__ or name).strip().splitlines()[0],
                              label=label or name)
        for t in info.grid + info.calibration_grid:
            info.check_param(t, f"controller {name!r} default grid")
        _CONTROLLERS[name] = info
        return info

    if cls is not None:
        return add(cls)

    def decorator(klass: type) -> type:
        add(klass)
        return klass

    return decorator


def unregister_controller(name: str) -> None:
    """Remove a registered controller (tests that register a toy one clean up with it)."""
    _CONTROLLERS.pop(name, None)


def register_lossless(name: str, drafter: str, description: str) -> None:
    """A lossless method ``name``: drafts with controller ``drafter`` (its parameter is the
    method's), verifies with the full model; its output is the full model's."""
    if name in _CONTROLLERS or name in _LOSSLESS:
        raise ValueError(f"method {name!r} is registered already")
    _LOSSLESS[name] = (drafter, description)


def controllers() -> tuple[ControllerInfo, ...]:
    """Every registered controller, in registration order (the order of the rows in results)."""
    return tuple(_CONTROLLERS.values())


def controller_names() -> tuple[str, ...]:
    return tuple(_CONTROLLERS)


def lossless_methods() -> dict[str, str]:
    """{lossless method family: the controller that drafts for it}, in registration order."""
    return {name: drafter for name, (drafter, _) in _LOSSLESS.items() if drafter in _CONTROLLERS}


def lossless_description(name: str) -> str:
    return _LOSSLESS[name][1]


def get_controller(name: str, where: str = "controller") -> ControllerInfo:
    """The entry of ``name``; a ConfigError listing the registered ones when there is none."""
    info = _CONTROLLERS.get(name)
    if info is None:
        raise ConfigError(f"{where}: unknown controller {name!r}; registered: {', '.join(_CONTROLLERS)}")
    return info


def build_controller(name: str, param: Optional[float] = None, resources: Resources = Resources()) -> ExitController:
    """``name`` at ``param`` (checked), built from ``resources``."""
    return get_controller(name).build(param, resources)


def threshold_grid(section, name: str, *, calibration: bool = False) -> tuple[str, list[float]]:
    """(the config key it came from, the thresholds) of controller ``name`` in a config section
    (``EvalConfig`` or ``CalibrationConfig``): ``<section>.thresholds[name]`` when given, else the
    section's named key ``<name>_thresholds`` where it has one (the keys configs have always used),
    else the registry's default (``calibration_grid`` for calibration)."""
    info = get_controller(name)
    mapping = getattr(section, "thresholds", None) or {}
    if name in mapping:
        return f"thresholds.{name}", list(mapping[name])
    named = getattr(section, f"{name}_thresholds", None)
    if named is not None:
        return f"{name}_thresholds", list(named)
    return "(registry default)", list(info.calibration_grid if calibration else info.grid)


def validate_section(section, path: str, *, calibration: bool = False) -> None:
    """Config validation of a section's thresholds (every registered threshold controller's grid
    within its bounds; ``<path>.thresholds`` naming registered threshold controllers only)."""
    for name in getattr(section, "thresholds", None) or {}:
        info = _CONTROLLERS.get(name)
        if info is None or info.param != "threshold":
            known = [c.name for c in _CONTROLLERS.values() if c.param == "threshold"]
            raise ConfigError(f"{path}.thresholds has {name!r}, which is not a registered threshold controller; "
                              f"known: {', '.join(known)}")
    for info in _CONTROLLERS.values():
        if info.param != "threshold":
            continue
        key, grid = threshold_grid(section, info.name, calibration=calibration)
        for t in grid:
            info.check_param(t, f"{path}.{key}")


# --------------------------------------------------------------------------- the built-in controllers
# cheap_confidence's grids, chosen to span compute: the max softmax over 4 candidates is >= 0.25 by construction
# (a threshold at or below it exits every token at the first exit point), and 1.0 never exits, which costs
# MORE than the full model (every token pays the first exit point's full head: 1.18 on the default). Estimated
# on the shipped base (assets/default-base, no LITE), teacher forced over 40 validation files (10,070 tokens),
# compute ratio (token risk): 0.3 -> 0.45 (38%), 0.4 -> 0.55 (29%), 0.5 -> 0.68 (17%), 0.6 -> 0.80 (8.4%),
# 0.7 -> 0.91 (3.5%), 0.8 -> 1.00 (1.1%), 0.9 -> 1.08 (0.3%), 0.95 -> 1.11. So the grid covers about 0.5 to the
# full model's compute; past 0.8 a threshold only adds cost.
CHEAP_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CHEAP_CALIBRATION_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)

# in the order their rows appear in results (after the HF-generate rows base and full_hf)
register_controller("full", NeverExit, cost="none: no exit checks; every layer and one LM head per token",
                    description="fine-tuned model, all layers, our decoding loop (NeverExit)")
register_controller("fixed", FixedExit, param="layer", cost="none: the exit layer is fixed",
                    description="every token exits at one fixed 0-based layer")
register_controller("confidence", ConfidenceExit, param="threshold", grid=(0.5, 0.7, 0.9),
                    calibration_grid=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99), bounds=(0.0, 1.0), conservative="high",
                    cost="the LM head at each checked exit point, then a softmax over the vocabulary",
                    description="exit when the max softmax probability at an exit point >= threshold")
register_controller("entropy", EntropyExit, param="threshold", grid=(0.5, 1.0, 2.0),
                    calibration_grid=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5), bounds=(0.0, None), conservative="low",
                    cost="the LM head at each checked exit point, then the entropy of its softmax",
                    description="exit when the prediction entropy (nats) at an exit point <= threshold")
register_controller("saturation", SaturationExit, param="threshold", grid=(0.9, 0.95, 0.99),
                    calibration_grid=(0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999), bounds=(-1.0, 1.0),
                    conservative="high", cost="3 x hidden_size MACs (a dot product and two norms); no LM head",
                    description="exit when the cosine between consecutive exit points' hidden states >= threshold "
                                "(CALM)")
register_controller("cheap_confidence", CheapConfidenceExit, param="threshold", grid=CHEAP_GRID,
                    calibration_grid=CHEAP_CALIBRATION_GRID, bounds=(0.0, 1.0), conservative="high",
                    cost="the run's candidate source (rl.candidate_source, rl.candidate_k): at the first exit point "
                         "the rank-32 head and a 64-token shortlist's exact logits (low_rank), or the full LM head "
                         "(first_full: the loop's head call, which chooses the token when it exits there); then per "
                         "check the norm, k candidate logits (k x hidden MACs) and their softmax: "
                         "ExitController.check_macs per exit point",
                    description="cheap confidence: exit when the max softmax over k candidate tokens' logits "
                                "(the run's candidate source, rl.candidate_source) >= threshold",
                    factory=lambda r, t: CheapConfidenceExit(t, **(r.candidates or {})))
# (the class takes source, k and score: register a variant under another name with a factory, e.g.
# factory=lambda r, t: CheapConfidenceExit(t, score="margin"))
register_controller("classifier", PolicyExit, param="threshold", grid=(0.5, 0.7, 0.9),
                    calibration_grid=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995), needs=("classifier",),
                    cost="the classifier MLP's weights in MACs (the final norm folded in); no LM head",
                    description="supervised exit classifier (CALM), the agent's MLP size on the same bank: exit when "
                                "P(agrees with the final layer) >= threshold",
                    factory=lambda r, t: PolicyExit.of(r.classifier, t, name="classifier"))
register_controller("oracle", OracleExit, cost="every layer and every exit point's LM head (analysis only)",
                    description="first exit point agreeing with the final layer; runs every layer (analysis only)")
register_controller("gc", PolicyExit, param="threshold", grid=(0.6, 0.8, 0.9, 0.91, 0.92, 0.94),
                    calibration_grid=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995), needs=("policy",), label="policy",
                    cost="the policy MLP's weights in MACs (the final norm folded in); no LM head",
                    description="GREEN-CODE RL policy: exit when P(exit) >= threshold",
                    factory=lambda r, t: PolicyExit.of(r.policy, t, r.policy_temperature))

register_lossless("gc_lossless", "gc",
                  "lossless GC: drafts up to eval.lossless_k_max tokens exiting where the RL policy says "
                  "(P(exit) >= threshold; with eval.lossless_draft_threshold, drafting also stops after a token "
                  "whose exit-layer max probability is below it), verifies them in one full-model pass; "
                  "output = the full model's")
register_lossless("layerskip", "fixed",
                  "LayerSkip-style static self-speculation: drafts up to eval.lossless_k_max tokens at a fixed "
                  "0-based exit layer, verifies them in one full-model pass; output = the full model's")
