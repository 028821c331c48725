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


def reward_exit(l: int, l_opt: int, correct: bool, n_exit_points: int, cfg: RewardConfig) -> float:
    """Equation 2: reward for exiting at exit point ``l`` (0-based, final excluded)."""
    _check(l, l_opt, n_exit_points)
    if correct and l == l_opt:
        return 1.0
    if correct and l > l_opt:
        return -cfg.alpha * (l - l_opt) / n_exit_points
    if not correct and l < l_opt:
        return -cfg.beta * (l_opt - l) / n_exit_points
    return -resolved_epsilon(cfg, n_exit_points)


def reward_continue(l: int, l_opt: int, n_exit_points: int, cfg: RewardConfig) -> float:
    """Equation 3: reward for continuing at exit point ``l`` to ``l + 1`` (``n_exit_points``
    being the final layer, which finishes the token with the full model)."""
    _check(l, l_opt, n_exit_points)
    if l < l_opt:
        return 1.0
    return -cfg.gamma * ((l + 1) - l_opt) / n_exit_points


def reward_tables(preds: np.ndarray, l_opt: np.ndarray, cfg: RewardConfig) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised equations 2 and 3 for every token and decision point.

    ``preds`` [N, E+1] (column E = the final layer's prediction y), ``l_opt`` [N].
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
