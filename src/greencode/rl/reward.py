"""The paper's reward (equations 2 and 3), as pure functions of exit-point indices.

Exit points are indexed ``0 .. E`` where ``0 .. E-1`` are the early-exit layers (sorted)
and ``E`` (``n_exit_points``) is the final layer. Decisions are only taken at
``0 .. E-1``; continuing at ``E-1`` finishes the token with the full model. All
comparisons are on these integer indices, never on float layer numbers.

``l_opt`` is the first exit point whose prediction equals the final layer's prediction
``y`` (the label is the final layer's own prediction, not the dataset token); when no
early exit point agrees, ``l_opt = E`` (the final layer).

Exit at ``l`` (eq. 2)::

    +1                               if correct and l == l_opt
    -alpha   * (l - l_opt) / E       if correct and l >  l_opt     (late)
    -beta    * (l_opt - l) / E       if wrong   and l <  l_opt     (early)
    -epsilon                         otherwise (wrong, and not before l_opt)

Continue at ``l`` (eq. 3), moving to ``l_next = l + 1`` (``E`` = the final layer)::

    +1                               if l < l_opt
    -gamma   * (l_next - l_opt) / E  otherwise

Scaling: distances are counted in exit points and divided by ``E``, the largest
distance two exit points can have (first early exit to the final layer). Every
distance that can occur is in ``[1, E]``, so with ``alpha, beta, gamma, epsilon`` in
``[0, 1]`` every penalty lies in ``[-1, 0]``; positive rewards stay at ``+1`` (they are
not scaled). ``correct`` means the exit point's prediction equals ``y``.

epsilon: the paper calls it a small penalty and wants exiting late to be at least as good
as exiting early (alpha <= beta). A wrong exit after ``l_opt`` (a later exit point that
disagrees again) is a late exit; it costs ``-epsilon`` whatever its distance, while a wrong
early exit costs ``-beta * d / E``, as little as ``-beta / E``. ``epsilon = None`` (the
default) resolves to ``beta / E``, the largest value with ``-epsilon >= -beta * d / E`` at
every distance ``d >= 1``. The earlier default of 1.0 made such a late exit 2E/beta times
worse than an early one (-1 against -0.056 at E = 9, beta = 0.5).

The cost-weighted reward (``kind: cost``), a Lagrangian of agreement and compute. The paper's
reward divides its penalties by ``E``, so a wrong early exit costs as little as ``-beta / E`` while a
right one earns ``+1``: exiting pays once an exit is right about 80% of the time, and no setting of
the threshold moves the agent to the full model's end. Here, with ``c_l`` the share of the model's
layers between exit point ``l`` and the next one (``c_{E-1}``: up to the final layer; the layers up to
the first exit point run for every token and are left out)::

    exit at l:        +1 if correct else -wrong_exit_penalty
    continue at l:    -cost_weight * c_l            (l < E-1)
                      -cost_weight * c_l + 1        (l = E-1: the final layer answers, correct by definition)

so a token's return is ``(+1 | -w) - cost_weight * (share of the layers it ran past the first exit)``.
``cost_weight = 0`` makes running to the final layer always best (the full model); a large one makes
the first exit best whatever it says. Between them the agent exits where it expects
``P(correct) - (1 - P(correct)) * w`` to beat what the deeper layers would add, minus their price.
"""

from __future__ import annotations

import numpy as np

from greencode.config import RewardConfig


def _check(l: int, l_opt: int, n_exit_points: int) -> None:
    if n_exit_points < 1:
        raise ValueError(f"n_exit_points={n_exit_points} must be >= 1 (the number of early exits, final excluded)")
    if not 0 <= l < n_exit_points:
        raise ValueError(f"exit-point index l={l} must be in [0, {n_exit_points - 1}] "
                         "(decisions are only taken at early exit points, never at the final layer)")
    if not 0 <= l_opt <= n_exit_points:
        raise ValueError(f"l_opt={l_opt} must be in [0, {n_exit_points}] ({n_exit_points} = the final layer)")


def resolved_epsilon(cfg: RewardConfig, n_exit_points: int) -> float:
    """``cfg.epsilon``, or ``beta / E`` when it is None (see the module docstring)."""
    return float(cfg.beta) / n_exit_points if cfg.epsilon is None else float(cfg.epsilon)


def segment_costs(exit_layers, final_layer: int, num_layers: int) -> np.ndarray:
    """``c_l`` for each early exit point: the share of the model's ``num_layers`` layers from exit
    point ``l``'s layer (0-based) to the next exit point's (the last one: to ``final_layer``)."""
    layers = [int(x) for x in exit_layers] + [int(final_layer)]
    if num_layers < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"exit layers {list(exit_layers)} and final layer {final_layer} must increase "
                         f"(num_layers={num_layers})")
    return np.diff(np.asarray(layers, dtype=np.float64)) / float(num_layers)


def _segments(n_exit_points: int, costs) -> np.ndarray:
    if costs is None:  # evenly spaced exit points over the layers after the first one
        return np.full(n_exit_points, 1.0 / n_exit_points)
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (n_exit_points,) or (costs < 0).any():
        raise ValueError(f"segment costs must be {n_exit_points} non-negative numbers, got {costs.tolist()}")
    return costs


def reward_exit(l: int, l_opt: int, correct: bool, n_exit_points: int, cfg: RewardConfig) -> float:
    """Equation 2: reward for exiting at exit point ``l`` (0-based, final excluded); for
    ``kind: cost``, +1 or -wrong_exit_penalty."""
    _check(l, l_opt, n_exit_points)
    if cfg.kind == "cost":
        return 1.0 if correct else -float(cfg.wrong_exit_penalty)
    if correct and l == l_opt:
        return 1.0
    if correct and l > l_opt:
        return -cfg.alpha * (l - l_opt) / n_exit_points
    if not correct and l < l_opt:
        return -cfg.beta * (l_opt - l) / n_exit_points
    return -resolved_epsilon(cfg, n_exit_points)


def reward_continue(l: int, l_opt: int, n_exit_points: int, cfg: RewardConfig, costs=None) -> float:
    """Equation 3: reward for continuing at exit point ``l`` to ``l + 1`` (``n_exit_points``
    being the final layer, which finishes the token with the full model); for ``kind: cost``, the
    price of the segment's layers (``costs``: :func:`segment_costs`; None = evenly spaced), plus the
    final layer's +1 when the segment ends there."""
    _check(l, l_opt, n_exit_points)
    if cfg.kind == "cost":
        c = _segments(n_exit_points, costs)[l]
        return -float(cfg.cost_weight) * float(c) + (1.0 if l == n_exit_points - 1 else 0.0)
    if l < l_opt:
        return 1.0
    return -cfg.gamma * ((l + 1) - l_opt) / n_exit_points


def reward_tables(preds: np.ndarray, l_opt: np.ndarray, cfg: RewardConfig,
                  costs=None) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised equations 2 and 3 (or the cost-weighted reward) for every token and decision point.

    ``preds`` [N, E+1] (column E = the final layer's prediction y), ``l_opt`` [N]; ``costs``: the
    segment costs of ``kind: cost`` (:func:`segment_costs`; None = evenly spaced).
    Returns ``(r_exit, r_continue)``, each float32 [N, E]: the reward for exiting /
    continuing at each early exit point. Equal to calling :func:`reward_exit` /
    :func:`reward_continue` element-wise (tested).
    """
    preds = np.asarray(preds)
    l_opt = np.asarray(l_opt).astype(np.int64)
    if preds.ndim != 2 or preds.shape[1] < 2:
        raise ValueError(f"preds must be [N, n_exit_points + 1] with at least one early exit, got {preds.shape}")
    n, e_plus = preds.shape
    e = e_plus - 1
    if l_opt.shape != (n,):
        raise ValueError(f"l_opt must be [N]={n}, got {l_opt.shape}")
    if n and (l_opt.min() < 0 or l_opt.max() > e):
        raise ValueError(f"l_opt values must lie in [0, {e}]")
    ell = np.arange(e)[None, :]  # [1, E]
    lo = l_opt[:, None]  # [N, 1]
    correct = preds[:, :e] == preds[:, e:e + 1]
    if cfg.kind == "cost":
        c = _segments(e, costs)
        r_exit = np.where(correct, 1.0, -float(cfg.wrong_exit_penalty))
        r_cont = np.broadcast_to(-float(cfg.cost_weight) * c + (np.arange(e) == e - 1), (n, e))
        return r_exit.astype(np.float32), np.array(r_cont, dtype=np.float32)
    r_exit = np.full((n, e), -resolved_epsilon(cfg, e), dtype=np.float64)
    late = correct & (ell > lo)
    early = ~correct & (ell < lo)
    r_exit = np.where(late, -cfg.alpha * (ell - lo) / e, r_exit)
    r_exit = np.where(early, -cfg.beta * (lo - ell) / e, r_exit)
    r_exit = np.where(correct & (ell == lo), 1.0, r_exit)
    r_cont = np.where(ell < lo, 1.0, -cfg.gamma * ((ell + 1) - lo) / e)
    return r_exit.astype(np.float32), r_cont.astype(np.float32)


def optimal_exit(preds: np.ndarray) -> np.ndarray:
    """``l_opt`` per token from ``preds`` [N, E+1]: the first early exit point whose
    prediction equals the final layer's (column E); ``E`` when none agrees."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] < 2:
        raise ValueError(f"preds must be [N, n_exit_points + 1], got {preds.shape}")
    e = preds.shape[1] - 1
    agree = preds[:, :e] == preds[:, e:e + 1]
    return np.where(agree.any(axis=1), agree.argmax(axis=1), e).astype(np.int64)


def bank_segment_costs(bank) -> "np.ndarray | None":
    """:func:`segment_costs` of a trajectory bank's model (its manifest's exit layers, final layer and
    layer count); None (evenly spaced) when the manifest does not say."""
    m = bank.manifest
    layers, final = m.get("exit_layers"), m.get("final_layer")
    num = (m.get("fingerprint") or {}).get("num_layers") or (final + 1 if final is not None else None)
    if not layers or final is None or not num:
        return None
    return segment_costs(layers, final, num)
