"""The model tokenizer.

Embedded default (``tokenizer.path`` null): a byte-level BPE trained with ``tokenizers``
on the corpus's training split, saved so ``AutoTokenizer.from_pretrained(dir)`` loads it.
``<s>`` (bos, id 0), ``<pad>`` (1), ``</s>`` (eos, 2) and ``<unk>`` (3) are special
tokens; ``<EOL>``, ``<STR_LIT>``, ``<NUM_LIT>`` and ``<CHAR_LIT>`` (ids 4-7) are single,
non-special tokens, so they survive ``decode(..., skip_special_tokens=True)``. Encoding
adds nothing (GPT-2 style) and ``decode(encode(text)) == text`` for the space-joined
CodeXGLUE text.

Paper configs (``tokenizer.path`` set): the model's own tokenizer, loaded and copied
into the run folder unchanged (a pad token is set to eos when it has none).

How a model sees text (the same everywhere): ``encode_record`` = bos + text + eos for
training, ``encode_context`` = bos + text (left-truncated) for prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from greencode.data import lexers
from greencode.data.corpus import _swap_in, code_text, load_corpus, text_sep
from greencode.data.fim import FIM_TOKENS
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import REPO_ROOT, read_json, write_json

log = logging.getLogger(__name__)

TOKENIZER_FORMAT = 1
TOKENIZER_MANIFEST = "greencode_tokenizer.json"
SPECIAL_TOKENS = [lexers.BOS, lexers.PAD, lexers.EOS, lexers.UNK]
CONTENT_TOKENS = list(lexers.LITERAL_TOKENS)  # <EOL>, <STR_LIT>, <NUM_LIT>, <CHAR_LIT>


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *, length: Optional[int] = None,
              show_progress: bool = False, content_tokens: Sequence[str] = tuple(CONTENT_TOKENS),
              fim_tokens: bool = False):
    """A byte-level BPE over ``texts`` wrapped as a transformers fast tokenizer.

    ``content_tokens``: the CodeXGLUE markers kept as single tokens; ``()`` for source text
    (``data.literal_mode=source``), so such a model cannot produce a placeholder at all.
    ``fim_tokens``: the fill-in-the-middle sentinels appended as special tokens after the trained
    vocabulary (ids ``vocab_size ...``), so every other id equals the tokenizer's without them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    content_tokens = list(content_tokens)
    fixed = SPECIAL_TOKENS + content_tokens
    if vocab_size < 256 + len(fixed):
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is too small for a byte-level BPE; use >= {256 + len(fixed)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=fixed,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    # the CodeXGLUE markers are content, not control tokens: mark them non-special
    if content_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in content_tokens])
    if fim_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=lexers.BOS, eos_token=lexers.EOS,
                                   pad_token=lexers.PAD, unk_token=lexers.UNK, clean_up_tokenization_spaces=False)


def ensure_special_tokens(tokenizer):
    """A pad token (eos when the tokenizer has none) so batching works."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def encode_context(tokenizer, text: str, max_tokens: Optional[int] = None) -> list[int]:
    """Prompt ids: bos (when the tokenizer has one) + ``text``, left-truncated to
    ``max_tokens`` in total (the bos is kept)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    if max_tokens is not None:
        if max_tokens < len(head) + 1:
            raise ValueError(f"max_tokens={max_tokens} leaves no room for text after the bos token")
        keep = max_tokens - len(head)
        if len(ids) > keep:
            ids = ids[len(ids) - keep:]
    return head + ids


def encode_record(tokenizer, record_or_tokens: Union[Mapping[str, Any], Sequence[str]], sep: str = " ") -> list[int]:
    """Training ids of a record: bos + ``code_text(record, sep)`` + eos."""
    ids = tokenizer(code_text(record_or_tokens, sep), add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])


# --------------------------------------------------------------------------- prepare / load
def _settings(cfg) -> dict:
    """The tokenizer section as fingerprinted; ``fim_tokens`` only when on, so the tokenizers built
    before the option existed keep their fingerprint."""
    t = cfg.section_dict("tokenizer")["tokenizer"]
    if not t.get("fim_tokens"):
        t.pop("fim_tokens", None)
    return t


def _dir_content_hash(path: str) -> Optional[str]:
    """sha256 over a local tokenizer directory's tokenizer files; None for a hub id."""
    d = Path(path).expanduser()
    if not d.is_dir() and not d.is_absolute():
        d = REPO_ROOT / path
    if not d.is_dir():
        return None
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model"):
        f = d / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _fingerprint(cfg, corpus_content_hash: Optional[str]) -> str:
    t = _settings(cfg)
    if cfg.tokenizer.path:
        key: dict[str, Any] = {"format": TOKENIZER_FORMAT, "path": cfg.tokenizer.path}
        content = _dir_content_hash(cfg.tokenizer.path)
        if content is not None:  # a local directory: a new tokenizer there (a reshipped base) is a new tokenizer
            key["content"] = content
    else:
        key = {"format": TOKENIZER_FORMAT, "tokenizer": t, "corpus": corpus_content_hash, "seed": cfg.seed}
        if cfg.data.source == "local" and cfg.data.literal_mode == lexers.SOURCE_MODE:
            key["content_tokens"] = []  # source text: no CodeXGLUE markers in the vocabulary
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_manifest(tok_dir: Path) -> Optional[dict]:
    p = tok_dir / TOKENIZER_MANIFEST
    try:
        return read_json(p) if p.is_file() else None
    except (OSError, ValueError):
        return None


def training_texts(train_split, max_chars: int, seed: int, sep: str = " ") -> list[str]:
    """``code_text`` of train records in a seeded order until ``max_chars`` characters."""
    order = list(range(len(train_split)))
    random.Random(seed).shuffle(order)
    texts, total = [], 0
    for i in order:
        t = code_text(train_split[i]["code"], sep)
        if total + len(t) > max_chars:
            if not texts:
                texts.append(t[:max_chars])
                total += min(len(t), max_chars)
            break
        texts.append(t)
        total += len(t)
    return texts


def _load_pretrained(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, connection errors
        raise FileNotFoundError(
            f"cannot load the tokenizer tokenizer.path={path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "give a local tokenizer directory or a hub id that is reachable or already in the HF cache "
            "(set HF_HUB_OFFLINE=1 to use the cache), or set tokenizer.path=null to train a BPE on the corpus") from e


def prepare_tokenizer(cfg, corpus_manifest: Optional[Mapping[str, Any]] = None, *, force: bool = False) -> Path:
    """Train (or copy, with ``tokenizer.path``) the tokenizer into ``runs/<name>/tokenizer``;
    reused when the tokenizer settings and the corpus content are unchanged."""
    paths = RunPaths.from_config(cfg)
    tok_dir = paths.tokenizer
    content_hash = (corpus_manifest or {}).get("content_hash")
    fp = _fingerprint(cfg, content_hash)
    old = _read_manifest(tok_dir)
    if not force and old is not None and old.get("fingerprint") == fp and (tok_dir / "tokenizer_config.json").is_file():
        log.info("tokenizer: reusing %s", tok_dir)
        return tok_dir

    t0 = time.perf_counter()
    info: dict[str, Any] = {"format": TOKENIZER_FORMAT, "fingerprint": fp,
                            "tokenizer": _settings(cfg), "corpus_content_hash": content_hash}
    if cfg.tokenizer.path:
        tok = ensure_special_tokens(_load_pretrained(cfg.tokenizer.path))
        info["kind"] = "pretrained"
        info["source"] = cfg.tokenizer.path
    else:
        train = load_corpus(cfg)["train"]
        if len(train) == 0:
            raise ValueError("the corpus has no train records to train a tokenizer on; enlarge the corpus "
                             "(data.max_files, data.min_file_tokens)")

        texts = training_texts(train, cfg.tokenizer.max_train_chars, cfg.seed, text_sep(cfg))
        source = cfg.data.source == "local" and cfg.data.literal_mode == lexers.SOURCE_MODE
        tok = train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, length=len(texts),
                        show_progress=sys.stderr.isatty(), content_tokens=() if source else CONTENT_TOKENS,
                        fim_tokens=cfg.tokenizer.fim_tokens)
        info.update(kind="bpe", train_records=len(texts), train_chars=sum(len(t) for t in texts))
    info["vocab_size"] = len(tok)
    info["special_token_ids"] = {n: tok.convert_tokens_to_ids(t) for n, t in
                                 (("bos", tok.bos_token), ("eos", tok.eos_token), ("pad", tok.pad_token))
                                 if t is not None}
    info["time_s"] = round(time.perf_counter() - t0, 3)
    info["run"] = run_metadata(cfg, stage="tokenizer")
    info["run"].pop("config", None)

    tok_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tok_dir.with_name(f".{tok_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_pretrained(str(tmp))
        write_json(tmp / TOKENIZER_MANIFEST, info)
        _swap_in(tmp, tok_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenizer: %s%s -> %s | vocab %d | %.1f s", info["kind"], f" {info['source']}" if "source" in info else "", tok_dir,
             info["vocab_size"], info["time_s"])
    return tok_dir


def load_tokenizer(cfg):
    """The run's tokenizer (``runs/<name>/tokenizer``), else ``tokenizer.path``; with pad set."""
    from transformers import AutoTokenizer

    tok_dir = RunPaths.from_config(cfg).tokenizer
    manifest = _read_manifest(tok_dir)
    saved = (tok_dir / "tokenizer_config.json").is_file()
    if saved and manifest is not None and cfg.tokenizer.path and manifest.get("source") != cfg.tokenizer.path:
        log.warning("%s holds the tokenizer of %r but tokenizer.path=%r; loading the latter", tok_dir,
                    manifest.get("source"), cfg.tokenizer.path)
        saved = False
    if saved:
        if manifest is not None and manifest.get("tokenizer") != _settings(cfg):
            log.warning("the tokenizer at %s was built with %s, the config now says %s; rebuild it with "
                        "scripts/prepare_data.py", tok_dir, manifest.get("tokenizer"), _settings(cfg))
        return ensure_special_tokens(AutoTokenizer.from_pretrained(str(tok_dir)))
    if cfg.tokenizer.path:
        return ensure_special_tokens(_load_pretrained(cfg.tokenizer.path))
    raise FileNotFoundError(f"no tokenizer at {tok_dir}; build it with `python scripts/prepare_data.py --config "
                            "<your config>` (or greencode.data.prepare_data(cfg))")
