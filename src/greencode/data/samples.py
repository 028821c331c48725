"""Completion samples, the paper's protocol (Section VI) and CodeXGLUE line-level.

``mode="token"`` (the paper): the record's CodeXGLUE tokens without ``<s>``/``</s>``;
context = the first ``context_fraction`` of them joined with spaces, tokenized with the
model tokenizer (bos + text, left-truncated to ``max_context_tokens``); reference = the
next ``max_new_tokens`` model tokens of the ground truth (the rest of the record, joined
with spaces, with the space that separates it from the context). A record whose rest
gives fewer than ``max_new_tokens`` model tokens is skipped.

``mode="line"`` (CodeXGLUE line-level): the first line that starts at or after the
context fraction and has at least two tokens; the context ends one or more tokens into it
(seeded per record) and the reference is the rest of that line (exact match / edit
similarity). Lines end at ``<EOL>`` for Python (the ``<EOL>`` is not part of the
reference) and after ``;``, ``{`` or ``}`` for Java (that token is). The reference is not
cut at ``max_new_tokens``.

``reference_text == tokenizer.decode(reference_ids)`` (it starts with the separating
space); decode predictions the same way and compare stripped texts.

Source records (``data.literal_mode=source``, ``sep=""``): the tokens are pieces of the file
as written, each with the whitespace before it, so context and reference are the file's own
text cut at a token boundary (no separating space is added), and a Python line ends at a
piece that ends with a newline.
Records are visited in a seeded random order, so the same seed gives the same samples.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from greencode.data import lexers
from greencode.data.corpus import load_corpus, text_sep
from greencode.data.tokenizer import encode_context

log = logging.getLogger(__name__)

JAVA_LINE_ENDS = frozenset({";", "{", "}"})
MODES = ("token", "line")


@dataclass
class Sample:
    id: str
    context_ids: list[int]
    context_text: str
    reference_ids: list[int]
    reference_text: str
    language: str
    mode: str = "token"
    path: str = ""
    record_index: int = -1
    context_tokens_dropped: int = 0  # model tokens cut from the left by max_context_tokens
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _body(code: list[str]) -> list[str]:
    if code and code[0] == lexers.BOS:
        code = code[1:]
    if code and code[-1] == lexers.EOS:
        code = code[:-1]
    return list(code)


def _encode_plain(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _context(tokenizer, tokens: list[str], max_context_tokens: int, sep: str = " ") -> tuple[list[int], str, int]:
    text = sep.join(tokens)
    ids = encode_context(tokenizer, text)
    head = 1 if tokenizer.bos_token_id is not None else 0
    dropped = max(0, len(ids) - max_context_tokens)
    if dropped:  # left-truncate, keeping the bos (same as encode_context(..., max_context_tokens))
        ids = ids[:head] + ids[head + dropped:]
        text = _decode(tokenizer, ids[head:])
    return ids, text, dropped


def _reference_ids(tokenizer, rest: list[str], n: int, sep: str = " ") -> list[int]:
    """The first ``n`` model tokens of ``sep + sep.join(rest)``, tokenizing only a window
    of words (the pre-tokenizer splits at spaces, so the window does not change them; for
    source pieces, whose whitespace can merge across the window's end, a margin of 4 tokens
    is kept beyond the ``n`` used)."""
    window, margin = n + 2, (1 if sep else 4)
    while True:
        ids = _encode_plain(tokenizer, sep + sep.join(rest[:window]))
        if len(ids) >= n + margin or window >= len(rest):
            return ids[:n]
        window *= 2


def _line_spans(body: list[str], language: str, sep: str = " ") -> list[tuple[int, int]]:
    """[start, end) of each line's tokens (python: without the <EOL> or newline piece; java:
    with the closing ; { or })."""
    spans, start = [], 0
    for i, t in enumerate(body):
        if language == "python" and (t == lexers.EOL if sep else t.endswith("\n")):
            spans.append((start, i))
            start = i + 1
        elif language != "python" and (t if sep else t.strip()) in JAVA_LINE_ENDS:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(body):
        spans.append((start, len(body)))
    return spans


def _token_sample(tokenizer, body, *, context_fraction, max_context_tokens, max_new_tokens, sep=" "):
    if len(body) < 2:
        return None
    n = min(max(1, int(len(body) * context_fraction)), len(body) - 1)
    ref_ids = _reference_ids(tokenizer, body[n:], max_new_tokens, sep)
    if len(ref_ids) < max_new_tokens:
        return None
    ctx_ids, ctx_text, dropped = _context(tokenizer, body[:n], max_context_tokens, sep)
    return ctx_ids, ctx_text, ref_ids, dropped, {"context_code_tokens": n}


def _line_sample(tokenizer, body, language, rng, *, context_fraction, max_context_tokens, sep=" "):
    n = int(len(body) * context_fraction)
    for start, end in _line_spans(body, language, sep):
        if start < n or end - start < 2:
            continue
        k = rng.randint(1, end - start - 1)  # tokens of the line already typed
        ref_tokens = body[start + k:end]
        ref_ids = _encode_plain(tokenizer, sep + sep.join(ref_tokens))
        ctx_ids, ctx_text, dropped = _context(tokenizer, body[:start + k], max_context_tokens, sep)
        return ctx_ids, ctx_text, ref_ids, dropped, {"line_start": start, "typed_tokens": k,
                                                     "reference_code_tokens": ref_tokens}
    return None


def make_samples(split_dataset, tokenizer, *, num_samples: int, seed: int, context_fraction: float = 0.2,
                 max_context_tokens: int = 512, max_new_tokens: int = 15, mode: str = "token",
                 language: Optional[str] = None, sep: str = " ", offset: int = 0) -> list[Sample]:
    """Up to ``num_samples`` samples from ``split_dataset`` (records with ``code``);
    ``sep`` joins a record's tokens (``text_sep(cfg)``: ``""`` for source pieces). ``offset``
    skips the first ``offset`` samples of the seeded order, so slices ``[0, a)`` and
    ``[a, a + n)`` of one split (knob tuning, calibration) share no sample."""
    if offset < 0:
        raise ValueError(f"offset={offset} must be >= 0")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if not 0.0 < context_fraction < 1.0:
        raise ValueError(f"context_fraction={context_fraction} must be in (0, 1)")
    if num_samples < 1 or max_new_tokens < 1 or max_context_tokens < 2:
        raise ValueError("num_samples and max_new_tokens must be >= 1 and max_context_tokens >= 2")
    order = list(range(len(split_dataset)))
    random.Random(seed).shuffle(order)
    samples: list[Sample] = []
    skipped = 0
    to_skip = offset
    for idx in order:
        if len(samples) >= num_samples:
            break
        rec = split_dataset[idx]
        lang = rec.get("language") or language or "unknown"
        body = _body(rec["code"])
        rid = str(rec.get("id", idx))
        if mode == "token":
            got = _token_sample(tokenizer, body, context_fraction=context_fraction,
                                max_context_tokens=max_context_tokens, max_new_tokens=max_new_tokens, sep=sep)
        else:
            rng = random.Random(f"{seed}:{rid}")
            got = _line_sample(tokenizer, body, lang, rng, context_fraction=context_fraction,
                               max_context_tokens=max_context_tokens, sep=sep)
        if got is None:
            skipped += 1
            continue
        if to_skip > 0:
            to_skip -= 1
            continue
        ctx_ids, ctx_text, ref_ids, dropped, extra = got
        samples.append(Sample(id=f"{rid}:{mode}", context_ids=ctx_ids, context_text=ctx_text, reference_ids=ref_ids,
                              reference_text=_decode(tokenizer, ref_ids), language=lang, mode=mode,
                              path=str(rec.get("path", "")), record_index=idx, context_tokens_dropped=dropped,
                              extra=extra))
    if len(samples) < num_samples:
        log.warning("only %d of the %d requested %s samples: %d records in the split, %d too short for a sample",
                    len(samples), num_samples, mode, len(split_dataset), skipped)
    else:
        log.info("%d %s samples (seed %d, %d records skipped as too short)", len(samples), mode, seed, skipped)
    return samples


def samples_for_config(cfg, tokenizer) -> list[Sample]:
    """``make_samples`` on ``cfg.eval.split`` of the run's corpus with ``cfg.eval``."""
    e = cfg.eval
    split = load_corpus(cfg)[e.split]
    return make_samples(split, tokenizer, num_samples=e.num_samples, seed=e.sample_seed,
                        context_fraction=e.context_fraction, max_context_tokens=e.max_context_tokens,
                        max_new_tokens=e.max_new_tokens, mode=e.mode, language=cfg.data.language,
                        sep=text_sep(cfg), offset=e.sample_offset)
