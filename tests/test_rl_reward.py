"""Equations 2 and 3 of the paper, every case, with hand-computed values.

E = 4 early exit points (indices 0..3), index 4 = the final layer; distances are divided
by E = 4. alpha/beta/gamma/epsilon are all different so a swapped coefficient shows.
"""

import numpy as np
import pytest

from greencode.config import RewardConfig
from greencode.rl import optimal_exit, reward_continue, reward_exit, reward_tables

E = 4
CFG = RewardConfig(alpha=0.3, beta=0.6, gamma=0.8, epsilon=0.9)


@pytest.mark.parametrize("l, l_opt, correct, expected", [
    (1, 1, True, 1.0),                # correct at l_opt
    (0, 0, True, 1.0),                # correct at the first exit point
    (3, 3, True, 1.0),                # l_opt at the last exit point, exit there
    (3, 1, True, -0.3 * 2 / 4),       # correct but late by 2 -> -0.15
    (2, 0, True, -0.3 * 2 / 4),
    (0, 3, False, -0.6 * 3 / 4),      # wrong and early by 3 -> -0.45
    (2, 3, False, -0.6 * 1 / 4),      # l_opt at the last exit point, one too early -> -0.15
    (0, 4, False, -0.6 * 4 / 4),      # no exit agrees (l_opt = final): exiting first is the worst -> -0.6
    (3, 4, False, -0.6 * 1 / 4),      # no exit agrees, exit at the last exit point -> -0.15
    (2, 1, False, -0.9),              # wrong and late (an earlier exit agreed): -epsilon
])
def test_reward_exit_cases(l, l_opt, correct, expected):
    assert reward_exit(l, l_opt, correct, E, CFG) == pytest.approx(expected)


@pytest.mark.parametrize("l, l_opt, expected", [
    (0, 2, 1.0),                      # before l_opt: continuing is right
    (2, 3, 1.0),
    (3, 4, 1.0),                      # no exit agrees: continuing at the last exit point to the final is right
    (2, 2, -0.8 * (3 - 2) / 4),       # at l_opt, continuing goes one too far -> -0.2
    (3, 3, -0.8 * (4 - 3) / 4),       # l_opt at the last exit point; l_next is the final layer -> -0.2
    (3, 1, -0.8 * (4 - 1) / 4),       # last exit point, continuing to the final layer -> -0.6
    (1, 0, -0.8 * (2 - 0) / 4),       # -0.4
])
def test_reward_continue_cases(l, l_opt, expected):
    assert reward_continue(l, l_opt, E, CFG) == pytest.approx(expected)


def test_penalties_are_scaled_into_minus_one_zero_and_positive_rewards_stay_one():
    worst = RewardConfig(alpha=1.0, beta=1.0, gamma=1.0, epsilon=1.0)
    assert reward_exit(0, E, False, E, worst) == pytest.approx(-1.0)        # largest early distance
    assert reward_continue(E - 1, 0, E, worst) == pytest.approx(-1.0)       # largest continue distance
    assert reward_exit(E - 1, 0, True, E, worst) == pytest.approx(-(E - 1) / E)
    values = [reward_exit(l, lo, c, E, worst) for l in range(E) for lo in range(E + 1) for c in (True, False)]
    values += [reward_continue(l, lo, E, worst) for l in range(E) for lo in range(E + 1)]
    assert all(v == 1.0 or -1.0 <= v <= 0.0 for v in values)
    assert max(values) == 1.0


def test_default_epsilon_is_beta_over_e_and_keeps_late_at_least_as_good_as_early():
    py = RewardConfig(alpha=0.5, beta=0.5, gamma=0.5)  # epsilon unset
    assert reward_exit(2, 1, False, E, py) == pytest.approx(-0.5 / 4)  # wrong and late: -beta / E = -0.125
    assert reward_exit(1, 2, False, E, py) == pytest.approx(-0.5 * 1 / 4)  # wrong, early by 1: the same
    for e in (2, 4, 7, 9):  # at every E and distance, a wrong late exit >= a wrong early exit
        late = reward_exit(e - 1, 0, False, e, py)
        early = [reward_exit(0, lo, False, e, py) for lo in range(1, e + 1)]
        assert all(late >= x - 1e-12 for x in early), (e, late, early)
    old = RewardConfig(alpha=0.5, beta=0.5, gamma=0.5, epsilon=1.0)  # the former default reverses it
    assert reward_exit(2, 1, False, E, old) < reward_exit(0, 4, False, E, old)
    r_exit, _ = reward_tables(np.array([[3, 5, 7, 9, 5]]), np.array([1]), py)  # the vectorised form agrees
    assert r_exit[0, 2] == pytest.approx(-0.125) and r_exit[0, 3] == pytest.approx(-0.125)


def test_paper_coefficients_java_and_python():
    java = RewardConfig(alpha=0.5, beta=1.0, gamma=1.0, epsilon=1.0)
    py = RewardConfig(alpha=0.5, beta=0.5, gamma=0.5, epsilon=1.0)
    assert reward_exit(0, 2, False, E, java) == pytest.approx(-0.5)
    assert reward_exit(0, 2, False, E, py) == pytest.approx(-0.25)
    assert reward_continue(2, 2, E, py) == pytest.approx(-0.125)


def test_decisions_only_at_early_exit_points():
    with pytest.raises(ValueError, match="final layer"):
        reward_exit(E, 1, True, E, CFG)
    with pytest.raises(ValueError, match="final layer"):
        reward_continue(E, 1, E, CFG)
    with pytest.raises(ValueError, match="l_opt"):
        reward_exit(0, E + 1, True, E, CFG)


def test_optimal_exit_first_agreeing_point_or_final():
    preds = np.array([[5, 7, 7, 7, 7],     # agrees from 1
                      [7, 5, 7, 5, 7],     # first agreement at 0 even though 1 disagrees
                      [1, 2, 3, 7, 7],     # l_opt at the last exit point
                      [1, 2, 3, 4, 7]])    # none agrees -> final (4)
    assert optimal_exit(preds).tolist() == [1, 0, 3, 4]


def test_reward_tables_equal_the_scalar_functions():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 3, size=(400, E + 1))
    l_opt = optimal_exit(preds)
    r_exit, r_cont = reward_tables(preds, l_opt, CFG)
    for i in range(len(preds)):
        for l in range(E):
            correct = bool(preds[i, l] == preds[i, E])
            assert r_exit[i, l] == pytest.approx(reward_exit(l, int(l_opt[i]), correct, E, CFG), abs=1e-6)
            assert r_cont[i, l] == pytest.approx(reward_continue(l, int(l_opt[i]), E, CFG), abs=1e-6)


# ----------------------------------------------------------------------------- the cost-weighted reward
COST = RewardConfig(kind="cost", cost_weight=2.0, wrong_exit_penalty=0.5)
SEG = [0.1, 0.2, 0.25, 0.3]  # each segment's share of the layers, hand-chosen and uneven


@pytest.mark.parametrize("l, correct, expected", [
    (0, True, 1.0), (3, True, 1.0),            # an agreeing exit earns +1 wherever it is
    (0, False, -0.5), (2, False, -0.5),         # a disagreeing one costs the wrong-exit penalty, nothing else
])
def test_cost_reward_exit_cases(l, correct, expected):
    # l_opt does not enter the cost reward: only whether this exit agrees
    for l_opt in range(E + 1):
        assert reward_exit(l, l_opt, correct, E, COST) == pytest.approx(expected)


@pytest.mark.parametrize("l, expected", [
    (0, -2.0 * 0.1), (1, -2.0 * 0.2), (2, -2.0 * 0.25),
    (3, -2.0 * 0.3 + 1.0),                      # the last segment ends at the final layer, which answers (+1)
])
def test_cost_reward_continue_cases(l, expected):
    for l_opt in range(E + 1):
        assert reward_continue(l, l_opt, E, COST, SEG) == pytest.approx(expected)


def test_cost_reward_without_costs_spaces_the_exit_points_evenly():
    assert reward_continue(1, 0, E, COST) == pytest.approx(-2.0 / E)
    assert reward_continue(E - 1, 0, E, COST) == pytest.approx(-2.0 / E + 1.0)


def test_segment_costs_from_the_model_shape():
    from greencode.rl.reward import segment_costs

    # the default's exits [1, 2, 3, 4, 5, 7, 9], final 11, 12 layers
    c = segment_costs([1, 2, 3, 4, 5, 7, 9], 11, 12)
    np.testing.assert_allclose(c, [1 / 12, 1 / 12, 1 / 12, 1 / 12, 2 / 12, 2 / 12, 2 / 12])
    with pytest.raises(ValueError, match="must increase"):
        segment_costs([3, 2], 5, 6)


def test_cost_reward_tables_match_the_scalar_functions():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 3, size=(200, E + 1))
    l_opt = optimal_exit(preds)
    r_exit, r_cont = reward_tables(preds, l_opt, COST, SEG)
    for i in range(len(preds)):
        for l in range(E):
            ok = bool(preds[i, l] == preds[i, E])
            assert r_exit[i, l] == pytest.approx(reward_exit(l, int(l_opt[i]), ok, E, COST))
            assert r_cont[i, l] == pytest.approx(reward_continue(l, int(l_opt[i]), E, COST, SEG))


def _best_policy_compute(p_correct: np.ndarray, seg: np.ndarray, cfg: RewardConfig) -> float:
    """Compute share (past the first exit) of the return-maximising policy that knows P(correct) at each
    exit point (same for every token), by backward induction over the exit points."""
    e = len(seg)
    value = 1.0  # at the final layer
    exit_at = e
    cont_values = []
    for l in reversed(range(e)):
        v_exit = p_correct[l] * 1.0 - (1 - p_correct[l]) * cfg.wrong_exit_penalty
        v_cont = -cfg.cost_weight * seg[l] + value
        cont_values.append((l, v_exit, v_cont))
        value = max(v_exit, v_cont)
    for l, v_exit, v_cont in reversed(cont_values):  # the first exit point where exiting is best
        if v_exit >= v_cont:
            exit_at = l
            break
    return float(np.sum(seg[:exit_at]))


def test_the_cost_weight_spans_the_full_model_to_the_first_exit():
    """The knob the paper's reward lacks: at cost weight 0 the best policy runs the whole model; as the
    weight grows it exits earlier, monotonically, down to the first exit point."""
    seg = np.array(SEG)
    p = np.array([0.55, 0.7, 0.85, 0.95])  # agreement rising with depth
    computes = [_best_policy_compute(p, seg, RewardConfig(kind="cost", cost_weight=w))
                for w in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 50.0)]
    assert computes[0] == pytest.approx(seg.sum())  # full model
    assert computes[-1] == 0.0  # the first exit point
    assert all(a >= b for a, b in zip(computes, computes[1:]))
    assert len(set(computes)) >= 3  # intermediate settings exist


def test_cost_reward_config_is_validated():
    from greencode.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="kind"):
        config_from_dict({"name": "x", "rl": {"reward": {"kind": "lagrange"}}})
    with pytest.raises(ConfigError, match="cost_weight"):
        config_from_dict({"name": "x", "rl": {"reward": {"kind": "cost", "cost_weight": -1}}})
