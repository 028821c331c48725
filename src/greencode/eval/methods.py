"""The evaluated methods: names, ids, expansion from the config and validation.

A *family* names a kind of method (``gc``); a *method id* names one row of the results
(``gc@0.9``; thresholds are written as Python floats, ``entropy@1.0``). Ids: ``base``, ``full_hf``, ``full``, ``fixed@L``, ``confidence@T``,
``entropy@T``, ``saturation@T``, ``classifier@T``, ``oracle``, ``gc@T``, ``hf_early_exit@L``. ``L`` is a 0-based decoder-layer
index, ``T`` a threshold. A family name alone expands to the configured parameters
(``fixed`` -> every exit layer, ``gc`` -> ``eval.gc_thresholds``, a controller without a named key ->
``eval.thresholds.<name>`` or its registered default grid). The controller families and everything
about them come from :mod:`greencode.decoding.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from greencode.config import HF_METHODS, ConfigError
from greencode.decoding import registry

# the exit controllers (their families, parameters, grids and descriptions) come from
# greencode.decoding.registry; the rows that are not one controller are named here
HF_FAMILIES = HF_METHODS  # run through HF ``generate``: base, full_hf, hf_early_exit
HF_PARAMS = {"hf_early_exit": "layer"}
HF_DESCRIPTIONS = {
    "base": "base model (not fine-tuned), all layers, HF generate with KV cache",
    "full_hf": "fine-tuned model, all layers, HF generate with KV cache",
    "hf_early_exit": "HF generate with assistant_early_exit (LayerSkip-style self-speculative decoding); "
                     "draft = layers 0..L, every token verified by the full model",
}


def families() -> tuple[str, ...]:
    """Every method family, in the order their rows appear in the summary: the HF rows of the
    full model, the registered controllers, the lossless methods, HF's own early exit."""
    return ("base", "full_hf") + registry.controller_names() + tuple(registry.lossless_methods()) + (
        "hf_early_exit",)


def lossless_families() -> dict[str, str]:
    """{self-speculative family: the controller that drafts for it} (greedy output = the full model's)."""
    return registry.lossless_methods()


def controller_of(family: str) -> Optional[str]:
    """The registered controller a loop family runs (a lossless family's drafter); None for HF rows."""
    if family in registry.controller_names():
        return family
    return lossless_families().get(family)


def param_kind(family: str) -> Optional[str]:
    """``"layer"``, ``"threshold"`` or None (the family takes no parameter)."""
    if family in HF_PARAMS:
        return HF_PARAMS[family]
    ctrl = controller_of(family)
    return registry.get_controller(ctrl).param if ctrl is not None else None


def description(family: str) -> str:
    if family in HF_DESCRIPTIONS:
        return HF_DESCRIPTIONS[family]
    if family in lossless_families():
        return registry.lossless_description(family)
    return registry.get_controller(family).description


def needs(family: str) -> tuple[str, ...]:
    """The run's trained parts (``policy``, ``classifier``) a family needs."""
    ctrl = controller_of(family)
    return registry.get_controller(ctrl).inputs if ctrl is not None else ()


@dataclass(frozen=True)
class MethodSpec:
    family: str
    param: Optional[Union[int, float]] = None

    @property
    def id(self) -> str:
        if self.param is None:
            return self.family
        if param_kind(self.family) == "layer":
            return f"{self.family}@{int(self.param)}"
        return f"{self.family}@{float(self.param)!r}"  # 1.0 -> "1.0", 0.91 -> "0.91"

    @property
    def runs_hf(self) -> bool:
        return self.family in HF_FAMILIES

    @property
    def lossless(self) -> bool:
        return self.family in lossless_families()

    def describe(self) -> dict:
        d = {"id": self.id, "family": self.family, "description": description(self.family)}
        if self.param is not None:
            d[param_kind(self.family)] = self.param
        return d


def known_names_text() -> str:
    return ("families " + ", ".join(families()) + " or ids like fixed@3, confidence@0.9, entropy@1.0, "
            "saturation@0.99, classifier@0.9, gc@0.9, hf_early_exit@3 (layers 0-based)")


def parse_method_name(name: str) -> tuple[str, Optional[Union[int, float]]]:
    """``'gc@0.9'`` -> ``('gc', 0.9)``; ``'gc'`` -> ``('gc', None)``. Unknown names raise ConfigError."""
    raw = str(name).strip()
    family, sep, param = raw.partition("@")
    if family not in families():
        raise ConfigError(f"unknown method {raw!r}; known: {known_names_text()}")
    if not sep:
        return family, None
    kind = param_kind(family)
    if kind is None:
        raise ConfigError(f"method {family!r} takes no parameter (got {raw!r}); use plain {family!r}")
    try:
        value: Union[int, float] = int(param) if kind == "layer" else float(param)
    except ValueError:
        what = "a 0-based layer index (integer)" if kind == "layer" else "a number"
        raise ConfigError(f"method {raw!r}: the part after '@' must be {what}") from None
    ctrl = controller_of(family)
    if ctrl is not None:
        registry.get_controller(ctrl).check_param(value, f"method {raw!r}: {kind}")
    elif value < 0:
        raise ConfigError(f"method {raw!r}: layer must be >= 0 (0-based)")
    return family, value


def split_names(names: Union[str, Sequence[str], None]) -> Optional[list[str]]:
    """Accept ``"full,gc@0.9"`` or ``["full", "gc@0.9"]`` (commas allowed inside items)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    out = [p.strip() for n in names for p in str(n).split(",") if p.strip()]
    if not out:
        raise ConfigError(f"no method names given; known: {known_names_text()}")
    return out


def expand_methods(names: Sequence[str], eval_cfg, exit_layers: Sequence[int], final_layer: int) -> list[MethodSpec]:
    """Method specs for ``names`` (families and/or ids) with the config's parameters, in
    summary order, duplicates removed. Layer parameters are checked against the model."""
    specs: list[MethodSpec] = []
    for name in names:
        family, param = parse_method_name(name)
        kind = param_kind(family)
        if param is not None:
            if kind == "layer" and not 0 <= int(param) < final_layer:
                raise ConfigError(f"method {family}@{param}: layer {param} is out of range [0, {final_layer - 1}] "
                                  f"(0-based; {final_layer} is the final layer, i.e. the full model)")
            specs.append(MethodSpec(family, param))
        elif family == "hf_early_exit":
            layers = eval_cfg.hf_early_exit_layers if eval_cfg.hf_early_exit_layers is not None else exit_layers
            for layer in layers:
                if not 0 <= int(layer) < final_layer:
                    raise ConfigError(f"eval.hf_early_exit_layers has {layer}, out of range [0, {final_layer - 1}]")
            specs += [MethodSpec("hf_early_exit", int(layer)) for layer in layers]
        elif kind == "layer":  # every exit layer
            specs += [MethodSpec(family, int(layer)) for layer in exit_layers]
        elif kind == "threshold":  # the configured grid (a lossless family: its drafter's)
            _, grid = registry.threshold_grid(eval_cfg, controller_of(family))
            specs += [MethodSpec(family, float(t)) for t in grid]
        else:
            specs.append(MethodSpec(family))
    seen: set[str] = set()
    unique = [s for s in specs if not (s.id in seen or seen.add(s.id))]
    order = {f: i for i, f in enumerate(families())}
    return sorted(unique, key=lambda s: (order[s.family], s.param if s.param is not None else 0))
