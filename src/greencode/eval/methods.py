"""The evaluated methods: names, ids, expansion from the config and validation.

A *family* names a kind of method (``gc``); a *method id* names one row of the results
(``gc@0.9``; thresholds are written as Python floats, ``entropy@1.0``). Ids: ``base``, ``full_hf``, ``full``, ``fixed@L``, ``confidence@T``,
``entropy@T``, ``saturation@T``, ``classifier@T``, ``oracle``, ``gc@T``, ``hf_early_exit@L``. ``L`` is a 0-based decoder-layer
index, ``T`` a threshold. A family name alone expands to the configured parameters
(``fixed`` -> every exit layer, ``gc`` -> ``eval.gc_thresholds``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from greencode.config import ConfigError

# the families in the order their rows appear in the summary
FAMILIES = ("base", "full_hf", "full", "fixed", "confidence", "entropy", "saturation", "classifier", "oracle", "gc",
            "gc_lossless", "layerskip", "hf_early_exit")
PARAM_FAMILIES = {"fixed": "layer", "confidence": "threshold", "entropy": "threshold", "saturation": "threshold",
                  "classifier": "threshold", "gc": "threshold", "gc_lossless": "threshold", "layerskip": "layer",
                  "hf_early_exit": "layer"}
# self-speculative: draft with early exits, verify with the full model (greedy output = the full model's)
LOSSLESS_FAMILIES = ("gc_lossless", "layerskip")
# the eval config list a threshold family expands to when named without a parameter
THRESHOLD_GRIDS = {"confidence": "confidence_thresholds", "entropy": "entropy_thresholds", "gc": "gc_thresholds",
                   "gc_lossless": "gc_thresholds", "saturation": "saturation_thresholds",
                   "classifier": "classifier_thresholds"}
# the exit controllers compared at calibrated targets (scripts/calibrate.py)
CONTROLLER_FAMILIES = ("fixed", "confidence", "entropy", "saturation", "classifier", "gc")
HF_FAMILIES = ("base", "full_hf", "hf_early_exit")  # run through HF ``generate``

DESCRIPTIONS = {
    "base": "base model (not fine-tuned), all layers, HF generate with KV cache",
    "full_hf": "fine-tuned model, all layers, HF generate with KV cache",
    "full": "fine-tuned model, all layers, our decoding loop (NeverExit)",
    "fixed": "every token exits at one fixed 0-based layer",
    "confidence": "exit when the max softmax probability at an exit point >= threshold",
    "entropy": "exit when the prediction entropy (nats) at an exit point <= threshold",
    "saturation": "exit when the cosine between consecutive exit points' hidden states >= threshold (CALM)",
    "classifier": "supervised exit classifier (CALM), the agent's MLP size on the same bank: exit when "
                  "P(agrees with the final layer) >= threshold",
    "oracle": "first exit point agreeing with the final layer; runs every layer (analysis only)",
    "gc": "GREEN-CODE RL policy: exit when P(exit) >= threshold",
    "gc_lossless": "lossless GC: drafts up to eval.lossless_k_max tokens exiting where the RL policy says "
                   "(P(exit) >= threshold; with eval.lossless_draft_threshold, drafting also stops after a token "
                   "whose exit-layer max probability is below it), verifies them in one full-model pass; "
                   "output = the full model's",
    "layerskip": "LayerSkip-style static self-speculation: drafts up to eval.lossless_k_max tokens at a fixed "
                 "0-based exit layer, verifies them in one full-model pass; output = the full model's",
    "hf_early_exit": "HF generate with assistant_early_exit (LayerSkip-style self-speculative decoding); "
                     "draft = layers 0..L, every token verified by the full model",
}


@dataclass(frozen=True)
class MethodSpec:
    family: str
    param: Optional[Union[int, float]] = None

    @property
    def id(self) -> str:
        if self.param is None:
            return self.family
        if PARAM_FAMILIES[self.family] == "layer":
            return f"{self.family}@{int(self.param)}"
        return f"{self.family}@{float(self.param)!r}"  # 1.0 -> "1.0", 0.91 -> "0.91"

    @property
    def runs_hf(self) -> bool:
        return self.family in HF_FAMILIES

    def describe(self) -> dict:
        d = {"id": self.id, "family": self.family, "description": DESCRIPTIONS[self.family]}
        if self.param is not None:
            d[PARAM_FAMILIES[self.family]] = self.param
        return d


def known_names_text() -> str:
    return ("families " + ", ".join(FAMILIES) + " or ids like fixed@3, confidence@0.9, entropy@1.0, "
            "saturation@0.99, classifier@0.9, gc@0.9, hf_early_exit@3 (layers 0-based)")


def parse_method_name(name: str) -> tuple[str, Optional[Union[int, float]]]:
    """``'gc@0.9'`` -> ``('gc', 0.9)``; ``'gc'`` -> ``('gc', None)``. Unknown names raise ConfigError."""
    raw = str(name).strip()
    family, sep, param = raw.partition("@")
    if family not in FAMILIES:
        raise ConfigError(f"unknown method {raw!r}; known: {known_names_text()}")
    if not sep:
        return family, None
    if family not in PARAM_FAMILIES:
        raise ConfigError(f"method {family!r} takes no parameter (got {raw!r}); use plain {family!r}")
    kind = PARAM_FAMILIES[family]
    try:
        value: Union[int, float] = int(param) if kind == "layer" else float(param)
    except ValueError:
        what = "a 0-based layer index (integer)" if kind == "layer" else "a number"
        raise ConfigError(f"method {raw!r}: the part after '@' must be {what}") from None
    if kind == "threshold":
        if family in ("confidence", "gc", "classifier", "gc_lossless") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"method {raw!r}: threshold must be in [0, 1]")
        if family == "entropy" and value < 0:
            raise ConfigError(f"method {raw!r}: entropy threshold must be >= 0 (nats)")
        if family == "saturation" and not -1.0 <= value <= 1.0:
            raise ConfigError(f"method {raw!r}: saturation threshold is a cosine in [-1, 1]")
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
        if param is not None:
            if PARAM_FAMILIES[family] == "layer" and not 0 <= int(param) < final_layer:
                raise ConfigError(f"method {family}@{param}: layer {param} is out of range [0, {final_layer - 1}] "
                                  f"(0-based; {final_layer} is the final layer, i.e. the full model)")
            specs.append(MethodSpec(family, param))
        elif family in ("fixed", "layerskip"):
            specs += [MethodSpec(family, int(layer)) for layer in exit_layers]
        elif family in THRESHOLD_GRIDS:
            specs += [MethodSpec(family, float(t)) for t in getattr(eval_cfg, THRESHOLD_GRIDS[family])]
        elif family == "hf_early_exit":
            layers = eval_cfg.hf_early_exit_layers if eval_cfg.hf_early_exit_layers is not None else exit_layers
            for layer in layers:
                if not 0 <= int(layer) < final_layer:
                    raise ConfigError(f"eval.hf_early_exit_layers has {layer}, out of range [0, {final_layer - 1}]")
            specs += [MethodSpec("hf_early_exit", int(layer)) for layer in layers]
        else:
            specs.append(MethodSpec(family))
    seen: set[str] = set()
    unique = [s for s in specs if not (s.id in seen or seen.add(s.id))]
    order = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(unique, key=lambda s: (order[s.family], s.param if s.param is not None else 0))
