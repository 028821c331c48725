"""Build a CodeXGLUE-format corpus from real source files on this machine.

A directory or a ``.zip`` of ``.py`` / ``.java`` files (default: the running
interpreter's standard library, or the JDK's ``lib/src.zip``) becomes records
``{id, path, code, num_tokens, language}`` in train / validation / test splits:

- the split of a file is decided by a hash of its path inside the source (stable when
  other files come and go); identical files are kept once;
- files that are not UTF-8, do not tokenize, fail the syntax check, are empty, or fall
  outside the size limits are skipped and counted by reason, never fatal;
- with ``max_files`` the files are examined in a fixed pseudo-random order (a second hash
  of the path) until that many are used.

Only the standard library, tree-sitter and tqdm are imported here; ``datasets`` is
imported where the records are saved (``corpus.py``).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import logging
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Optional

from greencode.data import lexers

log = logging.getLogger(__name__)

EXTENSIONS = {"python": ".py", "java": ".java"}
ALWAYS_EXCLUDED_DIRS = {"site-packages", "dist-packages"}
SKIP_REASONS = ("unreadable", "not_utf8", "empty", "tokenize_error", "syntax_error", "too_short", "too_long",
                "duplicate")
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- defaults
def default_python_source() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


SITE_PACKAGES = "@site-packages"


def site_packages_source() -> Path:
    """The running environment's ``site-packages`` (the project's ``.venv`` under make)."""
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def jdk_src_zip_candidates() -> list[Path]:
    """Where a JDK keeps ``lib/src.zip``: $JAVA_HOME, the JDK of ``javac`` on PATH, then
    /usr/lib/jvm/* and macOS's JavaVirtualMachines (in that order)."""
    cands: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        cands.append(Path(os.environ["JAVA_HOME"]) / "lib" / "src.zip")
    javac = shutil.which("javac")
    if javac:
        cands.append(Path(os.path.realpath(javac)).parent.parent / "lib" / "src.zip")
    cands += [Path(p) for p in sorted(glob.glob("/usr/lib/jvm/*/lib/src.zip"), reverse=True)]
    cands += [Path(p) for p in sorted(glob.glob("/Library/Java/JavaVirtualMachines/*/Contents/Home/lib/src.zip"),
                                      reverse=True)]
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def find_jdk_src_zip() -> Path:
    """The first JDK ``lib/src.zip`` that exists (broken symlinks are passed over)."""
    cands = jdk_src_zip_candidates()
    for c in cands:
        if c.is_file() and zipfile.is_zipfile(c):
            return c.resolve()
    looked = ", ".join(str(c) for c in cands) or "$JAVA_HOME/lib/src.zip, /usr/lib/jvm/*/lib/src.zip"
    raise FileNotFoundError(
        f"no JDK source archive (lib/src.zip) found; looked at: {looked}. Install one "
        "(e.g. `apt-get install openjdk-17-source`) or set data.local_path to a directory or .zip of .java files")


def resolve_source(language: str, local_path: Optional[str]) -> Path:
    """``data.local_path`` or the language's default, checked to exist."""
    if language not in EXTENSIONS:
        raise ValueError(f"data.language={language!r}; use python or java")
    if local_path is None:
        return default_python_source() if language == "python" else find_jdk_src_zip()
    if local_path == SITE_PACKAGES:
        return site_packages_source()
    p = Path(local_path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.local_path={local_path!r} does not exist; point it at a directory or a .zip "
                                f"of {EXTENSIONS[language]} files (or leave it null for the default)")
    if p.is_file() and not zipfile.is_zipfile(p):
        raise ValueError(f"data.local_path={local_path!r} is a file but not a zip archive; give a directory or a "
                         f".zip of {EXTENSIONS[language]} files")
    return p.resolve()


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class SourceFile:
    path: str  # posix path inside the source (directory or zip)
    checksum: str  # content checksum (sha1 for directories, CRC32+size for zips)


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    parts = PurePosixPath(rel).parts
    if any(p in ALWAYS_EXCLUDED_DIRS for p in parts[:-1]):
        return True
    return any(fnmatch.fnmatch(rel, pat) for pat in patterns)


def list_source_files(source: Path, language: str, exclude: Iterable[str] = ()) -> list[SourceFile]:
    """Candidate files (by extension, minus exclusions) sorted by path, with checksums."""
    ext = EXTENSIONS[language]
    exclude = list(exclude)
    out: list[SourceFile] = []
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if d not in ALWAYS_EXCLUDED_DIRS)
            for fn in filenames:
                if not fn.endswith(ext):
                    continue
                full = os.path.join(dirpath, fn)
                rel = Path(full).relative_to(source).as_posix()
                if _excluded(rel, exclude):
                    continue
                try:
                    with open(full, "rb") as f:
                        digest = hashlib.sha1(f.read()).hexdigest()
                except OSError:
                    digest = "unreadable"
                out.append(SourceFile(rel, digest))
    else:
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.endswith(ext):
                    continue
                rel = info.filename
                if _excluded(rel, exclude):
                    continue
                out.append(SourceFile(rel, f"crc32:{info.CRC:08x}:{info.file_size}"))
    out.sort(key=lambda f: f.path)
    return out


def path_hash(path: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``salt`` and the path."""
    d = hashlib.sha256(f"{salt}:{path}".encode("utf-8")).digest()
    return int.from_bytes(d[:8], "big") / 2**64


def split_of(path: str, validation_fraction: float, test_fraction: float) -> str:
    h = path_hash(path, "split")
    if h < test_fraction:
        return "test"
    if h < test_fraction + validation_fraction:
        return "validation"
    return "train"


def record_id(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- workers
_worker_state: dict[str, Any] = {}
_SEP = "\x00"  # joins a file's tokens for the trip back from a worker


def _init_worker(source: str, language: str, literal_mode: str, keep_all: bool, syntax_check: bool) -> None:
    _worker_state.clear()
    _worker_state.update(source=source, language=language, literal_mode=literal_mode, keep_all=keep_all,
                         syntax_check=syntax_check, zip=None)
    if not os.path.isdir(source):
        _worker_state["zip"] = zipfile.ZipFile(source)


def _read(rel: str) -> bytes:
    zf = _worker_state["zip"]
    if zf is not None:
        return zf.read(rel)
    with open(os.path.join(_worker_state["source"], rel), "rb") as f:
        return f.read()


def process_bytes(data: bytes, language: str, literal_mode: str = "normalized", keep_all: bool = False,
                  syntax_check: bool = True) -> tuple[str, Any]:
    """One file's bytes -> ("ok", tokens) or (skip reason, message)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return "not_utf8", str(e)
    if not text.strip():
        return "empty", "no content"
    keep = lexers.KEEP_ALL if keep_all else None
    try:
        if literal_mode == lexers.SOURCE_MODE:
            tokens = lexers.source_pieces(text, language)
            if syntax_check and language == "python":
                lexers.check_python_syntax(text)
            elif syntax_check:
                lexers.tokenize_java_source(text, "raw", None, syntax_check=True)
        elif language == "python":
            tokens = lexers.tokenize_python_source(text, literal_mode, keep)
            if syntax_check:
                lexers.check_python_syntax(text)
        else:
            tokens = lexers.tokenize_java_source(text, literal_mode, keep, syntax_check=syntax_check)
    except lexers.SyntaxCheckError as e:
        return "syntax_error", str(e)
    except (lexers.LexError, UnicodeError, RecursionError, MemoryError) as e:
        return "tokenize_error", f"{type(e).__name__}: {e}"
    if not tokens:
        return "empty", "no code tokens"
    return "ok", tokens


def _work(item: tuple[int, str]) -> tuple[int, str, str, Any, str]:
    idx, rel = item
    try:
        data = _read(rel)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        return idx, rel, "unreadable", str(e), ""
    digest = hashlib.sha1(data).hexdigest()
    st = _worker_state
    status, payload = process_bytes(data, st["language"], st["literal_mode"], st["keep_all"], st["syntax_check"])
    if status == "ok":  # one string pickles far faster than a list of small ones
        joined = _SEP.join(payload)
        if joined.count(_SEP) == len(payload) - 1:  # no token holds the separator itself
            payload = joined
    return idx, rel, status, payload, digest


# --------------------------------------------------------------------------- builder
@dataclass
class LocalBuild:
    """The result of ``build_local_corpus``: records per split and the counts."""

    source: Path
    language: str
    splits: dict[str, list[dict]]
    files_found: int = 0
    files_examined: int = 0
    files_used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    moved_to_fill_splits: list[str] = field(default_factory=list)
    kept_literals: dict[str, list[str]] = field(default_factory=dict)
    build_time_s: float = 0.0
    workers: int = 1

    def counts(self) -> dict[str, Any]:
        return {
            "found": self.files_found,
            "seen": self.files_examined,  # read and tokenized (all of them unless max_files stopped early)
            "used": self.files_used,
            "not_seen": self.files_found - self.files_examined,
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
        }


MIN_FILES_FOR_POOL = 200  # below this, starting processes costs more than it saves


def _auto_workers(requested: int, n_files: int) -> int:
    if n_files < MIN_FILES_FOR_POOL:
        return 1
    if requested > 0:
        return requested
    return max(1, min(os.cpu_count() or 1, 8))


def _tokenized(items: list[tuple[int, str]], workers: int, init_args: tuple) -> Iterator[tuple[int, str, str, Any, str]]:
    """Each file's (index, path, status, tokens or reason, digest), in order: in this process, or on
    ``workers`` forked processes (closing the generator stops the pool)."""
    if workers == 1:
        _init_worker(*init_args)
        try:
            for it in items:
                yield _work(it)
        finally:
            if _worker_state.get("zip") is not None:
                _worker_state["zip"].close()
            _worker_state.clear()
        return
    # fork on Linux: spawn would re-import the caller's __main__ (a script without a
    # main guard would loop); the workers only run the stdlib tokenizer / tree-sitter
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_work, items, chunksize=8)


def _admit(status: str, payload: Any, digest: str, seen: set[str], min_tokens: int, max_tokens: int) -> tuple[str, Any]:
    """A tokenized file's verdict: ``ok`` with its tokens, or the reason it is skipped (too short, too long,
    the same bytes as a file used before)."""
    if status == "ok" and isinstance(payload, str):
        payload = payload.split(_SEP)
    if status == "ok":
        n = len(payload)
        if n < min_tokens or n > max_tokens:
            return ("too_short" if n < min_tokens else "too_long"), f"{n} tokens"
        if digest in seen:
            return "duplicate", "same bytes as a file used before"
    return status, payload


def _finish(build: "LocalBuild", skipped: Counter, validation_fraction: float, test_fraction: float,
            keep_frequent_literals: int, keep_all: bool) -> None:
    """The skip counts, non-empty splits sorted by path, and (normalized literals) the frequent literals kept."""
    build.skipped = {r: skipped[r] for r in SKIP_REASONS if skipped[r]}
    _fill_empty_splits(build, validation_fraction, test_fraction)
    for s in SPLITS:
        build.splits[s].sort(key=lambda r: r["path"])
    if keep_all:
        build.kept_literals = frequent_literals(build.splits["train"], keep_frequent_literals)
        for s in SPLITS:
            for r in build.splits[s]:
                r["code"] = lexers.finalize_literals(r["code"], build.kept_literals)


def build_local_corpus(source: Path, language: str, *, literal_mode: str = "normalized", keep_frequent_literals: int = 0,
                       validation_fraction: float = 0.05, test_fraction: float = 0.05, min_file_tokens: int = 20,
                       max_file_tokens: int = 20000, max_files: Optional[int] = None, exclude: Iterable[str] = (),
                       syntax_check: bool = True, num_workers: int = 0, files: Optional[list[SourceFile]] = None,
                       progress: Optional[bool] = None) -> LocalBuild:
    """Tokenize the files under ``source`` (a directory or zip) into split records."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    source = Path(source)
    if language not in EXTENSIONS:
        raise ValueError(f"language={language!r}; use python or java")
    lexers._check_mode(literal_mode)
    if files is None:
        files = list_source_files(source, language, exclude)
    if not files:
        raise ValueError(f"no {EXTENSIONS[language]} files found in {source} (after exclusions); point "
                         f"data.local_path at a directory or .zip that holds {language} source files")
    # examination order: a fixed pseudo-random order, so max_files takes a spread sample
    order = sorted(files, key=lambda f: (path_hash(f.path, "order"), f.path))
    keep_all = literal_mode == "normalized" and keep_frequent_literals > 0
    workers = _auto_workers(num_workers, len(order) if max_files is None else min(len(order), 4 * max_files))
    build = LocalBuild(source=source, language=language, splits={s: [] for s in SPLITS}, files_found=len(files),
                       workers=workers)
    skipped: Counter = Counter()
    seen_digests: set[str] = set()
    items = list(enumerate(f.path for f in order))
    by_used = max_files is not None  # the bar counts used files when capped, else examined ones
    bar = tqdm(total=min(len(items), max_files) if by_used else len(items), unit="file",
               desc=f"corpus ({language})", disable=(not progress) if progress is not None else None)
    stream = _tokenized(items, workers, (str(source), language, literal_mode, keep_all, syntax_check))
    try:
        for idx, rel, status, payload, digest in stream:
            build.files_examined += 1
            if not by_used:
                bar.update(1)
            status, payload = _admit(status, payload, digest, seen_digests, min_file_tokens, max_file_tokens)
            if status != "ok":
                skipped[status] += 1
                ex = build.skipped_examples.setdefault(status, [])
                if len(ex) < 10:
                    ex.append(rel)
                log.debug("skip %s (%s): %s", rel, status, payload)
                continue
            seen_digests.add(digest)
            split = split_of(rel, validation_fraction, test_fraction)
            build.splits[split].append({"id": record_id(rel), "path": rel, "code": lexers.wrap(payload),
                                        "num_tokens": len(payload), "language": language, "sha1": digest})
            build.files_used += 1
            if by_used:
                bar.update(1)
            if max_files is not None and build.files_used >= max_files:
                break
    finally:
        stream.close()  # stops the worker pool when max_files cut the run short
        bar.close()
    _finish(build, skipped, validation_fraction, test_fraction, keep_frequent_literals, keep_all)
    build.build_time_s = time.perf_counter() - t0
    return build


def _fill_empty_splits(build: LocalBuild, validation_fraction: float, test_fraction: float) -> None:
    """A tiny corpus can leave a split with a positive fraction empty; move the train
    records nearest to that split's hash range into it (deterministic), so every stage
    has at least one record to work with."""
    for split, frac, edge in (("test", test_fraction, test_fraction),
                              ("validation", validation_fraction, test_fraction + validation_fraction)):
        if frac <= 0 or build.splits[split] or len(build.splits["train"]) < 3:
            continue
        train = build.splits["train"]
        nearest = min(range(len(train)), key=lambda i: (path_hash(train[i]["path"], "split") - edge, train[i]["path"]))
        rec = train.pop(nearest)
        build.splits[split].append(rec)
        build.moved_to_fill_splits.append(rec["path"])
        log.info("split %r was empty (%d files in total); moved %s there from train", split,
                 sum(len(v) for v in build.splits.values()), rec["path"])


def frequent_literals(records: list[dict], n: int) -> dict[str, list[str]]:
    """The ``n`` most frequent literal values of each kind (str / num / char) in
    ``records`` (tokens in their kept form); ties broken by value."""
    counts: dict[str, Counter] = {"str": Counter(), "num": Counter(), "char": Counter()}
    for r in records:
        for t in r["code"]:
            kv = lexers.parse_kept_literal(t)
            if kv is not None:
                counts[kv[0]][kv[1]] += 1
    return {k: [v for v, _ in sorted(c.items(), key=lambda x: (-x[1], x[0]))[:n]] for k, c in counts.items()}


def corpus_features():
    """The corpus records' schema (both sources write it)."""
    import datasets

    seq = datasets.List(datasets.Value("string")) if hasattr(datasets, "List") else \
        datasets.Sequence(datasets.Value("string"))
    return datasets.Features({"id": datasets.Value("string"), "path": datasets.Value("string"), "code": seq,
                              "num_tokens": datasets.Value("int32"), "language": datasets.Value("string")})
