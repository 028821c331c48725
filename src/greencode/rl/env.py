"""One Gymnasium environment for the exit decision, replayed from a trajectory bank.

* Observation: the bank's observation at the current early exit point of the current
  token (float32 [H]); the preprocessing (``raw`` or ``normed``) was applied when the
  bank was built by :func:`greencode.decoding.policy_observation`, the same function
  :class:`~greencode.decoding.PolicyExit` uses at inference.
* Actions ``Discrete(2)``: 0 = continue, 1 = exit.
* Exit: the token is finished at this exit point; the next observation is the next
  token at the first exit point. Continue: advance to the next exit point; continuing at
  the last early exit point finishes the token with the full model (final layer).
* Rewards: equations 2 and 3 of the paper (:mod:`greencode.rl.reward`), precomputed
  per token and exit point at construction, so :meth:`step` is a few array look-ups
  (numpy only, no torch and no LLM call).
* Episode (``episode``): ``token`` (the default) is one token of the bank, drawn uniformly with the
  environment's seeded RNG at :meth:`reset` (``options={"token": t}`` picks one): at most ``E`` steps,
  ``terminated`` when the token is finished. ``sequence`` is one sequence of the bank (``T`` tokens,
  ``options={"sequence": s}``), ``terminated`` when its last token is finished. The bank is replayed, so
  no decision changes a later token's observations or rewards: with sequence episodes PPO's discounted
  return mixes a decision's reward with later tokens' (gamma 0.99 reaches ~100 steps) and its value
  network must predict that sum, noise the decision cannot move. ``truncated`` is always False. The
  observation returned with ``terminated=True`` is the last one seen (it is never acted on).
"""

from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np

from greencode.config import RewardConfig
from greencode.rl.bank import TrajectoryBank
from greencode.rl.reward import bank_segment_costs, reward_tables

CONTINUE, EXIT = 0, 1
EPISODES = ("token", "sequence")


class ExitEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, bank: TrajectoryBank, reward_cfg: Optional[RewardConfig] = None, seed: Optional[int] = None,
                 episode: str = "token"):
        super().__init__()
        if bank.num_tokens == 0:
            raise ValueError("the trajectory bank is empty; rebuild it with more sequences (rl.bank.num_sequences)")
        if episode not in EPISODES:
            raise ValueError(f"episode={episode!r}; known: {', '.join(EPISODES)}")
        self.episode = episode
        self.bank = bank
        self.reward_cfg = reward_cfg or RewardConfig()
        self.n_exit_points = bank.n_exit_points
        # float32 once per bank (shared by every environment over it), so step() only slices
        self._obs = bank.obs_float32()
        self._r_exit, self._r_cont = reward_tables(bank.preds, bank.l_opt, self.reward_cfg, bank_segment_costs(bank))
        self._r_exit = self._r_exit.astype(np.float64)
        self._r_cont = self._r_cont.astype(np.float64)
        self._l_opt = bank.l_opt.astype(np.int64)
        self._correct = bank.preds[:, :-1] == bank.preds[:, -1:]
        self._offsets = bank.offsets.astype(np.int64)
        # the bank stores float16, so every observation lies within float16's finite range
        fmax = float(np.finfo(np.float16).max)
        self.observation_space = gym.spaces.Box(-fmax, fmax, shape=(bank.hidden_size,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._seq = -1
        self._t = 0  # global token index
        self._end = 0  # one past the episode's last token
        self._e = 0  # current early exit point
        if seed is not None:
            self.reset(seed=seed)

    def _observation(self) -> np.ndarray:
        return self._obs[self._t, self._e].copy()

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        if self.episode == "token":
            n_tok = self.bank.num_tokens
            t = int(options["token"]) if options and "token" in options else int(self.np_random.integers(n_tok))
            if not 0 <= t < n_tok:
                raise ValueError(f"options['token']={t} is outside [0, {n_tok - 1}]")
            self._seq = int(np.searchsorted(self._offsets, t, side="right")) - 1
            self._t, self._end, self._e = t, t + 1, 0
            return self._observation(), {"sequence": self._seq, "token": t, "num_tokens": 1}
        n_seq = len(self._offsets) - 1
        if options and "sequence" in options:
            s = int(options["sequence"])
            if not 0 <= s < n_seq:
                raise ValueError(f"options['sequence']={s} is outside [0, {n_seq - 1}]")
        else:
            s = int(self.np_random.integers(n_seq))
        self._seq = s
        self._t = int(self._offsets[s])
        self._end = int(self._offsets[s + 1])
        self._e = 0
        return self._observation(), {"sequence": s, "num_tokens": self._end - self._t}

    def step(self, action):
        if self._seq < 0:
            raise RuntimeError("call reset() before step()")
        if self._t >= self._end:
            raise RuntimeError("the episode has terminated; call reset()")
        t, e = self._t, self._e
        a = int(action)
        if a == EXIT:
            reward = self._r_exit[t, e]
            done_token = True
        elif a == CONTINUE:
            reward = self._r_cont[t, e]
            done_token = e + 1 >= self.n_exit_points
        else:
            raise ValueError(f"action {action!r} is not 0 (continue) or 1 (exit)")
        info: dict[str, Any] = {}
        if done_token:
            exit_point = e if a == EXIT else self.n_exit_points
            info = {"token_done": True, "exit_point": exit_point, "l_opt": int(self._l_opt[t]),
                    "agrees": bool(exit_point == self.n_exit_points or self._correct[t, e])}
            self._t = t + 1
            self._e = 0
        else:
            self._e = e + 1
        terminated = self._t >= self._end
        if terminated:
            obs = self._obs[t, e].copy()  # the last observation seen; never acted on
        else:
            obs = self._observation()
        return obs, float(reward), terminated, False, info
