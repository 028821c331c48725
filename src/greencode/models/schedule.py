"""Exit-point schedule and LITE loss weights (pure functions, 0-based layer indices)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from greencode.config import ConfigError


def exit_schedule(num_layers: int, first: int = 3, stride_first_half: int = 2, stride_second_half: int = 4) -> list[int]:
    """The paper's rule: earliest exit at ``first``; an exit every ``stride_first_half``
    layers in the first half and every ``stride_second_half`` layers in the second half.
    The final layer ``num_layers - 1`` is always the full exit and is *not* in the list.

    OPT-2.7B (32 layers) -> [3, 5, 7, 9, 11, 13, 15, 19, 23, 27];
    Llama-3.2-3B (28 layers) -> [3, 5, 7, 9, 11, 13, 17, 21, 25].
    """
    if num_layers < 2:
        raise ConfigError(f"a model with {num_layers} layer(s) has no room for an early exit; use >= 2 layers")
    if not 0 <= first < num_layers - 1:
        raise ConfigError(f"exit_schedule.first={first} must be in [0, {num_layers - 2}] for a {num_layers}-layer model")
    if stride_first_half < 1 or stride_second_half < 1:
        raise ConfigError("exit_schedule strides must be >= 1")
    half = num_layers // 2
    exits: list[int] = []
    layer = first
    while layer < half:
        exits.append(layer)
        layer += stride_first_half
    # second half: continue from the last first-half exit with the larger stride
    layer = (exits[-1] + stride_second_half) if exits else first
    while layer < num_layers - 1:
        exits.append(layer)
        layer += stride_second_half
    return exits


def validate_exit_layers(exit_layers: Sequence[int], num_layers: int) -> list[int]:
    """Check explicit exit layers against a model's depth; returns them sorted."""
    layers = list(exit_layers)
    if not layers:
        raise ConfigError("exit_layers is empty; give at least one 0-based exit layer below the final layer")
    bad = [e for e in layers if not isinstance(e, int) or not 0 <= e < num_layers - 1]
    if bad:
        raise ConfigError(f"exit layers {bad} are outside [0, {num_layers - 2}] for a {num_layers}-layer model "
                          f"(0-based; the final layer {num_layers - 1} is always the full exit)")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"exit_layers {layers} has duplicates")
    return sorted(layers)


def split_halves(exit_layers: Sequence[int], num_layers: int) -> tuple[list[int], list[int]]:
    """Exits in the first half (layer index < num_layers // 2) and in the second half."""
    half = num_layers // 2
    return [e for e in exit_layers if e < half], [e for e in exit_layers if e >= half]


def _geometric(n: int, ratio: float, budget: float) -> list[float]:
    if n == 0:
        return []
    raw = [ratio**i for i in range(n)]
    total = sum(raw)
    return [budget * r / total for r in raw]


def lite_weights(
    exit_layers: Sequence[int],
    num_layers: int,
    scheme: Union[str, Sequence[float]] = "geometric",
    budgets: Sequence[float] = (0.7, 0.2, 0.1),
    ratio: float = 0.9,
) -> list[float]:
    """Weights for the LITE loss, one per exit layer plus one for the final layer.

    ``geometric`` (the paper): budget ``budgets[0]`` over the first-half exits and
    ``budgets[1]`` over the second-half exits, each a geometric sequence with ratio
    ``ratio`` (highest weight on the earliest exit) normalised to its budget, and
    ``budgets[2]`` for the final layer. If one half has no exit, its budget goes to the
    other half. ``uniform`` gives every point weight 1 / (n_exits + 1). An explicit list
    must have one weight per exit layer plus one for the final layer.
    """
    exits = validate_exit_layers(exit_layers, num_layers)
    n = len(exits) + 1
    if isinstance(scheme, str):
        if scheme == "uniform":
            return [1.0 / n] * n
        if scheme != "geometric":
            raise ConfigError(f"finetune.weights={scheme!r}; use 'geometric', 'uniform' or a list of {n} floats")
        first, second = split_halves(exits, num_layers)
        b1, b2, bf = budgets
        if not first:
            b1, b2 = 0.0, b1 + b2
        elif not second:
            b1, b2 = b1 + b2, 0.0
        return _geometric(len(first), ratio, b1) + _geometric(len(second), ratio, b2) + [bf]
    weights = [float(w) for w in scheme]
    if len(weights) != n:
        raise ConfigError(f"finetune.weights has {len(weights)} values but the model has {len(exits)} exit layers "
                          f"{exits} plus the final layer = {n}; give exactly {n} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"finetune.weights {weights} must be non-negative with a positive sum")
    return weights


def resolve_exit_layers(num_layers: int, explicit: Optional[Sequence[int]], schedule) -> list[int]:
    """Explicit exit layers if given, else the schedule (an ExitScheduleConfig)."""
    if explicit is not None:
        return validate_exit_layers(explicit, num_layers)
    return exit_schedule(num_layers, schedule.first, schedule.stride_first_half, schedule.stride_second_half)
