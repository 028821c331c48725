"""Accuracy metrics for code completion: CodeBLEU (with its parts), ROUGE-L, BLEU, chrF, EM, edit similarity.

Everything is computed locally by the metric libraries themselves (no hub downloads):

============================  =========  ================================================================
key                           scale      how
============================  =========  ================================================================
``codebleu``                  0-1        ``codebleu.calc_codebleu`` (weights 0.25 each), see the quirk below
``codebleu_ngram``            0-1        its BLEU part (whitespace tokens, NLTK-style smoothing method1)
``codebleu_weighted_ngram``   0-1        its keyword-weighted BLEU part
``codebleu_syntax``           0-1        its tree-sitter AST subtree match
``codebleu_dataflow``         0-1        its data-flow match, as the library returns it (0 when undefined)
``rouge_l``                   0-1        ``rouge_score`` ROUGE-L F-measure, code tokenizer (below)
``bleu``                      0-100      ``sacrebleu`` BLEU, tokenizer 13a; sentence level: exp smoothing,
                                         effective order
``chrf``                      0-100      ``sacrebleu`` chrF (char order 6, beta 2)
``exact_match``               0-1        CodeXGLUE: ``pred.split() == ref.split()`` (share of samples)
``edit_similarity``           0-100      CodeXGLUE: ``fuzz.ratio`` (rapidfuzz) = normalised InDel
                                         similarity ``100 * (1 - indel_distance / (len(p) + len(r)))``,
                                         the value fuzzywuzzy returns with python-Levenshtein (unrounded);
                                         not ``1 - levenshtein / max_len`` and not difflib's ratio
============================  =========  ================================================================

Inputs. Predictions and references are strings, either raw code or CodeXGLUE token format (space-joined
tokens with ``<EOL>``, ``<STR_LIT>``, ``<NUM_LIT>``, ``<CHAR_LIT>`` placeholders, optionally with a kept value
as in ``<STR_LIT:__main__>``). Leading/trailing whitespace is stripped everywhere.

* BLEU, chrF, ROUGE-L, exact match and edit similarity see the (stripped) text as is, placeholders included.
* CodeBLEU parses code with tree-sitter, so it sees the text after :func:`to_code`: ``<s>``/``</s>``/``<pad>``
  are dropped, ``<EOL>`` becomes a newline, ``<STR_LIT>`` -> ``""``, ``<NUM_LIT>`` -> ``0``, ``<CHAR_LIT>`` ->
  ``'c'`` (a kept value is used instead: ``<STR_LIT:x>`` -> ``"x"``, ``<NUM_LIT:1>`` -> ``1``). The token format
  drops Python's indentation; for Python text that came in token format, a line ending in ``:`` indents the
  lines after it by one more level (dedents cannot be recovered, so later lines stay at that depth). Both
  sides get the same treatment, so the syntax and data-flow parts compare like with like. All four CodeBLEU
  parts (its n-gram parts too) are computed on this converted text, so newlines are not n-gram tokens there.
* ROUGE-L uses a case-preserving code tokenizer (identifiers/numbers, single punctuation characters,
  placeholders as one token) instead of rouge-score's default, which lower-cases and drops every
  non-alphanumeric character (so ``) ;`` vs ``) ;`` would score 0).

CodeBLEU's dataflow quirk. ``codebleu`` 0.7.0 combines the parts as ``... + 0.25 * (dataflow or 1)``: a data-flow
score of 0 counts as 1 in the composite. On short snippets the reference usually has no data-flow edges (the
library returns 0 for "undefined"), so the composite gets a free 0.25; a genuinely wrong data flow (score 0)
gets the same bonus. We keep the library's composite (comparable with other work) and report the parts plus
``codebleu_dataflow_counted_as_one`` so readers can see where it happened. For a corpus the flag is one
bool; per sample it is per sample, so its mean is the share of samples affected.

Empty strings (after stripping). Per sample: both empty = identical, every score is perfect (1 or 100, EM 1);
exactly one empty = every score 0 (CodeBLEU and all its parts 0, no dataflow bonus). For a corpus, BLEU, chrF
and CodeBLEU aggregate statistics with the libraries' own corpus formulas over every pair except the
empty-vs-empty ones (those carry nothing to count); an empty prediction against a non-empty reference counts
as a miss there. Degenerate corpora follow the per-sample rule: all pairs empty-vs-empty -> perfect; no
non-empty prediction at all -> 0. ROUGE-L, EM and edit similarity are means of the per-sample values.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Sequence

log = logging.getLogger(__name__)

SUPPORTED_LANGUAGES = ("python", "java")

SCALES: dict[str, str] = {
    "codebleu": "0-1",
    "codebleu_ngram": "0-1",
    "codebleu_weighted_ngram": "0-1",
    "codebleu_syntax": "0-1",
    "codebleu_dataflow": "0-1",
    "rouge_l": "0-1",
    "bleu": "0-100",
    "chrf": "0-100",
    "exact_match": "0-1",
    "edit_similarity": "0-100",
}

_CODEBLEU_KEYS = {
    "codebleu": "codebleu",
    "codebleu_ngram": "ngram_match_score",
    "codebleu_weighted_ngram": "weighted_ngram_match_score",
    "codebleu_syntax": "syntax_match_score",
    "codebleu_dataflow": "dataflow_match_score",
}

# ---------------------------------------------------------------------------------------------------------------
# input handling


def check_language(language: str) -> str:
    """Normalise a language name; unknown names raise ``ValueError`` listing the supported ones."""
    lang = str(language).strip().lower()
    if lang not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"language {language!r} is not supported by the metrics: CodeBLEU needs a tree-sitter grammar and "
            f"only these are installed and wired up: {', '.join(SUPPORTED_LANGUAGES)}; "
            "set data.language to one of them")
    return lang


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("compute_metrics takes lists of strings, got a single string; "
                         "wrap it in a list or use sample_metrics for one pair")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "they must pair up one to one")
    if len(predictions) == 0:
        raise ValueError("no samples: predictions and references are empty lists")
    for name, seq in (("predictions", predictions), ("references", references)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise ValueError(f"{name}[{i}] is a {type(s).__name__}, not a str; pass decoded text")


_PLACEHOLDER = re.compile(r"<(STR|NUM|CHAR)_LIT(?::((?:[^>\\]|\\.)*))?>")
_SPECIALS = re.compile(r"</?s>|<pad>")
_EOL = re.compile(r"\s*<EOL>\s*")
_NUMBER = re.compile(r"[0-9][0-9a-fA-FxXoObB_.lLjJ]*(?:[eE][+-]?[0-9]+)?[lLjJfFdD]?")


def _literal(kind: str, value: str | None) -> str:
    if kind == "NUM":
        return value if value and _NUMBER.fullmatch(value) else "0"
    if kind == "CHAR":
        v = value if value and len(value) == 1 and value not in "'\\" else "c"
        return f"'{v}'"
    v = (value or "").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{v}"'


def _reindent_python(lines: list[str]) -> list[str]:
    out, depth = [], 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        out.append("    " * depth + line)
        if line.endswith(":"):
            depth += 1
    return out


def to_code(text: str, language: str) -> str:
    """CodeXGLUE token format -> parseable code for CodeBLEU (raw code passes through, stripped).

    See the module docstring for the exact rules.
    """
    lang = check_language(language)
    token_format = "<EOL>" in text
    code = _SPECIALS.sub(" ", text)
    code = _PLACEHOLDER.sub(lambda m: _literal(m.group(1), m.group(2)), code)
    if token_format:
        lines = _EOL.split(code)
        if lang == "python":
            lines = _reindent_python(lines)
        else:
            lines = [line.strip() for line in lines if line.strip()]
        code = "\n".join(lines)
    return code.strip()


# ---------------------------------------------------------------------------------------------------------------
# individual metrics


@functools.lru_cache(maxsize=None)
def _sacrebleu_metrics():
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU(), BLEU(effective_order=True), CHRF()


class _CodeTokenizer:
    """rouge-score tokenizer for code: placeholders, identifiers/numbers, single punctuation chars; keeps case."""

    _TOKEN = re.compile(r"<[A-Z_]+(?::[^>]*)?>|\w+|[^\w\s]")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text)


@functools.lru_cache(maxsize=None)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_CodeTokenizer())


@functools.lru_cache(maxsize=None)
def _quiet_codebleu() -> None:
    """codebleu's dataflow module calls root ``logging.warning`` (which also runs basicConfig) for every pair
    without reference data flow; route that to a named logger kept at ERROR: we report the case as a flag."""
    from codebleu import dataflow_match

    quiet = logging.getLogger("codebleu.dataflow_match")
    quiet.setLevel(logging.ERROR)
    dataflow_match.logging = quiet  # the module only uses logging.warning


def _codebleu(predictions: list[str], references: list[str], lang: str) -> dict[str, Any]:
    from codebleu import calc_codebleu

    _quiet_codebleu()
    raw = calc_codebleu([to_code(r, lang) for r in references], [to_code(p, lang) for p in predictions], lang)
    out: dict[str, Any] = {k: float(raw[v]) for k, v in _CODEBLEU_KEYS.items()}
    out["codebleu_dataflow_counted_as_one"] = raw["dataflow_match_score"] == 0
    return out


def _rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _edit_similarity(prediction: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return float(fuzz.ratio(prediction, reference))


def line_scores(prediction: str, reference: str) -> tuple[float, float]:
    """(exact match, edit similarity) of one stripped pair: the two line-level scores, without the
    corpus metrics (single-line infilling, the editors' FIM benchmark)."""
    pred, ref = prediction.strip(), reference.strip()
    return _exact_match(pred, ref), _edit_similarity(pred, ref)


def _exact_match(prediction: str, reference: str) -> float:
    return float(prediction.split() == reference.split())


# ---------------------------------------------------------------------------------------------------------------
# boilerplate references: where an exact match carries no signal about completion quality

# phrases of licence and copyright headers (Apache-2.0, MIT, BSD, GPL), matched case-insensitively on any line
_LICENCE_PHRASES = re.compile("|".join(re.escape(p) for p in (
    "licensed under", "spdx-license-identifier", "without warranties", "apache.org/licenses", "licenses/license-",
    "unless required by applicable law", "agreed to in writing", "you may not use this file",
    "obtain a copy of the license", "distributed under the license", "distributed on an \"as is\" basis",
    "limitations under the license", "governing permissions and", "permission is hereby granted",
    "all rights reserved", "gnu general public license", "gnu lesser general public", "free software foundation",
    "this program is free software", "redistribution and use in source and binary forms",
    'the software is provided "as is"', "copyright (c)", "copyright ©", "mit license", "bsd license")), re.IGNORECASE)
# single words that name a licence or copyright: only on a comment line (``class License`` is code)
_LICENCE_WORDS = re.compile(r"\b(?:Licen[cs]e[ds]?|LICEN[CS]E[DS]?|Copyright|COPYRIGHT)\b")
_COMMENT_START = ("#", "//", "/*", "*", "--", ";;", "<!--")
_LINE_BREAK = re.compile(r"<EOL>|\r?\n")

BOILERPLATE_NOTE = ("boilerplate reference: blank or whitespace-only, or licence/copyright header text (every "
                    "non-blank line a comment line or a line with a licence phrase, and at least one licence or "
                    "copyright line: 'Licensed under', 'SPDX-License-Identifier', 'WITHOUT WARRANTIES', "
                    "'http://www.apache.org/licenses', 'Copyright' or 'License' in a comment, ...); "
                    "greencode.eval.metrics.is_boilerplate")


def _licence_line(line: str, comment: bool) -> bool:
    return bool(_LICENCE_PHRASES.search(line)) or (comment and bool(_LICENCE_WORDS.search(line)))


def is_boilerplate(reference: str) -> bool:
    """True when an exact match of ``reference`` says nothing about completion quality: the reference is
    blank (whitespace only) or licence/copyright header text. Header text: every non-blank line is a
    comment line (``#``, ``//``, ``/*``, ``*``, ``--``) or carries a licence phrase, and at least one line is
    a licence or copyright line (a licence phrase anywhere, or the word License/Copyright on a comment line).
    Works on raw code and on CodeXGLUE token text (``<EOL>`` separates lines). One definition for the
    evaluation summary and the infilling slice."""
    lines = [line.strip() for line in _LINE_BREAK.split(reference)]
    lines = [line for line in lines if line]
    if not lines:
        return True
    found = False
    for line in lines:
        comment = line.startswith(_COMMENT_START)
        licence = _licence_line(line, comment)
        if not (comment or licence):
            return False
        found = found or licence
    return found


def exact_match_breakdown(exact: Sequence[float], boilerplate: Sequence[bool]) -> dict[str, Any]:
    """Exact match with the boilerplate separated (per-sample exact matches and :func:`is_boilerplate`
    of each reference, paired): ``exact_match_boilerplate_share`` (share of the matches whose reference
    is boilerplate; None without matches), ``exact_match_no_boilerplate`` (exact match on the samples
    whose reference is not; None when every reference is), ``boilerplate_reference_share`` and
    ``num_samples_no_boilerplate``."""
    if len(exact) != len(boilerplate):
        raise ValueError(f"{len(exact)} exact-match values but {len(boilerplate)} boilerplate flags")
    hits = [bool(b) for e, b in zip(exact, boilerplate) if e]
    rest = [float(e) for e, b in zip(exact, boilerplate) if not b]
    return {"exact_match_boilerplate_share": (sum(hits) / len(hits)) if hits else None,
            "exact_match_no_boilerplate": (sum(rest) / len(rest)) if rest else None,
            "boilerplate_reference_share": (sum(map(bool, boilerplate)) / len(boilerplate)) if boilerplate else None,
            "num_samples_no_boilerplate": len(rest)}


def _edge_case(pred: str, ref: str) -> dict[str, Any] | None:
    """The defined scores when one or both sides are empty; None when both are non-empty."""
    if pred and ref:
        return None
    same = not pred and not ref
    one, hundred = (1.0, 100.0) if same else (0.0, 0.0)
    out: dict[str, Any] = {k: one for k in _CODEBLEU_KEYS}
    out["codebleu_dataflow_counted_as_one"] = False
    out.update(rouge_l=one, bleu=hundred, chrf=hundred, exact_match=one, edit_similarity=hundred)
    return out


# ---------------------------------------------------------------------------------------------------------------
# public API


def sample_metrics(prediction: str, reference: str, language: str) -> dict[str, Any]:
    """Per-sample scores (sentence BLEU, chrF, ROUGE-L, EM, edit similarity, CodeBLEU on this pair).

    Same keys and scales as :func:`compute_metrics` minus ``num_samples``/``scales``; see the module docstring
    for the empty-string definition. About a millisecond per call on CPU.
    """
    lang = check_language(language)
    _check_pairs([prediction], [reference])
    pred, ref = prediction.strip(), reference.strip()
    edge = _edge_case(pred, ref)
    if edge is not None:
        return edge
    _, sentence_bleu, chrf = _sacrebleu_metrics()
    out = _codebleu([pred], [ref], lang)
    out.update(
        rouge_l=_rouge_l(pred, ref),
        bleu=float(sentence_bleu.sentence_score(pred, [ref]).score),
        chrf=float(chrf.sentence_score(pred, [ref]).score),
        exact_match=_exact_match(pred, ref),
        edit_similarity=_edit_similarity(pred, ref),
    )
    return out


def compute_metrics(predictions: list[str], references: list[str], language: str) -> dict[str, Any]:
    """Corpus-level scores over paired predictions/references, with ``num_samples`` and each metric's scale.

    Raises ``ValueError`` for a length mismatch, an empty corpus, non-string items or an unsupported language.
    """
    lang = check_language(language)
    _check_pairs(predictions, references)
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    n = len(preds)
    corpus_bleu, _, chrf = _sacrebleu_metrics()

    per_sample = []
    for p, r in zip(preds, refs):
        edge = _edge_case(p, r)
        per_sample.append(edge if edge is not None else {
            "rouge_l": _rouge_l(p, r), "exact_match": _exact_match(p, r), "edit_similarity": _edit_similarity(p, r)})

    # Pairs with both sides empty are identical but carry nothing to count; leave them out of the library
    # corpus formulas (sacrebleu gives them zero counts anyway; codebleu would count an empty tree match).
    kept = [(p, r) for p, r in zip(preds, refs) if p or r]
    if not kept:  # every pair is empty-vs-empty: identical
        library: dict[str, Any] = _edge_case("", "")  # type: ignore[assignment]
    elif not any(p for p, _ in kept):  # nothing predicted at all: 0, not codebleu's dataflow bonus of 0.25
        library = _edge_case("", "x")  # type: ignore[assignment]
    else:
        kp, kr = [p for p, _ in kept], [r for _, r in kept]
        library = _codebleu(kp, kr, lang)
        library["bleu"] = float(corpus_bleu.corpus_score(kp, [kr]).score)
        library["chrf"] = float(chrf.corpus_score(kp, [kr]).score)

    out: dict[str, Any] = {k: library[k] for k in (*_CODEBLEU_KEYS, "codebleu_dataflow_counted_as_one")}
    out.update(
        rouge_l=sum(s["rouge_l"] for s in per_sample) / n,
        bleu=library["bleu"],
        chrf=library["chrf"],
        exact_match=sum(s["exact_match"] for s in per_sample) / n,
        edit_similarity=sum(s["edit_similarity"] for s in per_sample) / n,
        num_samples=n,
        language=lang,
        scales=dict(SCALES),
    )
    return out
