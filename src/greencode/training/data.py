"""Training data: corpus records -> token ids (bos + text + eos per file) -> packed chunks.

Files are concatenated and cut into ``seq_len``-token chunks (the paper's packing /
chunking to a maximum sequence length), with ``datasets.map(batched=True)``. Every chunk
is full, so no padding or attention mask is needed; ``labels`` equal ``input_ids`` (the
model shifts them).
"""

from __future__ import annotations

import logging
import random
from itertools import chain
from typing import Optional

log = logging.getLogger(__name__)

MAP_BATCH = 256  # files per map batch; each batch drops its last partial chunk


def _select_files(ds, max_tokens: Optional[int], seq_len: int, seed: int, shuffle: bool):
    """A seeded order of the files; with a token cap only as many files as needed.

    A byte-level BPE gives at least one model token per CodeXGLUE token, so files whose
    ``num_tokens`` (or ``len(code)``) add up to the cap plus what packing may drop are enough.
    """
    order = list(range(len(ds)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if max_tokens is None:
        return ds.select(order) if shuffle else ds
    lengths = ds["num_tokens"] if "num_tokens" in ds.column_names else [len(c) for c in ds["code"]]
    need = max_tokens + seq_len * (len(ds) // MAP_BATCH + 2)
    picked, total = [], 0
    for i in order:
        if total >= need:
            break
        picked.append(i)
        total += max(int(lengths[i]) - 2, 1)
    return ds.select(picked)


def pack_split(ds, tokenizer, seq_len: int, *, max_tokens: Optional[int] = None, seed: int = 0,
               shuffle: bool = True, num_proc: Optional[int] = None, desc: str = "packing", sep: str = " ",
               fim=None):
    """Tokenize a corpus split (records with ``code``) and pack it into ``seq_len`` chunks.

    Returns a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (lists of ``seq_len``
    ids), at most ``max_tokens // seq_len`` chunks when ``max_tokens`` is set. With ``fim``
    (a :class:`~greencode.config.FimConfig` with ``rate > 0``) a seeded ``rate`` share of the
    chunks becomes fill-in-the-middle examples (:func:`greencode.data.fim.fim_transform`); which
    ones depends only on ``seed`` and the chunk's place in the packed stream.
    """
    from greencode.data import encode_record
    from greencode.data.fim import fim_transform, require_sentinels

    rate = float(fim.rate) if fim is not None else 0.0
    sentinels = require_sentinels(tokenizer, f"fim.rate={rate}") if rate > 0 else None

    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short for next-token training; use >= 2")
    if len(ds) == 0:
        raise ValueError("the corpus split is empty; enlarge the corpus (data.max_files, data.min_file_tokens) "
                         "or the split fraction")
    files = _select_files(ds, max_tokens, seq_len, seed, shuffle)

    def tokenize_and_chunk(batch, indices):
        ids = list(chain.from_iterable(encode_record(tokenizer, c, sep) for c in batch["code"]))
        n = len(ids) // seq_len * seq_len
        chunks = [ids[i:i + seq_len] for i in range(0, n, seq_len)]
        if rate > 0:
            rng = random.Random(f"fim-{seed}-{indices[0]}")
            chunks = [fim_transform(c, rng, sentinels=sentinels, eos=tokenizer.eos_token_id, spm_rate=fim.spm_rate)
                      if rng.random() < rate else c for c in chunks]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    packed = files.map(tokenize_and_chunk, batched=True, batch_size=MAP_BATCH, remove_columns=files.column_names,
                       num_proc=num_proc, desc=desc, with_indices=True)
    if len(packed) == 0:
        raise ValueError(f"the split holds fewer than seq_len={seq_len} tokens; lower seq_len or enlarge the corpus")
    if max_tokens is not None:
        limit = max(1, max_tokens // seq_len)
        if len(packed) > limit:
            packed = packed.select(range(limit))
        elif len(packed) < limit:
            log.info("%s: only %d chunks of %d tokens available (cap was %d tokens)", desc, len(packed), seq_len,
                     max_tokens)
    return packed.with_format("torch")


def build_datasets(cfg, stage, tokenizer):
    """(train, validation) packed datasets for a training stage (``cfg.pretrain`` or
    ``cfg.finetune``): the train split capped at ``max_train_tokens``, the validation split
    at ``eval_max_tokens``."""
    from greencode.data import load_corpus
    from greencode.data.corpus import text_sep

    dsd = load_corpus(cfg)
    sep = text_sep(cfg)
    for split in ("train", "validation"):
        if split not in dsd:
            raise ValueError(f"the corpus has no {split!r} split; rebuild it with scripts/prepare_data.py")
    # FIM in training only: the validation loss (and the per-exit report on it) stays left-to-right
    train = pack_split(dsd["train"], tokenizer, stage.seq_len, max_tokens=stage.max_train_tokens, seed=cfg.seed,
                       desc="packing train", sep=sep, fim=stage.fim)
    val = pack_split(dsd["validation"], tokenizer, stage.seq_len, max_tokens=stage.eval_max_tokens, seed=cfg.seed,
                     desc="packing validation", sep=sep)
    log.info("data: %d train chunks (%d tokens), %d validation chunks (%d tokens) of %d tokens", len(train),
             len(train) * stage.seq_len, len(val), len(val) * stage.seq_len, stage.seq_len)
    return train, val
