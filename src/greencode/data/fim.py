"""Fill-in-the-middle (FIM): the training transformation and the inference prompt.

Training (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle";
StarCoder's recipe, applied per packed chunk, "context-level"): a chunk is cut at two uniformly
random token positions into prefix P, middle M and suffix S and becomes

    PSM: <fim_prefix> P <fim_suffix> S <fim_middle> M <eos>
    SPM: <fim_prefix> <fim_suffix> S <fim_middle> P M <eos>       (StarCoder's SPM variant)

The chunk gives up its last four tokens for the sentinels and the ``<eos>``, so every chunk keeps
its length; the ``<eos>`` teaches the model where a middle ends (it meets the suffix). The loss runs
over every position, as in StarCoder.

Inference: :func:`fim_prompt`, by default in SPM order, ``<fim_prefix> <fim_suffix> suffix
<fim_middle> <bos> prefix`` (the middle continues the prefix; the ``<bos>`` marks a file's start, as
in left-to-right prompts), or in PSM order, ``<fim_prefix> <bos> prefix <fim_suffix> suffix
<fim_middle>``; the prefix cut from the left and the suffix from the right to fit the context. The
embedded default, trained on both orders (9.0M tokens), fills in the middle usefully only in SPM
order: in PSM order its lines are worse than with no suffix at all (results/default/infill,
``full_psm``; results/LOG.md 2026-12-06). Cuts fall on token boundaries in training;
at inference the prefix and the suffix are tokenized apart, so the cursor is a token boundary too.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
OVERHEAD = 4  # three sentinels and the <eos> that ends the middle
LAYOUTS = ("spm", "psm")


def sentinel_ids(tokenizer) -> Optional[tuple[int, int, int]]:
    """(prefix, middle, suffix) ids when the tokenizer knows FIM (StarCoder's sentinels, each a
    single special token), else None: the model was not trained to fill in the middle."""
    vocab = tokenizer.get_vocab()
    ids = tuple(vocab.get(t) for t in FIM_TOKENS)
    if any(i is None for i in ids):
        return None
    return ids  # type: ignore[return-value]


def require_sentinels(tokenizer, what: str) -> tuple[int, int, int]:
    ids = sentinel_ids(tokenizer)
    if ids is None:
        raise ValueError(f"{what} needs a tokenizer with the FIM sentinels {', '.join(FIM_TOKENS)}; set "
                         "tokenizer.fim_tokens=true (embedded default, a BPE trained here) or turn FIM off "
                         "(fim.rate=0)")
    return ids


def fim_transform(ids: Sequence[int], rng: random.Random, *, sentinels: tuple[int, int, int], eos: int,
                  spm_rate: float = 0.0) -> list[int]:
    """One FIM example of the same length as ``ids`` (its last :data:`OVERHEAD` tokens dropped)."""
    if len(ids) <= OVERHEAD + 1:
        raise ValueError(f"a FIM chunk needs more than {OVERHEAD + 1} tokens, got {len(ids)}")
    pre, mid, suf = sentinels
    body = list(ids[:len(ids) - OVERHEAD])
    a, b = sorted(rng.randint(0, len(body)) for _ in range(2))
    p, m, s = body[:a], body[a:b], body[b:]
    if rng.random() < spm_rate:
        return [pre, suf] + s + [mid] + p + m + [eos]
    return [pre] + p + [suf] + s + [mid] + m + [eos]


def layout_ids(sentinels: tuple[int, int, int], prefix_ids: list[int], suffix_ids: list[int],
               layout: str = "spm") -> list[int]:
    """An inference prompt in one of the two trained orders; the model's answer is the middle.

    ``psm``: ``<fim_prefix> P <fim_suffix> S <fim_middle>``; ``spm`` (StarCoder's SPM variant, the
    default): ``<fim_prefix> <fim_suffix> S <fim_middle> P``, the middle continuing the prefix."""
    pre, mid, suf = sentinels
    if layout == "psm":
        return [pre] + prefix_ids + [suf] + suffix_ids + [mid]
    if layout == "spm":
        return [pre, suf] + suffix_ids + [mid] + prefix_ids
    raise ValueError(f"FIM layout {layout!r}; use one of {LAYOUTS}")


def fim_parts(tokenizer, prefix: str, suffix: str, max_tokens: Optional[int] = None,
              suffix_share: float = 0.25) -> tuple[list[int], list[int]]:
    """(bos + prefix ids, suffix ids) that fit ``max_tokens`` with the three sentinels: the suffix keeps
    at most ``suffix_share`` of the room (more when the prefix is short), the prefix the rest, each cut
    away from the cursor."""
    p = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    s = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if max_tokens is not None:
        room = max_tokens - 3 - len(bos)
        if room < 1:
            raise ValueError(f"max_tokens={max_tokens} leaves no room for a fill-in-the-middle prompt")
        s_room = max(int(room * suffix_share), room - len(p))
        s = s[:max(0, min(len(s), s_room))]
        p_room = room - len(s)
        p = p[len(p) - p_room:] if len(p) > p_room else p
    return bos + p, s


def fim_prompt(tokenizer, prefix: str, suffix: str, max_tokens: Optional[int] = None,
               suffix_share: float = 0.25, layout: str = "spm") -> list[int]:
    """The prompt ids for ``prefix``/``suffix`` (:func:`fim_parts`, :func:`layout_ids`)."""
    sentinels = require_sentinels(tokenizer, "a fill-in-the-middle prompt")
    return layout_ids(sentinels, *fim_parts(tokenizer, prefix, suffix, max_tokens, suffix_share), layout)
