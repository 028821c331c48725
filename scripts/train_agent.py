"""Train the PPO exit agent (SB3) on the trajectory bank and export the policy.

Builds or reuses the bank, trains PPO with rl.ppo (paper Table III defaults, linear
learning-rate decay), and writes runs/<name>/agent (config, command, Monitor files,
TensorBoard + CSV logs, checkpoints, policy.pt), results/<name>/rl (analysis.json,
episode_rewards.csv, progress.csv) and results/benchmark/rl_env_<name>.json.

Tiny CPU run (after scripts/finetune.py):
    python scripts/train_agent.py --config configs/smoke.yaml
    python scripts/train_agent.py --config configs/smoke.yaml rl.ppo.total_timesteps=2048 rl.ppo.n_envs=4
"""

from greencode.cli import base_parser, friendly_errors, load_from_args
from greencode.paths import RunPaths
from greencode.rl import train_agent
from greencode.utils import read_json


@friendly_errors
def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args()
    cfg = load_from_args(args)
    policy = train_agent(cfg, progress_bar=not args.no_progress)
    paths = RunPaths.from_config(cfg)
    a = read_json(paths.results_rl / "analysis.json")
    t = a["training"]
    print(f"PPO: {t['total_timesteps']} steps in {t['wall_time_s']:.1f} s ({t['steps_per_s']:.0f} steps/s), "
          f"mean step reward {t['first_mean_step_reward']} -> {t['final_mean_step_reward']}")
    print(f"exit accuracy on the {a['exit_accuracy']['bank']} bank:")
    for r in a["exit_accuracy"]["thresholds"]:
        print(f"  threshold {r['threshold']:.2f}: exit before final {100 * r['share_exit_before_final']:5.1f}%  "
              f"agree with full model {100 * r['agreement_with_final']:5.1f}%  at l_opt {100 * r['share_at_l_opt']:5.1f}%  "
              f"early {100 * r['share_early']:5.1f}%  late {100 * r['share_late']:5.1f}%  "
              f"mean exit layer {r['mean_exit_layer']:.2f}")
    print(f"policy -> {policy}\nanalysis -> {paths.results_rl}")


if __name__ == "__main__":
    raise SystemExit(main())
