"""ExitEnv: transitions, rewards, episode length and termination, seeding, check_env."""

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from greencode.config import RewardConfig
from greencode.rl import CONTINUE, EXIT, ExitEnv, TrajectoryBank, synthetic_bank

CFG = RewardConfig(alpha=0.5, beta=1.0, gamma=1.0, epsilon=1.0)


def hand_bank() -> TrajectoryBank:
    """Two sequences (2 and 3 tokens), E = 2 early exit points, H = 3.
    obs[t, e] is filled with 10 * t + e so the test can see where the env is."""
    preds = np.array([[4, 9, 9],    # t0: l_opt 1
                      [9, 9, 9],    # t1: l_opt 0
                      [1, 2, 9],    # t2: l_opt 2 (no early exit agrees)
                      [9, 1, 9],    # t3: l_opt 0, exit point 1 disagrees again
                      [3, 3, 3]])   # t4: l_opt 0
    n, e, h = 5, 2, 3
    obs = np.zeros((n, e, h), np.float32) + (10 * np.arange(n)[:, None, None] + np.arange(e)[None, :, None])
    return TrajectoryBank.from_arrays(obs, preds, [0, 2, 5], manifest={"exit_layers": [1, 2], "final_layer": 3})


def test_l_opt_from_bank():
    assert hand_bank().l_opt.tolist() == [1, 0, 2, 0, 0]


def test_scripted_episode_observations_rewards_and_termination():
    env = ExitEnv(hand_bank(), CFG, episode="sequence")
    obs, info = env.reset(seed=0, options={"sequence": 1})   # tokens t2, t3, t4
    assert info["sequence"] == 1 and obs[0] == 20
    # t2 (l_opt = final = 2): continue at 0 -> +1, continue at 1 (last exit point) -> +1 (full model)
    obs, r, term, trunc, info = env.step(CONTINUE)
    assert (r, term, trunc, obs[0]) == (1.0, False, False, 21)
    obs, r, term, trunc, info = env.step(CONTINUE)
    assert (r, term, obs[0]) == (1.0, False, 30) and info["exit_point"] == 2 and info["agrees"]
    # t3 (l_opt 0): continue at 0 -> -(1 - 0)/2 * gamma = -0.5 ; exit at 1 (wrong, late) -> -epsilon
    obs, r, term, _, _ = env.step(CONTINUE)
    assert r == pytest.approx(-0.5) and obs[0] == 31
    obs, r, term, _, info = env.step(EXIT)
    assert r == pytest.approx(-1.0) and obs[0] == 40 and info == {"token_done": True, "exit_point": 1, "l_opt": 0,
                                                                  "agrees": False}
    # t4 (l_opt 0): exit at 0 -> +1, the last token: terminated
    obs, r, term, trunc, _ = env.step(EXIT)
    assert (r, term, trunc) == (1.0, True, False)
    assert env.observation_space.contains(obs)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(EXIT)


def test_wrong_early_exit_and_continue_at_last_point():
    env = ExitEnv(hand_bank(), CFG, episode="sequence")
    env.reset(options={"sequence": 0})  # t0 (l_opt 1), t1 (l_opt 0)
    _, r, _, _, _ = env.step(EXIT)   # t0 exit at 0, wrong, early by 1 -> -beta * 1/2
    assert r == pytest.approx(-0.5)
    _, r, _, _, _ = env.step(CONTINUE)  # t1 at 0, l_opt 0 -> -gamma * 1/2
    assert r == pytest.approx(-0.5)
    _, r, term, _, info = env.step(CONTINUE)  # t1 at 1 (last exit point) -> -gamma * (2 - 0)/2 = -1, to final
    assert r == pytest.approx(-1.0) and term and info["exit_point"] == 2


def test_cost_weighted_reward_prices_the_bank_models_layers():
    """kind=cost: the segment prices come from the bank's model (exits at layers 1, 2, final 3, and a
    fingerprint of 6 layers: segments 1/6 and 1/6), an exit earns +1 or -wrong_exit_penalty."""
    bank = hand_bank()
    bank.manifest["fingerprint"] = {"num_layers": 6}
    env = ExitEnv(bank, RewardConfig(kind="cost", cost_weight=3.0, wrong_exit_penalty=0.25), episode="sequence")
    env.reset(options={"sequence": 0})  # t0: exit 0 wrong, exit 1 right
    _, r, _, _, _ = env.step(EXIT)
    assert r == pytest.approx(-0.25)
    _, r, _, _, _ = env.step(CONTINUE)  # t1 at exit point 0: one layer of six at weight 3
    assert r == pytest.approx(-0.5)
    _, r, term, _, info = env.step(CONTINUE)  # at the last exit point: to the final layer, which answers
    assert r == pytest.approx(-0.5 + 1.0) and term and info["exit_point"] == 2


@pytest.mark.parametrize("action, steps_per_token", [(EXIT, 1), (CONTINUE, 4)])
def test_episode_length(action, steps_per_token):
    bank = synthetic_bank(num_sequences=5, tokens_per_sequence=7, n_exit_points=4, hidden_size=8)
    env = ExitEnv(bank, CFG, seed=3, episode="sequence")
    for _ in range(3):
        env.reset()
        steps, term = 0, False
        while not term:
            _, _, term, trunc, _ = env.step(action)
            assert not trunc
            steps += 1
        assert steps == 7 * steps_per_token


def test_seeded_reset_is_reproducible():
    bank = synthetic_bank(num_sequences=50, tokens_per_sequence=3, n_exit_points=2, hidden_size=4)
    a, b = ExitEnv(bank, CFG, episode="sequence"), ExitEnv(bank, CFG, episode="sequence")
    seqs_a = [a.reset(seed=7)[1]["sequence"]] + [a.reset()[1]["sequence"] for _ in range(10)]
    seqs_b = [b.reset(seed=7)[1]["sequence"]] + [b.reset()[1]["sequence"] for _ in range(10)]
    assert seqs_a == seqs_b and len(set(seqs_a)) > 1


def test_token_episode_is_one_tokens_decisions():
    """The default episode: one token, drawn at reset; it ends when the token is finished, with the same
    rewards the sequence episode gives that token."""
    env = ExitEnv(hand_bank(), CFG)
    obs, info = env.reset(seed=0, options={"token": 3})  # t3 (second token of sequence 1), l_opt 0
    assert obs[0] == 30 and info["sequence"] == 1 and info["token"] == 3
    obs, r, term, _, _ = env.step(CONTINUE)   # -gamma * (1 - 0) / 2
    assert (r, term, obs[0]) == (pytest.approx(-0.5), False, 31)
    obs, r, term, trunc, info = env.step(EXIT)  # wrong and late: -epsilon, the token (and episode) ends
    assert (r, term, trunc, obs[0]) == (pytest.approx(-1.0), True, False, 31) and info["exit_point"] == 1
    with pytest.raises(RuntimeError, match="reset"):
        env.step(EXIT)
    env.reset(options={"token": 2})  # t2: continue twice to the final layer, +1 each
    assert [env.step(CONTINUE)[1:3] for _ in range(2)] == [(1.0, False), (1.0, True)]
    with pytest.raises(ValueError, match="outside"):
        env.reset(options={"token": 5})
    with pytest.raises(ValueError, match="episode"):
        ExitEnv(hand_bank(), CFG, episode="file")


def test_token_episodes_draw_every_token_uniformly():
    bank = synthetic_bank(num_sequences=3, tokens_per_sequence=4, n_exit_points=2, hidden_size=4)
    env = ExitEnv(bank, CFG, seed=1)
    counts = np.bincount([env.reset()[1]["token"] for _ in range(2400)], minlength=12)
    assert counts.min() > 140 and counts.max() < 260  # 200 expected each
    a, b = ExitEnv(bank, CFG), ExitEnv(bank, CFG)
    assert [a.reset(seed=5)[1]["token"]] + [a.reset()[1]["token"] for _ in range(9)] == \
        [b.reset(seed=5)[1]["token"]] + [b.reset()[1]["token"] for _ in range(9)]


def test_bad_action_and_step_before_reset():
    env = ExitEnv(hand_bank(), CFG)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(EXIT)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="continue"):
        env.step(2)


def test_check_env_passes():
    env = ExitEnv(synthetic_bank(num_sequences=4, tokens_per_sequence=5, n_exit_points=3, hidden_size=16), CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the checker either, except the spec note
        warnings.filterwarnings("ignore", message=".*spec.*")
        check_env(env, skip_render_check=True)


def test_observation_is_a_float32_copy():
    env = ExitEnv(hand_bank(), CFG)
    obs, _ = env.reset(seed=0, options={"token": 0})
    assert obs.dtype == np.float32 and obs.shape == (3,)
    obs[:] = 123
    obs2, _ = env.reset(seed=0, options={"token": 0})
    assert obs2[0] == 0


def test_environments_over_one_bank_share_one_float32_copy():
    from greencode.rl.bank import synthetic_bank
    from greencode.rl.env import ExitEnv

    bank = synthetic_bank(num_sequences=4, tokens_per_sequence=3, n_exit_points=2, hidden_size=4)
    a, b = ExitEnv(bank), ExitEnv(bank)
    assert a._obs is b._obs and a._obs.dtype == np.float32
    assert np.array_equal(a._obs, bank.obs.astype(np.float32))
