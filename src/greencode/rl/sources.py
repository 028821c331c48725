"""Where a trajectory bank's sequences come from and how they are decoded: the corpus split (or the tuning
slice's files), each sequence's prompt (:func:`context_ids`, built like the evaluator's samples) and its
behaviour controller (:func:`behaviour_specs`, :func:`make_behaviour`). Shared by the decoded bank
(:mod:`greencode.rl.build`) and the simulated one (:mod:`greencode.rl.simulate`), which both import it."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from greencode.data import encode_context, load_corpus, load_tokenizer
from greencode.data.corpus import text_sep
from greencode.data.samples import make_samples
from greencode.decoding import NeverExit, RandomExit
from greencode.paths import RunPaths
from greencode.rl.policy import load_policy, policy_controller


def split_records(dataset: Any, split: str) -> Sequence:
    if hasattr(dataset, "keys") and callable(dataset.keys) and split in dataset.keys():
        return dataset[split]
    if hasattr(dataset, "keys") and callable(dataset.keys) and "code" not in dataset.keys():
        raise ValueError(f"the corpus has no split {split!r} (has {list(dataset.keys())}); "
                         "set rl.bank.split to one of them")
    return dataset


def code_tokens(record: Any) -> list[str]:
    """The CodeXGLUE tokens of a record without ``<s>`` / ``</s>`` (a plain string: its
    space-separated words)."""
    if isinstance(record, str):
        return record.split()
    code = list(record["code"])
    if code and code[0] == "<s>":
        code = code[1:]
    if code and code[-1] == "</s>":
        code = code[:-1]
    return code


def context_ids(tokenizer, record: Any, fraction: float, max_context_tokens: int, sep: str = " ") -> Optional[list[int]]:
    """The prompt for one bank sequence, built like the evaluator's samples: the first
    ``int(fraction * n)`` CodeXGLUE tokens of the record joined by spaces, encoded by
    :func:`greencode.data.encode_context` (bos + text, left-truncated to
    ``max_context_tokens``). None when the record has fewer than 2 tokens."""
    body = code_tokens(record)
    if len(body) < 2:
        return None
    n = min(max(1, int(len(body) * fraction)), len(body) - 1)
    return encode_context(tokenizer, sep.join(body[:n]), max_context_tokens)


def load_data(cfg, tokenizer, dataset):
    finetuned = RunPaths.from_config(cfg).finetuned
    if tokenizer is None:
        if (finetuned / "tokenizer_config.json").is_file() or (finetuned / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(finetuned)
        else:
            tokenizer = load_tokenizer(cfg)
    if dataset is None:
        dataset = load_corpus(cfg)
    if cfg.rl.bank.split == "tuning":
        return tokenizer, tuning_records(cfg, tokenizer, dataset)
    return tokenizer, split_records(dataset, cfg.rl.bank.split)


def tuning_records(cfg, tokenizer, dataset) -> Sequence:
    """The validation files of the tuning slice: the records of the first ``calibration.sample_offset`` samples
    of the seeded validation order (``eval.sample_seed`` and the evaluation's sample settings, as knob tuning
    draws them). Calibration starts after them, so a bank of these files never touches a calibration file."""
    n = int(cfg.calibration.sample_offset)
    if n < 1:
        raise ValueError("rl.bank.split=tuning needs a tuning slice: calibration.sample_offset >= 1 (its size)")
    val = split_records(dataset, "validation")
    e = cfg.eval
    samples = make_samples(val, tokenizer, num_samples=n, seed=e.sample_seed, context_fraction=e.context_fraction,
                           max_context_tokens=e.max_context_tokens, max_new_tokens=e.max_new_tokens, mode=e.mode,
                           language=cfg.data.language, sep=text_sep(cfg), offset=0)
    idx = sorted({s.record_index for s in samples})
    return val.select(idx) if hasattr(val, "select") else [val[i] for i in idx]


def behaviour_specs(cfg, rng: np.random.Generator, n: int) -> list[dict]:
    """One behaviour per bank sequence (``rl.bank.behaviour``), as a plain spec (picklable, so a
    sequence decodes the same in any process): the full model, random exits at a per-sequence
    rate drawn from ``rl.bank.exit_rate``, or the exported policy at a per-sequence threshold
    drawn from ``rl.bank.policy_thresholds``."""
    bc = cfg.rl.bank
    if bc.behaviour == "full":
        return [{"kind": "full"} for _ in range(n)]
    if bc.behaviour == "random":
        lo, hi = bc.exit_rate
        return [{"kind": "random", "rate": float(rng.uniform(lo, hi)), "seed": int(rng.integers(1 << 31))}
                for _ in range(n)]
    return [{"kind": "policy", "threshold": float(rng.choice(bc.policy_thresholds))} for _ in range(n)]


def make_behaviour(spec: dict, cfg, model, policy=None):
    """The controller of a behaviour spec (``policy``: the loaded behaviour policy, if any)."""
    if spec["kind"] == "full":
        return NeverExit()
    if spec["kind"] == "random":
        return RandomExit(spec["rate"], seed=spec["seed"])

    policy = policy if policy is not None else load_policy(cfg.rl.bank.policy_path, model)
    return policy_controller(policy, model, spec["threshold"], cfg.decoding.policy_temperature)
