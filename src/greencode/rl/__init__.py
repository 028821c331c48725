"""The RL exit policy: trajectory bank, Gymnasium environment, reward, PPO training, export.

Exit points are indexed 0..E-1 (the early exit layers, sorted) and E (the final layer);
layers are 0-based decoder-layer indices. See the module docstrings of
:mod:`greencode.rl.reward` (equations 2-3 and their scaling), :mod:`greencode.rl.bank`
(what is stored, size per token) and :mod:`greencode.rl.env` (episode semantics).
"""

from greencode.rl.bank import TrajectoryBank, bytes_per_token, synthetic_bank
from greencode.rl.build import build_bank, record_batch
from greencode.rl.env import CONTINUE, EXIT, ExitEnv
from greencode.rl.policy import (ExitPolicy, evaluate_agent_on_bank, exit_metrics, exit_probabilities, export_policy,
                                 from_sb3, load_policy, policy_controller, save_policy)
from greencode.rl.reward import optimal_exit, reward_continue, reward_exit, reward_tables
from greencode.rl.train import analyse_policy, benchmark_env, init_policy_from, make_ppo, make_vec_env, train_agent

__all__ = ["CONTINUE", "EXIT", "ExitEnv", "ExitPolicy", "TrajectoryBank", "analyse_policy", "benchmark_env",
           "build_bank", "bytes_per_token", "evaluate_agent_on_bank", "exit_metrics", "exit_probabilities",
           "export_policy", "from_sb3", "init_policy_from", "load_policy", "make_ppo", "make_vec_env", "optimal_exit",
           "policy_controller", "record_batch", "reward_continue", "reward_exit", "reward_tables", "save_policy",
           "synthetic_bank", "train_agent"]
