"""``prepare_data(cfg)``: the corpus and the tokenizer of a config, reused when unchanged."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from greencode.data.corpus import prepare_corpus
from greencode.data.tokenizer import prepare_tokenizer

log = logging.getLogger(__name__)


def prepare_data(cfg, *, force: bool = False, progress: Optional[bool] = None) -> tuple[Path, Path]:
    """Build (or reuse) ``runs/<name>/corpus`` and ``runs/<name>/tokenizer``.

    The corpus is reused when a hash of the data settings and of the source files (their
    list and contents) matches its manifest; the tokenizer when a hash of the tokenizer
    settings and of the corpus content matches. ``force`` rebuilds both.
    """
    t0 = time.perf_counter()
    corpus_dir, manifest = prepare_corpus(cfg, force=force, progress=progress)
    tok_dir = prepare_tokenizer(cfg, manifest, force=force)
    sp = manifest["splits"]
    log.info("data ready in %.1f s: corpus %s (%s/%s/%s records, %d tokens), tokenizer %s",
             time.perf_counter() - t0, corpus_dir, sp["train"]["records"], sp["validation"]["records"],
             sp["test"]["records"], manifest["tokens_total"], tok_dir)
    return corpus_dir, tok_dir
