"""The corpus on disk: a ``datasets.DatasetDict`` (train / validation / test) saved with
``save_to_disk`` under ``runs/<name>/corpus`` plus ``manifest.json`` (source, counts,
content hash, input fingerprint, run metadata) and, with kept literals, ``literals.json``.

Record schema: ``id`` (str), ``path`` (str), ``code`` (list[str], CodeXGLUE tokens with
``<s>`` and ``</s>``), ``num_tokens`` (int, tokens without ``<s>``/``</s>``), ``language``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from greencode.data import lexers
from greencode.data.hub import load_hub_corpus
from greencode.data.local import SPLITS, build_local_corpus, corpus_features, list_source_files, resolve_source
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.utils import read_json, write_json

log = logging.getLogger(__name__)

# bump when the token format or record schema changes: built corpora are then rebuilt
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LITERALS = "literals.json"

_LOCAL_KEYS = ("source", "language", "local_path", "literal_mode", "keep_frequent_literals", "validation_fraction",
               "test_fraction", "min_file_tokens", "max_file_tokens", "max_files", "exclude", "syntax_check")
_HUB_KEYS = ("source", "language", "hub_id", "validation_fraction", "max_files")


def text_sep(cfg) -> str:
    """How the run's records join into text: ``""`` for ``data.literal_mode=source`` (a local
    corpus of source pieces), else CodeXGLUE's ``" "``."""
    return lexers.joiner(cfg.data.literal_mode) if cfg.data.source == "local" else " "


def code_text(record_or_tokens: Union[Mapping[str, Any], Sequence[str]], sep: str = " ") -> str:
    """The authors' join: ``" ".join(code[1:-1])`` (the tokens without ``<s>``/``</s>``);
    ``sep=""`` for source pieces (``text_sep(cfg)``)."""
    code = record_or_tokens["code"] if isinstance(record_or_tokens, Mapping) else record_or_tokens
    code = list(code)
    if code and code[0] == lexers.BOS:
        code = code[1:]
    if code and code[-1] == lexers.EOS:
        code = code[:-1]
    return sep.join(code)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_key(cfg) -> dict[str, Any]:
    """The part of ``cfg.data`` that decides the corpus content."""
    d = cfg.section_dict("data")["data"]
    keys = _HUB_KEYS if cfg.data.source == "hub" else _LOCAL_KEYS
    return {k: d[k] for k in keys}


def records_content_hash(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(f"[{split}]".encode())
        for r in splits.get(split, ()):
            h.update(f"{r['id']}\x00{r['path']}\x00".encode("utf-8"))
            h.update("\x1f".join(r["code"]).encode("utf-8", "surrogatepass"))
            h.update(b"\x1e")
    return h.hexdigest()


# --------------------------------------------------------------------------- disk
def read_manifest(corpus_dir: Union[str, Path]) -> dict[str, Any] | None:
    p = Path(corpus_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return read_json(p)
    except (OSError, ValueError):
        return None


def _is_built(corpus_dir: Path) -> bool:
    return (corpus_dir / "dataset_dict.json").is_file() and (corpus_dir / MANIFEST).is_file()


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the fully written ``tmp`` directory."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_corpus(dsd, corpus_dir: Union[str, Path], manifest: dict[str, Any],
                literals: Mapping[str, list[str]] | None = None) -> Path:
    """Write the DatasetDict and its manifest atomically (temp dir, then rename)."""
    import datasets

    corpus_dir = Path(corpus_dir)
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = corpus_dir.with_name(f".{corpus_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        dsd.save_to_disk(str(tmp))
        if literals:
            write_json(tmp / LITERALS, dict(literals))
        write_json(tmp / MANIFEST, manifest)
        _swap_in(tmp, corpus_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    return corpus_dir


def load_corpus(cfg) -> "datasets.DatasetDict":
    """The corpus built for ``cfg`` (splits train / validation / test)."""
    import datasets

    corpus_dir = RunPaths.from_config(cfg).corpus
    if not _is_built(corpus_dir):
        raise FileNotFoundError(f"no corpus at {corpus_dir}; build it with "
                                f"`python scripts/prepare_data.py --config <your config>` (or greencode.data.prepare_data(cfg))")
    manifest = read_manifest(corpus_dir) or {}
    if manifest.get("data") not in (None, data_key(cfg)):
        log.warning("the corpus at %s was built with data settings %s, the config now says %s; rebuild it with "
                    "scripts/prepare_data.py", corpus_dir, manifest.get("data"), data_key(cfg))
    return datasets.load_from_disk(str(corpus_dir))


# --------------------------------------------------------------------------- building
def _records_to_dsd(splits: Mapping[str, list[dict]]):
    import datasets

    feats = corpus_features()
    cols = list(feats)
    return datasets.DatasetDict({
        s: datasets.Dataset.from_dict({c: [r[c] for r in splits[s]] for c in cols}, features=feats) for s in SPLITS})


def local_input_fingerprint(cfg) -> tuple[str, Path, list]:
    source = resolve_source(cfg.data.language, cfg.data.local_path)
    files = list_source_files(source, cfg.data.language, cfg.data.exclude)
    fp = _sha256_json({"format": FORMAT_VERSION, "data": data_key(cfg), "source": str(source),
                       "files": [[f.path, f.checksum] for f in files]})
    return fp, source, files


def hub_input_fingerprint(cfg) -> str:
    return _sha256_json({"format": FORMAT_VERSION, "data": data_key(cfg)})


def _split_stats(split_tokens: Mapping[str, Sequence[int]]) -> dict[str, dict[str, int]]:
    return {s: {"records": len(split_tokens[s]), "tokens": int(sum(split_tokens[s]))} for s in SPLITS}


def _hub_corpus(cfg) -> tuple["datasets.DatasetDict", dict[str, Any]]:
    """The standardized hub corpus of ``cfg`` and its manifest entries: source path, split
    counts, content hash (of the splits' ``datasets`` fingerprints) and files used."""
    dsd = load_hub_corpus(cfg)
    return dsd, {
        "source_path": cfg.data.hub_id,
        "splits": _split_stats({s: dsd[s]["num_tokens"] for s in SPLITS}),
        "content_hash": _sha256_json({s: dsd[s]._fingerprint for s in SPLITS}),
        "content_hash_kind": "datasets fingerprints of the standardized splits",
        "files": {"used": sum(len(dsd[s]) for s in SPLITS)},
    }


def _local_corpus(cfg, source: Path, files: list, progress: bool | None
                  ) -> tuple["datasets.DatasetDict", dict[str, Any], dict[str, list[str]] | None]:
    """The corpus tokenized from the local ``files`` under ``source``, its manifest entries
    (source path, file counts and hashes, skips, split counts, content hash, workers, tokenize
    time, kept-literal counts) and the kept literals (``None`` when none are kept); raises
    ``ValueError`` when no file is usable."""
    d = cfg.data
    build = build_local_corpus(
        source, d.language, literal_mode=d.literal_mode, keep_frequent_literals=d.keep_frequent_literals,
        validation_fraction=d.validation_fraction, test_fraction=d.test_fraction,
        min_file_tokens=d.min_file_tokens, max_file_tokens=d.max_file_tokens, max_files=d.max_files,
        exclude=d.exclude, syntax_check=d.syntax_check, num_workers=d.num_workers, files=files,
        progress=progress)
    if build.files_used == 0:
        raise ValueError(f"no usable {d.language} files in {source}: {build.counts()}; check data.local_path, "
                         "data.min_file_tokens / max_file_tokens and data.syntax_check")
    dsd = _records_to_dsd(build.splits)
    entries: dict[str, Any] = {
        "source_path": str(source),
        "files": build.counts(),
        # what went where, by path and content (sha1 of the file's bytes): lets a model trained
        # on one corpus be checked against another's test split
        "file_hashes": {s: [[r["path"], r.get("sha1", "")] for r in build.splits[s]] for s in SPLITS},
        "skipped_examples": build.skipped_examples,
        "moved_to_fill_empty_splits": build.moved_to_fill_splits,
        "splits": _split_stats({s: [r["num_tokens"] for r in build.splits[s]] for s in SPLITS}),
        "content_hash": records_content_hash(build.splits),
        "content_hash_kind": "sha256 of split/id/path/tokens",
        "workers": build.workers,
        "tokenize_time_s": round(build.build_time_s, 3),
    }
    literals = None
    if build.kept_literals:
        literals = build.kept_literals
        entries["kept_literals"] = {k: len(v) for k, v in literals.items()}
    return dsd, entries, literals


def prepare_corpus(cfg, *, force: bool = False, progress: bool | None = None) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse) the corpus for ``cfg``; returns its directory and manifest."""
    corpus_dir = RunPaths.from_config(cfg).corpus
    d = cfg.data
    t0 = time.perf_counter()
    if d.source == "hub":
        fingerprint, source, files = hub_input_fingerprint(cfg), None, None
    else:
        fingerprint, source, files = local_input_fingerprint(cfg)
    old = read_manifest(corpus_dir)
    if not force and old is not None and old.get("input_fingerprint") == fingerprint and _is_built(corpus_dir):
        log.info("corpus: reusing %s (inputs unchanged, content %s)", corpus_dir, old.get("content_hash", "?")[:12])
        return corpus_dir, old

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": d.source,
        "language": d.language,
        "literal_mode": d.literal_mode if d.source == "local" else "codexglue",
        "data": data_key(cfg),
        "input_fingerprint": fingerprint,
    }
    literals = None
    if d.source == "hub":
        dsd, entries = _hub_corpus(cfg)
    else:
        dsd, entries, literals = _local_corpus(cfg, source, files, progress)
    manifest.update(entries)
    manifest["tokens_total"] = sum(v["tokens"] for v in manifest["splits"].values())
    manifest["build_time_s"] = round(time.perf_counter() - t0, 3)
    manifest["run"] = run_metadata(cfg, stage="corpus")
    save_corpus(dsd, corpus_dir, manifest, literals)
    manifest["build_time_s"] = round(time.perf_counter() - t0, 3)  # including the save
    write_json(corpus_dir / MANIFEST, manifest)
    sp = manifest["splits"]
    log.info("corpus: %s %s -> %s | train %d / validation %d / test %d records, %d tokens | %s | %.1f s",
             d.source, manifest["source_path"], corpus_dir, sp["train"]["records"], sp["validation"]["records"],
             sp["test"]["records"], manifest["tokens_total"],
             f"files {manifest['files']}" if d.source == "local" else "hub", manifest["build_time_s"])
    return corpus_dir, manifest
