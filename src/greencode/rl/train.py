"""PPO training of the exit agent on the trajectory bank, export and analysis data.

``train_agent(cfg)`` builds (or reuses) the bank, trains Stable-Baselines3 PPO
(``MlpPolicy``, the paper's Table III defaults in :class:`greencode.config.PPOConfig`,
linear learning-rate decay to 0) on :class:`~greencode.rl.env.ExitEnv` over the
training sequences, and writes:

* ``runs/<name>/agent/``: ``config.yaml``, ``run_info.json``, ``command.txt``, SB3
  ``Monitor`` files (``monitor/<rank>.monitor.csv``), ``logs/progress.csv`` and
  TensorBoard event files, ``checkpoints/`` (every ``rl.ppo.checkpoint_freq`` steps),
  ``ppo_final.zip`` and the exported ``policy.pt``;
* ``results/<name>/rl/``: ``analysis.json`` (optimal-exit histogram = Fig. 7, exit
  accuracy on the held-out sequences at several thresholds, training summary),
  ``episode_rewards.csv`` (mean step reward per episode = Fig. 6, binned to at most
  1000 rows) and ``progress.csv`` (a copy of SB3's log);
* ``results/benchmark/rl_env_<name>.json``: environment steps/s on the bank and the PPO
  wall time.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from greencode.config import Config, ConfigError
from greencode.paths import RunPaths
from greencode.rl.bank import TrajectoryBank
from greencode.rl.build import build_bank
from greencode.rl.classifier import train_classifier
from greencode.rl.env import ExitEnv
from greencode.rl.policy import (ExitPolicy, decision_auc, decision_auc_report, evaluate_agent_on_bank, exit_metrics,
                                 export_policy, from_sb3)
from greencode.runinfo import run_metadata, save_run_info
from greencode.utils import atomic_path, set_seed, torch_threads, write_json

log = logging.getLogger(__name__)

MID_THRESHOLD = 0.5
# issue 30: a learned exit decision that sees the answer ranks right exits above wrong ones at this mean AUC
TARGET_MEAN_AUC = 0.85


def benchmark_env(bank: TrajectoryBank, reward_cfg=None, steps: int = 100_000, seed: int = 0,
                  max_seconds: float = 3.0, episode: str = "token") -> dict[str, Any]:
    """Environment steps per second with random actions on ``bank`` (numpy only)."""
    env = ExitEnv(bank, reward_cfg, seed=seed, episode=episode)
    actions = np.random.default_rng(seed).integers(0, 2, size=steps)
    env.reset(seed=seed)
    episodes = 0
    t0 = time.perf_counter()
    n = 0
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        n += 1
        if terminated or truncated:
            env.reset()
            episodes += 1
        if n % 4096 == 0 and time.perf_counter() - t0 > max_seconds:
            break
    dt = time.perf_counter() - t0
    return {"env_steps": n, "env_time_s": dt, "env_steps_per_s": n / dt, "episodes": episodes}


def make_vec_env(bank: TrajectoryBank, cfg: Config, monitor_dir: Optional[Path] = None):
    from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    reward_cfg, episode = cfg.rl.reward, cfg.rl.episode
    return sb3_make_vec_env(lambda: ExitEnv(bank, reward_cfg, episode=episode), n_envs=cfg.rl.ppo.n_envs, seed=cfg.seed,
                            monitor_dir=str(monitor_dir) if monitor_dir else None,
                            vec_env_cls=SubprocVecEnv if cfg.rl.ppo.vec_env == "subproc" else DummyVecEnv)


def check_ppo_config(cfg: Config) -> None:
    """Checks SB3 would only make at run time (here before anything is written)."""
    p = cfg.rl.ppo
    rollout = p.n_steps * p.n_envs
    if p.batch_size > rollout:
        raise ConfigError(f"rl.ppo.batch_size={p.batch_size} is larger than one rollout "
                          f"(rl.ppo.n_steps * rl.ppo.n_envs = {rollout}); lower it or raise n_steps")
    if p.batch_size < 2:
        raise ConfigError("rl.ppo.batch_size must be >= 2 (advantage normalisation)")
    if p.vec_env == "subproc" and p.n_envs < 2:
        raise ConfigError("rl.ppo.vec_env=subproc needs rl.ppo.n_envs >= 2; use vec_env=dummy for one env")


def make_ppo(env, cfg: Config, tensorboard: bool = True, log_dir: Optional[Path] = None):
    """SB3 PPO from ``cfg.rl.ppo`` (logger: CSV + TensorBoard in ``log_dir``)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.utils import LinearSchedule

    check_ppo_config(cfg)
    p = cfg.rl.ppo
    lr = LinearSchedule(p.learning_rate, 0.0, 1.0) if p.lr_schedule == "linear" else p.learning_rate
    model = PPO("MlpPolicy", env, learning_rate=lr, n_steps=p.n_steps, batch_size=p.batch_size,
                n_epochs=p.n_epochs, gamma=p.gamma, gae_lambda=p.gae_lambda, ent_coef=p.ent_coef,
                clip_range=p.clip_range, policy_kwargs={"net_arch": list(p.net_arch)}, seed=cfg.seed,
                device=p.device, verbose=0)
    if log_dir is not None:
        formats = ["csv"] + (["tensorboard"] if tensorboard else [])
        model.set_logger(configure(str(log_dir), formats))
    return model


def _episode_curve(monitor_dir: Path, max_rows: int = 1000) -> list[dict[str, float]]:
    """Mean step reward per episode (reward / length) in time order, binned to ``max_rows``."""
    from stable_baselines3.common.monitor import LoadMonitorResultsError, load_results

    try:
        df = load_results(str(monitor_dir))
    except LoadMonitorResultsError:  # no monitor file: no environment ran (a broken file still raises)
        return []
    if df.empty:
        return []
    df = df.sort_values("t").reset_index(drop=True)
    mean_step = (df["r"] / df["l"]).to_numpy()
    steps = df["l"].cumsum().to_numpy()
    n = len(df)
    bins = np.array_split(np.arange(n), min(max_rows, n))
    return [{"episode": int(b[-1]) + 1, "timesteps": int(steps[b[-1]]), "episodes_in_bin": int(len(b)),
             "mean_step_reward": float(mean_step[b].mean()), "episode_return": float(df["r"].to_numpy()[b].mean()),
             "episode_length": float(df["l"].to_numpy()[b].mean())} for b in bins]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)


def init_policy_from(sb3_model, source: ExitPolicy) -> None:
    """Copy ``source``'s network and action head (an :class:`ExitPolicy` of the same shape, e.g. the exit
    classifier, whose logit 1 "agrees" is the policy's action 1 "exit") into the PPO model's policy; the
    value network keeps its own initialisation."""
    policy = sb3_model.policy
    if tuple(policy.observation_space.shape) != (source.hidden_size,):
        raise ValueError(f"the policy observes {tuple(policy.observation_space.shape)} but the source network "
                         f"takes {source.hidden_size} inputs")
    try:
        policy.mlp_extractor.policy_net.load_state_dict(source.policy_net.state_dict())
        policy.action_net.load_state_dict(source.action_net.state_dict())
    except RuntimeError as e:
        raise ValueError(f"the source network {source.net_arch} does not match rl.ppo.net_arch: {e}") from e


def analyse_policy(policy, bank: TrajectoryBank, cfg: Config, thresholds=None) -> dict[str, Any]:
    """Exit accuracy of ``policy`` on ``bank`` at several thresholds, plus the oracle
    (exit at l_opt) and the full model as references."""
    thresholds = thresholds or sorted({MID_THRESHOLD, *cfg.eval.gc_thresholds})
    temp = cfg.decoding.policy_temperature
    e = bank.n_exit_points
    return {
        "thresholds": [evaluate_agent_on_bank(policy, bank, t, temp, cfg.rl.reward) for t in thresholds],
        "oracle": exit_metrics(bank.l_opt.astype(np.int64), bank, cfg.rl.reward),
        "full_model": exit_metrics(np.full(bank.num_tokens, e, dtype=np.int64), bank, cfg.rl.reward),
    }


def _training_bank(cfg: Config, bank: Optional[Union[TrajectoryBank, str, Path]]) -> TrajectoryBank:
    """The bank the agent learns from: the run's (built or reused), a bank directory or a loaded bank,
    viewed with the config's observation features and cut to ``rl.train_tokens``."""
    if bank is None:
        bank = build_bank(cfg)
    if not isinstance(bank, TrajectoryBank):
        bank = TrajectoryBank.load(bank, observation=cfg.rl.observation)
    elif bank.observation is not None and bank.observation != cfg.rl.observation:
        raise ValueError(f"the bank holds {bank.observation!r} observations but rl.observation="
                         f"{cfg.rl.observation!r}; rebuild the bank with scripts/build_bank.py")
    # a bank recorded with more features serves an observation of fewer (the ablations share one bank)
    bank = bank.with_features(cfg.rl.observation_features, cfg.rl.candidates())
    return bank.training_subset(cfg.rl.train_tokens, seed=cfg.seed)


def _policy_metadata(cfg: Config, bank: TrajectoryBank) -> dict:
    """What an exported policy (and the classifier) records about the observation it takes."""
    fp = bank.manifest.get("fingerprint", {"hidden_size": bank.hidden_size, "exit_layers": bank.exit_layers})
    return {"observation": bank.observation or cfg.rl.observation, "exit_layers": bank.exit_layers,
            "features": list(bank.manifest.get("observation_features", [])),
            "candidates": bank.manifest.get("candidates"),
            "final_layer": bank.manifest.get("final_layer"), "hidden_size": bank.hidden_size,
            "fingerprint": fp, "model": bank.manifest.get("model"), "config_name": cfg.name, "seed": cfg.seed,
            "preprocessing": f"greencode.decoding.policy_observation(model, h, {cfg.rl.observation!r}), float32"}


def _learn(cfg: Config, train_bank: TrajectoryBank, classifier, agent_dir: Path, threads: int, *,
           tensorboard: bool, progress_bar: bool):
    """PPO on the training sequences (started from the classifier with ``rl.ppo.init_policy=classifier``),
    checkpointed; returns the SB3 model and the seconds ``learn`` took."""
    from stable_baselines3.common.callbacks import CheckpointCallback

    p = cfg.rl.ppo
    env = make_vec_env(train_bank, cfg, monitor_dir=agent_dir / "monitor")
    with torch_threads(threads):
        model = make_ppo(env, cfg, tensorboard=tensorboard, log_dir=agent_dir / "logs")
    if p.init_policy == "classifier":
        init_policy_from(model, classifier)
        log.info("PPO's policy starts from the exit classifier (rl.ppo.init_policy=classifier)")
    ckpt = CheckpointCallback(save_freq=max(p.checkpoint_freq // p.n_envs, 1), save_path=str(agent_dir / "checkpoints"),
                              name_prefix="ppo")
    log.info("PPO: %d timesteps, %d env(s), n_steps %d, batch %d, epochs %d, lr %g (%s), net %s",
             p.total_timesteps, p.n_envs, p.n_steps, p.batch_size, p.n_epochs, p.learning_rate, p.lr_schedule,
             p.net_arch)
    with torch_threads(threads):
        t0 = time.perf_counter()
        model.learn(total_timesteps=p.total_timesteps, callback=ckpt, progress_bar=progress_bar)
        wall_s = time.perf_counter() - t0
    env.close()
    return model, wall_s


def _bank_weights(bank: TrajectoryBank) -> dict:
    """``{"weights": ...}``: the weights the bank was recorded from (an older bank without the record: ``{}``, so
    the run's models now are recorded)."""
    return {"weights": bank.manifest["weights"]} if bank.manifest.get("weights") else {}


def _analysis(cfg: Config, bank: TrajectoryBank, train_bank: TrajectoryBank, heldout_bank: Optional[TrajectoryBank],
              policy, classifier, classifier_report: dict, policy_path: Path, curve: list, training: dict) -> dict:
    """``results/<name>/rl/analysis.json``: the bank, the optimal exits, the agent's exits and agreement per
    threshold, the classifier, each learned decision's AUC against the oracle label, and the training."""
    eval_bank = heldout_bank if heldout_bank is not None else train_bank
    which = "heldout" if heldout_bank is not None else "train (no held-out sequences)"
    return {
        "meta": run_metadata(cfg, stage="rl", **_bank_weights(bank)),
        "policy": str(policy_path),
        "bank": {"num_sequences": bank.num_sequences, "num_tokens": bank.num_tokens,
                 "n_exit_points": bank.n_exit_points, "hidden_size": bank.hidden_size,
                 "exit_layers": bank.exit_layers, "final_layer": bank.manifest.get("final_layer"),
                 "observation": bank.observation, "heldout_sequences": int(bank.heldout.sum()),
                 "observation_features": list(bank.manifest.get("observation_features", [])),
                 "recorded_features": bank.manifest.get("recorded_features"),
                 "training_subset": bank.manifest.get("training_subset")},
        "optimal_exit_histogram": {"train": train_bank.l_opt_histogram(),
                                   "heldout": heldout_bank.l_opt_histogram() if heldout_bank is not None else None},
        "exit_accuracy": {"bank": which, "temperature": cfg.decoding.policy_temperature,
                          **analyse_policy(policy, eval_bank, cfg)},
        "classifier": {"path": str(RunPaths.from_config(cfg).classifier), **classifier_report},
        # issue 30's "learning works": each learned decision's held-out AUC against the oracle label, per exit point
        "decision_auc": {"bank": which, "target_mean_auc": TARGET_MEAN_AUC,
                         **decision_auc_report({"gc": decision_auc(policy, eval_bank, seed=cfg.seed),
                                                "classifier": decision_auc(classifier, eval_bank, seed=cfg.seed)},
                                               reference="classifier")},
        "bank_behaviour": {"behaviour": bank.manifest.get("bank_config", {}).get("behaviour"),
                           "early_exit_share": bank.manifest.get("behaviour_early_exit_share")},
        "training": {**training, "episodes": sum(r["episodes_in_bin"] for r in curve),
                     "final_mean_step_reward": curve[-1]["mean_step_reward"] if curve else None,
                     "first_mean_step_reward": curve[0]["mean_step_reward"] if curve else None},
    }


def _speed_record(cfg: Config, bank: TrajectoryBank, train_bank: TrajectoryBank, env_speed: dict, training: dict,
                  threads: int) -> dict:
    """``results/benchmark/rl_env_<name>.json``: the environment's steps per second and PPO's."""
    p = cfg.rl.ppo
    return {"meta": run_metadata(cfg, stage="rl_env_benchmark", **_bank_weights(bank)),
            "bank_shape": {"num_tokens": train_bank.num_tokens, "n_exit_points": train_bank.n_exit_points,
                           "hidden_size": train_bank.hidden_size},
            **env_speed,
            "ppo_total_timesteps": training["total_timesteps"], "ppo_wall_time_s": training["wall_time_s"],
            "ppo_steps_per_s": training["steps_per_s"], "n_envs": p.n_envs, "vec_env": p.vec_env,
            "ppo_device": p.device, "torch_threads": threads}


def _log_summary(analysis: dict) -> None:
    mid = next((r for r in analysis["exit_accuracy"]["thresholds"] if r["threshold"] == MID_THRESHOLD), None)
    if mid:
        log.info("agent at threshold %.2f on the %s bank: %.1f%% of tokens exit before the final layer, "
                 "%.1f%% agree with the full model, %.1f%% at l_opt", MID_THRESHOLD,
                 analysis["exit_accuracy"]["bank"], 100 * mid["share_exit_before_final"],
                 100 * mid["agreement_with_final"], 100 * mid["share_at_l_opt"])
    da = analysis["decision_auc"]
    log.info("decision AUC against the oracle label, mean over exit points (%s bank): GC %s, classifier %s "
             "(issue 30's target %.2f)", da["bank"], _fmt_auc(da["gc"]), _fmt_auc(da["classifier"]), TARGET_MEAN_AUC)


def train_agent(cfg: Config, bank: Optional[Union[TrajectoryBank, str, Path]] = None, *,
                progress_bar: bool = True, tensorboard: bool = True) -> Path:
    """Train the PPO exit agent and write everything listed in the module docstring.
    ``bank`` (a TrajectoryBank or a bank directory) skips building/reusing the run's bank.
    Returns the exported policy path."""
    check_ppo_config(cfg)
    paths = RunPaths.from_config(cfg)
    bank = _training_bank(cfg, bank)
    set_seed(cfg.seed)
    has_heldout = bool(bank.heldout.any()) and not bool(bank.heldout.all())
    train_bank = bank.sequences(heldout=False) if has_heldout else bank
    heldout_bank = bank.sequences(heldout=True) if has_heldout else None

    agent_dir = paths.agent
    for sub in ("monitor", "logs", "checkpoints"):  # a fresh run: no files mixed in from an older one
        shutil.rmtree(agent_dir / sub, ignore_errors=True)
    save_run_info(agent_dir, cfg, "rl", bank=bank.manifest.get("path", "in-memory"), bank_tokens=bank.num_tokens,
                  bank_sequences=bank.num_sequences)

    env_speed = benchmark_env(train_bank, cfg.rl.reward, seed=cfg.seed, episode=cfg.rl.episode)
    log.info("environment: %.0f steps/s on the bank (numpy only)", env_speed["env_steps_per_s"])

    metadata = _policy_metadata(cfg, bank)
    # the supervised rival (CALM's learned classifier): same MLP, same bank, same observation; trained
    # first, so that rl.ppo.init_policy=classifier can start PPO from it
    classifier, classifier_report = train_classifier(bank, cfg.rl.ppo.net_arch, seed=cfg.seed, path=paths.classifier,
                                                     metadata=metadata)

    # SB3's small MLP gains nothing from intra-op threads, and on a busy machine OpenMP
    # threads waiting for each other slow PPO down >10x (measured: 373 vs 4,247 steps/s
    # with 2 vs 1 threads on 2 loaded cores); hardware.num_threads > 0 overrides. The model is built under
    # the same count: SB3's orthogonal init runs a QR decomposition whose last bits depend on the thread count
    # (1 vs 2 threads: 1.4e-7), and PPO turns that into another agent (a fresh clone on 2 cores did).
    threads = cfg.hardware.num_threads or 1
    model, wall_s = _learn(cfg, train_bank, classifier, agent_dir, threads, tensorboard=tensorboard,
                           progress_bar=progress_bar)
    trained_steps = int(model.num_timesteps)
    log.info("PPO finished: %d timesteps in %.1f s (%.0f steps/s)", trained_steps, wall_s, trained_steps / wall_s)
    model.save(agent_dir / "ppo_final.zip")

    metadata = dict(metadata, total_timesteps=trained_steps, reward=cfg.section_dict("rl")["rl"]["reward"],
                    init_policy=cfg.rl.ppo.init_policy)
    policy_path = export_policy(model, paths.policy, metadata)
    policy = from_sb3(model, metadata)

    # ------------------------------------------------------------------ analysis data
    out_dir = paths.results_rl
    curve = _episode_curve(agent_dir / "monitor")
    _write_csv(out_dir / "episode_rewards.csv", curve)
    progress = agent_dir / "logs" / "progress.csv"
    if progress.is_file():
        shutil.copyfile(progress, out_dir / "progress.csv")
    training = {"total_timesteps": trained_steps, "wall_time_s": wall_s, "steps_per_s": trained_steps / wall_s}
    analysis = _analysis(cfg, bank, train_bank, heldout_bank, policy, classifier, classifier_report, policy_path,
                         curve, training)
    write_json(out_dir / "analysis.json", analysis)
    write_json(paths.results.parent / "benchmark" / f"rl_env_{cfg.name}.json",
               _speed_record(cfg, bank, train_bank, env_speed, training, threads))
    _log_summary(analysis)
    return policy_path


def _fmt_auc(r: dict) -> str:
    if r.get("auc_mean") is None:
        return "undefined (one class absent)"
    ci = r.get("auc_mean_ci") or [float("nan")] * 2
    return f"{r['auc_mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
