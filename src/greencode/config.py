"""Typed configuration for every stage of GREEN-CODE.

One YAML file describes a whole experiment. It is loaded into the dataclasses below
(one per concern), may be overridden from the command line with dotted ``key=value``
pairs (``model.num_layers=4 eval.gc_thresholds=[0.8,0.9]``) and is validated with
errors that name the key, the bad value and what is allowed.

Layer indices are 0-based decoder-layer indices everywhere (index ``i`` is the output
of the i-th decoder layer).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from greencode.errors import ConfigError  # noqa: F401  (raised here; imported from here by most callers)


def _choices(*values: str) -> dict:
    return {"choices": values}


# the evaluated methods that run through HF ``generate`` (greencode.eval.methods); every other method
# family is a controller of greencode.decoding.registry, or a lossless method drafted by one
HF_METHODS = ("base", "full_hf", "hf_early_exit")


def _controller_registry():
    """The controller registry (greencode.decoding.registry), for validating method names and
    threshold grids. Imported here, not at the top: the registry holds the controller classes
    (torch), one floor above this module, and every other stage imports this one; validation
    runs after both are loaded, so there is no import circle."""
    from greencode.decoding import registry

    return registry


# --------------------------------------------------------------------------- sections
@dataclass
class HardwareConfig:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16", "auto"))
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default

    def validate(self, path: str) -> None:
        d = self.device
        if not (d in ("auto", "cpu", "cuda", "mps") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"{path}.device={d!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        _check_range(f"{path}.num_threads", self.num_threads, 0, None)


@dataclass
class ExitScheduleConfig:
    """The paper's exit-point rule: earliest exit at ``first``, then an exit every
    ``stride_first_half`` layers in the first half and every ``stride_second_half``
    layers in the second half. The final layer is always the full exit."""

    first: int = 3
    stride_first_half: int = 2
    stride_second_half: int = 4

    def validate(self, path: str) -> None:
        _check_range(f"{path}.first", self.first, 0, None)
        _check_range(f"{path}.stride_first_half", self.stride_first_half, 1, None)
        _check_range(f"{path}.stride_second_half", self.stride_second_half, 1, None)


@dataclass
class ModelConfig:
    """The decoder. ``base`` null means the embedded default: a model of the shape below
    built from a random init and pretrained on this machine (``scripts/pretrain.py``).
    Otherwise ``base`` is a local HF model directory or a hub id (its own shape is used
    and the shape fields below are ignored)."""

    family: str = field(default="llama", metadata=_choices("llama", "opt"))
    base: Optional[str] = None
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 4  # llama only (grouped-query attention)
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attn_implementation: str = field(default="sdpa", metadata=_choices("sdpa", "eager"))
    # explicit 0-based exit layers (the final layer excluded); null = use exit_schedule
    exit_layers: Optional[list[int]] = None
    exit_schedule: ExitScheduleConfig = field(default_factory=ExitScheduleConfig)

    def validate(self, path: str) -> None:
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_position_embeddings"):
            _check_range(f"{path}.{k}", getattr(self, k), 1, None)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{path}.hidden_size={self.hidden_size} must be divisible by "
                              f"{path}.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{path}.num_heads={self.num_heads} must be divisible by "
                              f"{path}.num_kv_heads={self.num_kv_heads}")
        if self.exit_layers is not None and self.base is None:
            # checked against the model depth once the model is known (models.schedule)
            bad = [e for e in self.exit_layers if not 0 <= e < self.num_layers - 1]
            if bad:
                raise ConfigError(
                    f"{path}.exit_layers has {bad} outside [0, {self.num_layers - 2}] "
                    f"(0-based, the final layer {self.num_layers - 1} is always the full exit)")


@dataclass
class DataConfig:
    """Where code comes from. ``source: hub`` loads CodeXGLUE token-level completion
    (``google/code_x_glue_cc_code_completion_token``); ``source: local`` builds the
    same token format from a directory or zip of real source files."""

    source: str = field(default="local", metadata=_choices("local", "hub"))
    language: str = field(default="python", metadata=_choices("python", "java"))
    hub_id: str = "google/code_x_glue_cc_code_completion_token"
    # directory or .zip of .py/.java files; null = the interpreter's stdlib (python)
    # or the JDK's lib/src.zip (java); "@site-packages" = the running environment's
    # installed packages (the project's pinned requirements: the same on every machine)
    local_path: Optional[str] = None
    # normalized: CodeXGLUE (<STR_LIT>, <NUM_LIT>, <EOL>, space-joined tokens); raw: the same
    # tokens with literals verbatim; source: the file as written (whitespace, comments and
    # literals kept), so completions are code an editor can insert
    literal_mode: str = field(default="normalized", metadata=_choices("normalized", "raw", "source"))
    keep_frequent_literals: int = 0  # keep the N most frequent literals as <STR_LIT:...>
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_file_tokens: int = 20
    max_file_tokens: int = 20000
    max_files: Optional[int] = None  # cap on files used (null = all)
    # local corpus only: fnmatch patterns on the path inside local_path to leave out
    # (site-packages / dist-packages are always left out)
    exclude: list[str] = field(default_factory=list)
    # local corpus only: skip files the language's parser rejects (python: ast of the
    # running interpreter, java: tree-sitter-java); false keeps every file that lexes
    syntax_check: bool = True
    num_workers: int = 0  # processes for the local corpus build; 0 = min(cpu count, 8)

    def validate(self, path: str) -> None:
        _check_range(f"{path}.num_workers", self.num_workers, 0, None)
        _check_range(f"{path}.validation_fraction", self.validation_fraction, 0.0, 0.5)
        _check_range(f"{path}.test_fraction", self.test_fraction, 0.0, 0.5)
        _check_range(f"{path}.min_file_tokens", self.min_file_tokens, 0, None)
        _check_range(f"{path}.max_file_tokens", self.max_file_tokens, 1, None)
        _check_range(f"{path}.keep_frequent_literals", self.keep_frequent_literals, 0, None)
        if self.max_files is not None:
            _check_range(f"{path}.max_files", self.max_files, 1, None)


@dataclass
class TokenizerConfig:
    """``path`` null trains a byte-level BPE on the training split (embedded default);
    otherwise a tokenizer directory or hub id (the paper configs use the model's own)."""

    path: Optional[str] = None
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_chars: int = 5_000_000  # BPE training text cap (train records in a seeded order)
    # fill-in-the-middle sentinels <fim_prefix>, <fim_middle>, <fim_suffix> (StarCoder's names), appended
    # after the BPE's own vocabulary as special tokens, so the other ids equal those of the tokenizer without
    fim_tokens: bool = False

    def validate(self, path: str) -> None:
        _check_range(f"{path}.vocab_size", self.vocab_size, 300, None)
        _check_range(f"{path}.max_train_chars", self.max_train_chars, 1000, None)


@dataclass
class FimConfig:
    """Fill-in-the-middle training (Bavarian et al. 2022, "FIM for free"; StarCoder's recipe): a ``rate``
    share of the packed chunks is cut at two uniformly random token positions into prefix, middle and
    suffix and rearranged as ``<fim_prefix> P <fim_suffix> S <fim_middle> M <eos>`` (PSM), or, for a
    ``spm_rate`` share of those, ``<fim_prefix> <fim_suffix> S <fim_middle> P M <eos>`` (SPM).
    Needs a tokenizer with the sentinels (``tokenizer.fim_tokens``); 0 = off."""

    rate: float = 0.0
    spm_rate: float = 0.0

    def validate(self, path: str) -> None:
        _check_range(f"{path}.rate", self.rate, 0.0, 1.0)
        _check_range(f"{path}.spm_rate", self.spm_rate, 0.0, 1.0)


@dataclass
class TrainStageConfig:
    """HF Trainer settings shared by base pretraining and LITE fine-tuning."""

    learning_rate: float = 1e-5
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 32
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    seq_len: int = 1024  # packing / chunking length in model tokens
    max_train_tokens: Optional[int] = None  # cap on packed training tokens (null = all)
    eval_steps: int = 200
    eval_max_tokens: int = 65536  # validation tokens used for periodic evaluation
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0
    # mixed precision with fp32 master weights: "auto" follows hardware.dtype (bf16 when it
    # is bfloat16), "bf16" forces bf16 autocast (2.3x faster on a CPU with AVX512-BF16,
    # results/LOG.md 2026-12-01), "no" trains in the weights' own precision
    mixed_precision: str = field(default="auto", metadata=_choices("auto", "bf16", "fp16", "no"))
    fim: FimConfig = field(default_factory=FimConfig)

    def validate(self, path: str) -> None:
        _check_range(f"{path}.learning_rate", self.learning_rate, 0.0, 1.0)
        for k in ("batch_size", "grad_accum", "seq_len", "eval_steps", "save_steps", "logging_steps"):
            _check_range(f"{path}.{k}", getattr(self, k), 1, None)
        _check_range(f"{path}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)


@dataclass
class EarlyExitPretrainConfig:
    """Early-exit-ready pretraining (LayerSkip-style; greencode.training.early_exit_loss):
    ``loss = CE_final + e_scale * sum_i s_i CE_i + distill * sum_i s_i KL(p_final || p_i)`` over
    the exit points that the curriculum switches on, plus layer dropout rising with depth.
    Off (``enabled: false``) is the plain recipe: the final layer's loss alone."""

    enabled: bool = False
    scale: str = field(default="one", metadata=_choices("one", "l", "sqrt_l", "inv_l"))
    e_scale: float = 1.0
    curriculum: str = field(default="none", metadata=_choices("none", "rotational", "gradual"))
    curriculum_period: int = 2          # rotational: each exit point gets a loss every `period` steps
    gradual_fraction: float = 0.5       # gradual: all exit points on after this share of the steps
    token_fraction: float = 1.0         # share of positions whose exit losses are computed (the LM head is costly)
    distill: float = 0.0                # self-distillation weight (0 = off)
    distill_temperature: float = 1.0
    layer_dropout: float = 0.0          # drop probability of the last layer (0 = off)
    layer_dropout_scale: str = field(default="linear", metadata=_choices("uniform", "linear", "exp"))

    def validate(self, path: str) -> None:
        _check_range(f"{path}.e_scale", self.e_scale, 0.0, None)
        _check_range(f"{path}.curriculum_period", self.curriculum_period, 1, None)
        _check_range(f"{path}.gradual_fraction", self.gradual_fraction, 0.0, 1.0, low_open=True)
        _check_range(f"{path}.distill", self.distill, 0.0, None)
        _check_range(f"{path}.token_fraction", self.token_fraction, 0.0, 1.0, low_open=True)
        _check_range(f"{path}.distill_temperature", self.distill_temperature, 0.0, None, low_open=True)
        _check_range(f"{path}.layer_dropout", self.layer_dropout, 0.0, 0.9)


@dataclass
class PretrainConfig(TrainStageConfig):
    learning_rate: float = 1e-3
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    warmup_ratio: float = 0.05
    early_exit: EarlyExitPretrainConfig = field(default_factory=EarlyExitPretrainConfig)


@dataclass
class FinetuneConfig(TrainStageConfig):
    """LITE: loss = sum_i w_i CE(lm_head(final_norm(h_i))) / sum_i w_i over the exit
    layers and the final layer."""

    weights: Union[str, list[float]] = "geometric"  # geometric | uniform | explicit list
    budgets: list[float] = field(default_factory=lambda: [0.7, 0.2, 0.1])  # first half, second half, final
    ratio: float = 0.9

    def validate(self, path: str) -> None:
        super().validate(path)
        if isinstance(self.weights, str) and self.weights not in ("geometric", "uniform"):
            raise ConfigError(f"{path}.weights={self.weights!r}; use 'geometric', 'uniform' or a list "
                              "of floats, one per exit layer plus one for the final layer")
        if isinstance(self.weights, list) and any(w < 0 for w in self.weights):
            raise ConfigError(f"{path}.weights has a negative weight: {self.weights}")
        if len(self.budgets) != 3 or any(b < 0 for b in self.budgets):
            raise ConfigError(f"{path}.budgets={self.budgets} must be 3 non-negative numbers "
                              "(first half, second half, final layer)")
        _check_range(f"{path}.ratio", self.ratio, 0.0, 1.0, low_open=True)


@dataclass
class BankConfig:
    """Trajectory bank: hidden states at every exit point for generated tokens."""

    num_sequences: int = 200
    tokens_per_sequence: int = 15  # T generated tokens per episode
    context_fraction: list[float] = field(default_factory=lambda: [0.2, 0.6])
    max_context_tokens: int = 512
    max_tokens: Optional[int] = None  # cap on stored tokens (null = no cap)
    heldout_fraction: float = 0.1  # sequences kept aside for the agent's exit-accuracy report
    # tuning = the validation files of the tuning slice only (the first calibration.sample_offset samples of the
    # seeded validation order): what ablations compare agents on, never the calibration's files
    split: str = field(default="train", metadata=_choices("train", "validation", "tuning"))
    # the decoding the states are recorded from (labels are always the full model's prediction on
    # the state reached): full = the full model (states early-exit decoding never reaches);
    # random = each sequence exits at each exit point with a rate drawn from exit_rate, so deeper
    # layers hold propagated K/V and earlier tokens came from early exits, as at inference;
    # policy = an exported exit policy (policy_path, one threshold per sequence from policy_thresholds)
    behaviour: str = field(default="random", metadata=_choices("full", "random", "policy"))
    exit_rate: list[float] = field(default_factory=lambda: [0.0, 0.3])
    policy_path: Optional[str] = None
    policy_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    batch_size: int = 8  # sequences decoded together (rows of one batched decode)
    # local processes on CPU (1 torch thread each); under torchrun / accelerate launch the ranks shard
    # the sequences instead and rank 0 merges them
    workers: int = 1
    # where the states come from: decode = the decoding loop, token by token (observe mode; T tokens per
    # sequence after a prefix of the file); simulate = teacher-forced windows of the split's files with
    # the behaviour's exits simulated layer by layer (greencode.rl.simulate: the same states as the loop
    # fed the same tokens, all positions at once; a window of max_context_tokens is one sequence)
    source: str = field(default="decode", metadata=_choices("decode", "simulate"))
    decision_tokens: Optional[int] = None  # simulate: decided tokens in the bank (null = num_sequences x T)
    min_context_tokens: int = 32  # simulate: a window's first positions (the prompt) are never decided
    # observation features the bank records beyond the agent's (null = exactly rl.observation_features): agents
    # observing any subset of them train on this one bank (the observation ablations; TrajectoryBank.with_features)
    record_features: Optional[list[str]] = None

    def validate(self, path: str) -> None:
        _check_range(f"{path}.num_sequences", self.num_sequences, 1, None)
        if self.decision_tokens is not None:
            _check_range(f"{path}.decision_tokens", self.decision_tokens, 1, None)
        _check_range(f"{path}.min_context_tokens", self.min_context_tokens, 1, None)
        if self.source == "simulate" and self.min_context_tokens + 2 > self.max_context_tokens:
            raise ConfigError(f"{path}.min_context_tokens={self.min_context_tokens} leaves no decided position in a "
                              f"window of {path}.max_context_tokens={self.max_context_tokens}; lower it")
        _check_range(f"{path}.tokens_per_sequence", self.tokens_per_sequence, 1, None)
        _check_range(f"{path}.batch_size", self.batch_size, 1, None)
        _check_range(f"{path}.workers", self.workers, 1, 64)
        er = self.exit_rate
        if len(er) != 2 or not (0.0 <= er[0] <= er[1] <= 1.0):
            raise ConfigError(f"{path}.exit_rate={er} must be [low, high] with 0 <= low <= high <= 1")
        if not self.policy_thresholds or any(not 0.0 <= t <= 1.0 for t in self.policy_thresholds):
            raise ConfigError(f"{path}.policy_thresholds={self.policy_thresholds} must be numbers in [0, 1]")
        if self.behaviour == "policy" and not self.policy_path:
            raise ConfigError(f"{path}.behaviour=policy needs {path}.policy_path (an exported policy.pt); "
                              "or use behaviour=random")
        cf = self.context_fraction
        if len(cf) != 2 or not (0.0 < cf[0] <= cf[1] < 1.0):
            raise ConfigError(f"{path}.context_fraction={cf} must be [low, high] with 0 < low <= high < 1")
        _check_range(f"{path}.heldout_fraction", self.heldout_fraction, 0.0, 0.9)


@dataclass
class RewardConfig:
    """The exit agent's reward (greencode.rl.reward). ``kind: paper`` (the default): equations 2 and 3
    of the paper, penalties scaled into [-1, 0]. ``kind: cost``: a Lagrangian of agreement and compute,
    +1 for an exit that agrees with the final layer, -wrong_exit_penalty for one that does not, and
    -cost_weight x (the share of the model's layers) for every segment of layers a token runs, so
    cost_weight moves the agent from the full model (0) to the aggressive end."""

    kind: str = field(default="paper", metadata=_choices("paper", "cost"))
    alpha: float = 0.5  # correct but late
    beta: float = 1.0  # wrong and early
    gamma: float = 1.0  # continue past l_opt
    # wrong and not early (a later exit point disagrees again): the paper's "small penalty". null =
    # beta / E (E early exit points), the largest value that keeps such a late exit at least as good
    # as a wrong early exit at any distance (-epsilon >= -beta * d / E for every d >= 1)
    epsilon: Optional[float] = None
    cost_weight: float = 1.0  # kind=cost: lambda, the price of running every layer once (in agreement units)
    wrong_exit_penalty: float = 1.0  # kind=cost: what an exit that disagrees with the final layer costs

    def validate(self, path: str) -> None:
        for k in ("alpha", "beta", "gamma", "epsilon"):
            if getattr(self, k) is not None or k != "epsilon":
                _check_range(f"{path}.{k}", getattr(self, k), 0.0, 1.0)
        if self.alpha > self.beta:
            raise ConfigError(f"{path}.alpha={self.alpha} must be <= {path}.beta={self.beta} (paper: alpha <= beta)")
        _check_range(f"{path}.cost_weight", self.cost_weight, 0.0, None)
        _check_range(f"{path}.wrong_exit_penalty", self.wrong_exit_penalty, 0.0, None)


@dataclass
class PPOConfig:
    """Stable-Baselines3 PPO; defaults are the paper's Table III."""

    total_timesteps: int = 500_000
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    n_steps: int = 4096
    batch_size: int = 512
    n_epochs: int = 6
    learning_rate: float = 5e-5
    lr_schedule: str = field(default="linear", metadata=_choices("linear", "constant"))
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    clip_range: float = 0.2
    n_envs: int = 1
    vec_env: str = field(default="dummy", metadata=_choices("dummy", "subproc"))
    checkpoint_freq: int = 50_000
    device: str = "cpu"
    # the policy network's starting weights: "random" (SB3's initialisation, the paper) or "classifier" (the
    # supervised exit classifier trained first on the same bank and observation, copied into the policy's
    # network and action head; PPO then fine-tunes it under the reward; the value network starts fresh)
    init_policy: str = field(default="random", metadata=_choices("random", "classifier"))

    def validate(self, path: str) -> None:
        for k in ("total_timesteps", "n_steps", "batch_size", "n_epochs", "n_envs", "checkpoint_freq"):
            _check_range(f"{path}.{k}", getattr(self, k), 1, None)
        _check_range(f"{path}.learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        _check_range(f"{path}.gamma", self.gamma, 0.0, 1.0)


@dataclass
class RLConfig:
    # how the hidden state is preprocessed into the observation, identically at
    # training and inference: raw residual stream, or through the model's final norm
    observation: str = field(default="normed", metadata=_choices("raw", "normed"))
    # extra observation values after the hidden state (each a few hundred MACs per check at most):
    # exit_index (one-hot exit point), cosine_prev (cosine to the previous exit point's state),
    # prev_exit (the previous token's exit point / E), and the cheap candidate features of
    # greencode.decoding.signals: cand_max_prob, cand_margin, cand_neg_entropy, cand_top1_logit,
    # cand_top1_stable (the softmax over candidate_k candidate tokens' logits from candidate_source; with
    # first_full the full LM head runs at the first exit point); [] = the paper's hidden state only
    observation_features: list[str] = field(default_factory=list)
    # PPO's episode (greencode.rl.env): one token's decisions (the bank is replayed, so a decision moves no later
    # token's reward) or one whole sequence (a return that mixes in later tokens' rewards; the earlier default)
    episode: str = field(default="token", metadata=_choices("token", "sequence"))
    # where the cand_* features' candidates come from (first_full: the full head's top-k at the first exit
    # point; low_rank or low_rank:R: the top-k of a rank-R (default 32) factorisation of the head there, no
    # full head; the other sources of greencode.decoding.signals are measured offline only for now) and how many
    candidate_source: str = "first_full"
    candidate_k: int = 4
    # the agent and the classifier learn from a seeded subset of the bank's training sequences holding at most
    # this many tokens (null = all); the held-out sequences stay whole (the data-size ablation: one bank)
    train_tokens: Optional[int] = None
    bank: BankConfig = field(default_factory=BankConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def validate(self, path: str) -> None:
        from greencode.decoding.controllers import (OBSERVATION_FEATURES, check_online_candidates,
                                                    uses_candidates)
        from greencode.decoding.signals import MAX_CANDIDATES, parse_source

        for f in self.observation_features:
            if f not in OBSERVATION_FEATURES:
                raise ConfigError(f"{path}.observation_features has {f!r}; known: {', '.join(OBSERVATION_FEATURES)}")
        if len(set(self.observation_features)) != len(self.observation_features):
            raise ConfigError(f"{path}.observation_features={self.observation_features} repeats a feature")
        try:
            parse_source(self.candidate_source)
        except ConfigError as e:
            raise ConfigError(f"{path}.candidate_source: {e}") from None
        if isinstance(self.candidate_k, bool) or not isinstance(self.candidate_k, int) \
                or not 2 <= self.candidate_k <= MAX_CANDIDATES:
            raise ConfigError(f"{path}.candidate_k={self.candidate_k!r} must be an integer in [2, {MAX_CANDIDATES}] "
                              "(the margin needs two candidates)")
        if uses_candidates(self.observation_features):
            check_online_candidates(self.candidate_source, self.candidate_k,
                                    f"{path}.candidate_source (for the cand_* observation features)")
        rec = self.bank.record_features
        if rec is not None:
            for f in rec:
                if f not in OBSERVATION_FEATURES:
                    raise ConfigError(f"{path}.bank.record_features has {f!r}; known: {', '.join(OBSERVATION_FEATURES)}")
            if len(set(rec)) != len(rec):
                raise ConfigError(f"{path}.bank.record_features={rec} repeats a feature")
            missing = [f for f in self.observation_features if f not in rec]
            if missing:
                raise ConfigError(f"{path}.bank.record_features={rec} lacks {missing} of {path}.observation_features; "
                                  "the bank must record every feature the agent observes (add them)")
            if uses_candidates(rec):
                check_online_candidates(self.candidate_source, self.candidate_k,
                                        f"{path}.candidate_source (for the recorded cand_* features)")
        if self.train_tokens is not None and (isinstance(self.train_tokens, bool)
                                               or not isinstance(self.train_tokens, int) or self.train_tokens < 1):
            raise ConfigError(f"{path}.train_tokens={self.train_tokens!r} must be a positive integer or null (all)")

    def recording(self) -> "RLConfig":
        """This section as the bank records it: ``observation_features`` = ``bank.record_features`` when set."""
        import dataclasses

        if self.bank.record_features is None:
            return self
        return dataclasses.replace(self, observation_features=list(self.bank.record_features))

    def candidates(self) -> Optional[dict]:
        """``{"source", "k"}`` when the observation has cand_* features (what a bank and a policy record), else None."""
        from greencode.decoding.controllers import uses_candidates

        if not uses_candidates(self.observation_features):
            return None
        return {"source": self.candidate_source, "k": int(self.candidate_k)}


@dataclass
class DecodingConfig:
    # how deeper layers' K/V are filled for a token that exited early:
    # propagate = the exit hidden state through each deeper layer's input norm and K/V
    # projections (the paper's state propagation); compute = run the deeper layers anyway
    # (exact cache, no compute saved: an analysis baseline)
    kv_strategy: str = field(default="propagate", metadata=_choices("propagate", "compute"))
    policy_temperature: float = 1.0
    # the decode loop's per-layer step: off = eager; otherwise torch.compile with this mode and static
    # shapes (default, reduce-overhead = also CUDA graphs, max-autotune, max-autotune-no-cudagraphs);
    # tokens equal the eager loop's; falls back to eager (with a warning) where compiling fails
    compile: str = field(default="off", metadata=_choices("off", "default", "reduce-overhead", "max-autotune",
                                                          "max-autotune-no-cudagraphs"))

    def validate(self, path: str) -> None:
        _check_range(f"{path}.policy_temperature", self.policy_temperature, 0.0, None, low_open=True)


@dataclass
class EvalConfig:
    num_samples: int = 1000
    sample_seed: int = 0
    sample_offset: int = 0  # skip the first N samples of the seeded order (disjoint slices of one split)
    split: str = field(default="test", metadata=_choices("test", "validation"))
    mode: str = field(default="token", metadata=_choices("token", "line"))
    context_fraction: float = 0.2
    max_context_tokens: int = 512
    max_new_tokens: int = 15
    # families, ids, or "calibrated" (every controller at its thresholds from the calibrate stage)
    methods: list[str] = field(default_factory=lambda: [
        "base", "full_hf", "full", "fixed", "confidence", "entropy", "saturation", "classifier", "oracle", "gc",
        "calibrated", "hf_early_exit"])
    # a threshold controller named without a threshold runs at each of its grid's: <name>_thresholds for the
    # built-in ones (the registry's defaults), or thresholds: {<name>: [...]} for any registered controller
    # (it wins over the named key); a controller with neither runs at its registered default grid
    gc_thresholds: list[float] = field(default_factory=lambda: [0.6, 0.8, 0.9, 0.91, 0.92, 0.94])
    confidence_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    entropy_thresholds: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    saturation_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.99])
    classifier_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    thresholds: dict[str, list[float]] = field(default_factory=dict)
    energy: str = field(default="auto", metadata=_choices("auto", "zeus", "time"))
    warmup_samples: int = 2
    # samples whose generations are timed (latency, energy): the first N of the sample list,
    # each method in a seeded random order with its own prefill; the rest are decoded for
    # accuracy only, every loop method continuing one shared full-model prefill (same tokens,
    # far less work). null = time every sample
    timing_samples: Optional[int] = None
    # HF-generate families that also run on the accuracy-only samples (default: all of them). A family
    # left out runs on the timed samples only, and then every row of the table is scored on those (the
    # samples all methods decoded: greencode.eval.summary.common_samples), so rows stay comparable
    accuracy_only_hf: list[str] = field(default_factory=lambda: ["base", "full_hf", "hf_early_exit"])
    # processes for the accuracy-only samples (each with 1 torch thread), started after the timed
    # samples ran alone on a quiet machine, and for the teacher-forced pass (token criterion, grids); on CPU;
    # 1 = everything in this process
    workers: int = 1
    # accuracy-only samples decoded together: prompts x loop methods as the rows of one batched
    # decode (each prompt prefilled once; rows that exit skip the deeper layers). Timed samples
    # always run one request at a time (batch 1), as an editor calls the model
    accuracy_batch_prompts: int = 4
    # paired bootstrap resamples for the 95% confidence intervals of the summary (0 = none)
    bootstrap_resamples: int = 2000
    overhead_ab: bool = True  # A/B run: policy evaluated but ignored vs. not evaluated
    overhead_ab_threshold: Optional[float] = None  # GC threshold of the A/B run; null = the middle gc threshold
    # 0-based draft exit layers for HF's assistant_early_exit (LayerSkip-style); null = every exit layer
    hf_early_exit_layers: Optional[list[int]] = None
    # gc_lossless / layerskip: tokens drafted at most before one full-model verification pass
    lossless_k_max: int = 4
    # gc_lossless / layerskip: drafting also stops after a drafted token whose max softmax probability at
    # its exit layer is below this (the draft length chosen as it goes); null = only lossless_k_max
    lossless_draft_threshold: Optional[float] = None
    # single-line infilling slice (greencode.eval.infill): a held-out line per file of eval.split given its
    # prefix and suffix, for models trained to fill in the middle; 0 = off
    infill_samples: int = 0
    infill_max_new_tokens: int = 48
    infill_fixed_layers: Optional[list[int]] = None  # the fixed exits run on it; null = every exit point
    infill_gc_thresholds: Optional[list[float]] = None  # GC's thresholds on it; null = eval.gc_thresholds

    def token_samples(self) -> int:
        """The token criterion's sample count (``token_num_samples``, else ``num_samples``)."""
        return int(self.num_samples if self.token_num_samples is None else self.token_num_samples)

    def validate(self, path: str) -> None:
        _check_range(f"{path}.num_samples", self.num_samples, 1, None)
        _check_range(f"{path}.context_fraction", self.context_fraction, 0.0, 1.0, low_open=True)
        _check_range(f"{path}.max_context_tokens", self.max_context_tokens, 1, None)
        _check_range(f"{path}.max_new_tokens", self.max_new_tokens, 1, None)
        _check_range(f"{path}.infill_samples", self.infill_samples, 0, None)
        _check_range(f"{path}.infill_max_new_tokens", self.infill_max_new_tokens, 10, None)
        registry = _controller_registry()
        registry.validate_section(self, path)
        if self.overhead_ab_threshold is not None:
            _check_range(f"{path}.overhead_ab_threshold", self.overhead_ab_threshold, 0.0, 1.0)
        _check_range(f"{path}.warmup_samples", self.warmup_samples, 0, None)
        _check_range(f"{path}.bootstrap_resamples", self.bootstrap_resamples, 0, None)
        _check_range(f"{path}.workers", self.workers, 1, 64)
        _check_range(f"{path}.lossless_k_max", self.lossless_k_max, 1, 64)
        if self.lossless_draft_threshold is not None:
            _check_range(f"{path}.lossless_draft_threshold", self.lossless_draft_threshold, 0.0, 1.0)
        _check_range(f"{path}.accuracy_batch_prompts", self.accuracy_batch_prompts, 1, 1024)
        if self.timing_samples is not None:
            _check_range(f"{path}.timing_samples", self.timing_samples, 0, None)
        for m in self.accuracy_only_hf:
            if m not in HF_METHODS:
                raise ConfigError(f"{path}.accuracy_only_hf has {m!r}; it lists HF-generate families: "
                                  f"{', '.join(HF_METHODS)}")
        known = (HF_METHODS[:2] + registry.controller_names() + tuple(registry.lossless_methods()) + HF_METHODS[2:]
                 + ("calibrated",))
        for m in self.methods:
            if m not in known:
                raise ConfigError(f"{path}.methods has unknown method {m!r}; known: {', '.join(known)}")


@dataclass
class CalibrationConfig:
    """Learn-then-Test calibration (as in CALM) on the validation split: for each exit
    controller and each target (a maximum expected share of generated tokens that disagree
    with the full model), the threshold with the least compute whose risk is certified at
    level ``delta`` by fixed-sequence testing with the Hoeffding-Bentkus p-value."""

    enabled: bool = True  # the pipeline's calibrate stage; the evaluation then reports every controller at the targets
    num_samples: int = 300  # validation samples (certifying a 1% target at delta 0.1 needs >= 230)
    # the token criterion's own sample count (None: num_samples): one teacher-forced pass per sample for every
    # candidate at once (simulated), so it can run on many more samples than the free-running criteria; the same
    # seeded order from sample_offset, so its first num_samples are the free-running ones
    token_num_samples: Optional[int] = None
    # the calibration samples start here in the validation split's seeded order: the samples before it are
    # the tuning slice (grids, knobs such as the policy temperature), so calibration reuses nothing
    sample_offset: int = 0
    # fidelity criteria, each calibrated on its own: sequence (free-running disagreement with the full model),
    # token (teacher-forced disagreement), quality (loss of edit similarity against the real code vs the full model)
    criteria: list[str] = field(default_factory=lambda: ["sequence", "token", "quality"])
    targets: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.10])
    delta: float = 0.1
    # candidate thresholds per controller, most conservative first is derived per family; the
    # RL policy's and the classifier's are probabilities (the policy temperature only rescales the
    # same cutoff on the logit, so calibrating the threshold covers every temperature)
    families: list[str] = field(default_factory=lambda: ["fixed", "confidence", "entropy", "saturation",
                                                         "classifier", "gc"])
    gc_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995])
    classifier_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995])
    confidence_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    entropy_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5])
    saturation_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999])
    # any registered threshold controller's candidates (wins over the named key; default: the registry's
    # calibration grid)
    thresholds: dict[str, list[float]] = field(default_factory=dict)

    def token_samples(self) -> int:
        """The token criterion's sample count (``token_num_samples``, else ``num_samples``)."""
        return int(self.num_samples if self.token_num_samples is None else self.token_num_samples)

    def validate(self, path: str) -> None:
        _check_range(f"{path}.num_samples", self.num_samples, 1, None)
        if self.token_num_samples is not None:
            _check_range(f"{path}.token_num_samples", self.token_num_samples, 1, None)
        _check_range(f"{path}.delta", self.delta, 0.0, 1.0, low_open=True)
        _check_range(f"{path}.sample_offset", self.sample_offset, 0, None)
        for crit in self.criteria:
            if crit not in ("sequence", "token", "quality"):
                raise ConfigError(f"{path}.criteria has {crit!r}; known: sequence, token, quality")
        if not self.criteria:
            raise ConfigError(f"{path}.criteria is empty; give at least one of sequence, token, quality")
        if not self.targets:
            raise ConfigError(f"{path}.targets is empty; give maximum disagreement shares such as [0.02, 0.05]")
        for t in self.targets:
            _check_range(f"{path}.targets", t, 0.0, 1.0, low_open=True)
        registry = _controller_registry()
        calibrated = [c.name for c in registry.controllers() if c.param is not None]
        for f in self.families:
            if f not in calibrated:
                raise ConfigError(f"{path}.families has {f!r}; known: {', '.join(calibrated)} (the registered "
                                  "controllers with a parameter)")
        registry.validate_section(self, path, calibration=True)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    run_dir: Optional[str] = None  # null = this config's run directory
    model_name: str = "greencode"
    # the registered controller (greencode.decoding.registry) a request's exit threshold is for: gc = the run's
    # RL policy; any controller with a threshold, or none
    controller: str = "gc"
    default_threshold: float = 0.9
    default_max_new_tokens: int = 16
    max_new_tokens_cap: int = 256
    max_request_bytes: int = 1_000_000
    # the waiting room beside the batch being decoded: a request waits while it can still finish within
    # request_timeout_s at the measured drain rate (else 503 + Retry-After at once); at most this many
    # prompt tokens (its memory) and queue_size requests (a safety count, as Ollama's 512) wait
    max_queued_tokens: int = 1_048_576
    queue_size: int = 512
    # the expected finish is taken this many times over when admitting (the drain model leaves out what a
    # join costs the running rows; measured on the CPU default: 1.0 let 34 of 130 admitted requests time out)
    admission_margin: float = 1.5
    # requests decoded together, step by step (continuous batching: a request arriving while a step
    # runs joins the next one); 1 = one request at a time
    max_batch_size: int = 8
    # prompt tokens prefilled between two decoding steps while rows are decoding: prompts that fit join
    # together, a longer one is prefilled in chunks of this size over several steps (chunked prefill)
    max_prefill_tokens: int = 256
    # lossy: early exits (the threshold or target trades accuracy for compute); lossless: drafted with early
    # exits and verified by the full model, so the answer is the full model's (per request: "mode")
    default_mode: str = field(default="lossy", metadata=_choices("lossy", "lossless"))
    lossless_k_max: int = 4  # lossless: tokens drafted at most per verification pass
    request_timeout_s: float = 60.0
    api_key: Optional[str] = None  # Bearer token required when set (or env GREENCODE_API_KEY)
    # codexglue: editor code -> the space-joined CodeXGLUE token text the models are trained on
    # (data.language, data.literal_mode), and <EOL> -> newline in the answer; raw: text as sent
    prompt_format: str = field(default="codexglue", metadata=_choices("codexglue", "raw"))
    # fill in the middle, for models whose tokenizer has the sentinels: the order of the prompt (data/fim.py);
    # spm (suffix first, the middle continuing the prefix) is what the embedded default fills in best
    fim_layout: str = field(default="spm", metadata=_choices("spm", "psm"))

    def validate(self, path: str) -> None:
        _check_range(f"{path}.port", self.port, 0, 65535)
        _check_range(f"{path}.default_threshold", self.default_threshold, 0.0, 1.0)
        info = _controller_registry().get_controller(self.controller, f"{path}.controller")
        if info.param == "layer":
            raise ConfigError(f"{path}.controller={self.controller!r} takes a layer, not a threshold; serve a "
                              "controller with a threshold (or none)")
        _check_range(f"{path}.max_new_tokens_cap", self.max_new_tokens_cap, 1, None)
        _check_range(f"{path}.queue_size", self.queue_size, 1, None)
        _check_range(f"{path}.max_queued_tokens", self.max_queued_tokens, 1, None)
        _check_range(f"{path}.admission_margin", self.admission_margin, 1.0, None)
        _check_range(f"{path}.max_batch_size", self.max_batch_size, 1, 1024)
        _check_range(f"{path}.max_prefill_tokens", self.max_prefill_tokens, 1, None)
        _check_range(f"{path}.lossless_k_max", self.lossless_k_max, 1, 64)
        _check_range(f"{path}.default_max_new_tokens", self.default_max_new_tokens, 1, None)
        _check_range(f"{path}.max_request_bytes", self.max_request_bytes, 1024, None)
        _check_range(f"{path}.request_timeout_s", self.request_timeout_s, 0.0, None, low_open=True)


FIGURE_FORMATS = ("png", "pdf", "svg")


@dataclass
class FiguresConfig:
    # the files each figure is written as (the pipeline's figures stage, scripts/plot.py --config): png, pdf,
    # svg; each format is a full draw of the figure, so one format takes about half the time of two
    formats: list[str] = field(default_factory=lambda: ["png", "pdf"])
    dpi: int = 150  # raster resolution (png)

    def validate(self, path: str) -> None:
        allowed = FIGURE_FORMATS
        if not self.formats:
            raise ConfigError(f"{path}.formats is empty; give one or more of: {', '.join(allowed)}")
        bad = [f for f in self.formats if f not in allowed]
        if bad:
            raise ConfigError(f"{path}.formats has {', '.join(map(repr, bad))}; choose from: {', '.join(allowed)}")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"{path}.formats={self.formats!r} names a format twice")
        _check_range(f"{path}.dpi", self.dpi, 10, 1200)


@dataclass
class Config:
    name: str = "default"
    seed: int = 1234
    run_dir: Optional[str] = None  # null = runs/<name>
    results_dir: Optional[str] = None  # null = results/<name>
    figures_dir: Optional[str] = None  # null = figures/<name>
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    source_path: Optional[str] = field(default=None, metadata={"internal": True})

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir or f"runs/{self.name}"
        self.results_dir = self.results_dir or f"results/{self.name}"
        self.figures_dir = self.figures_dir or f"figures/{self.name}"
        # a model or tokenizer shipped in the repository (assets/...) is found from any working directory
        self.model.base = _repo_path(self.model.base)
        self.tokenizer.path = _repo_path(self.tokenizer.path)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_path", None)
        return d

    def section_dict(self, *names: str) -> dict:
        """The named sections as a plain dict (used to key cached stage outputs)."""
        d = self.to_dict()
        return {n: d[n] for n in names}


def _repo_path(p: Optional[str]) -> Optional[str]:
    """A relative path that exists under the repository root, made absolute; anything else
    (a hub id, an absolute path, a path relative to the working directory) unchanged."""
    if not p or Path(p).is_absolute() or Path(p).exists():
        return p
    root = Path(__file__).resolve().parents[2]
    return str(root / p) if (root / p).exists() else p


# --------------------------------------------------------------------------- loading
def _check_range(key: str, value: Any, low: Optional[float], high: Optional[float], low_open: bool = False) -> None:
    bad = (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high)
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{key}={value!r} is out of range; allowed {'(' if low_open else '['}{lo}, {hi}]")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list of {_type_name(item_tp)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {_coerce(k, key_tp, key): _coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} Allowed keys here: {', '.join(fields)}")
        f = fields[key]
        choices = f.metadata.get("choices")
        if isinstance(value, bool) and choices:
            # YAML 1.1 reads off / no / false (on / yes / true) as booleans: give back the word the choices use
            words = ("off", "no", "false") if not value else ("on", "yes", "true")
            word = next((w for w in words if w in choices), None)
            if word is None:
                raise ConfigError(f"{full}={value!r} (YAML reads {'/'.join(words)} as a boolean) is not allowed; "
                                  f"choose one of: {', '.join(choices)}")
            value = word
        v = _coerce(value, hints[key], full)
        if choices and v not in choices:
            raise ConfigError(f"{full}={v!r} is not allowed; choose one of: {', '.join(choices)}")
        kwargs[key] = v
    obj = cls(**kwargs)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _validate(v, f"{prefix}.{f.name}" if prefix else f.name)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.subkey=value (e.g. model.num_layers=4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(base: dict, path: list[str], value: Any) -> None:
    d = base
    for p in path[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[path[-1]] = value


def config_from_dict(data: dict, overrides: Optional[list[str]] = None) -> Config:
    data = dict(data or {})
    for item in overrides or []:
        path, value = parse_override(item)
        _merge(data, path, value)
    cfg = _build(Config, data, "")
    _validate(cfg, "")
    return cfg


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config, apply dotted ``key=value`` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass one of the files in configs/ "
                          "(e.g. --config configs/default.yaml)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                          f"offset {e.start}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    cfg = config_from_dict(data, overrides)
    cfg.source_path = str(p)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
