"""Which weights a result came from, recorded once per run and checked across the committed results.

**The record.** Every result file names the weights it was computed from under one key,
:data:`WEIGHTS_KEY` (``"weights"``), usually inside its run metadata
(:func:`greencode.runinfo.run_metadata`)::

    "weights": {"base": "shipped:3f2a...", "finetuned": "stage:91c0...",
                "dirs": {"base": "assets/default-base", "finetuned": "runs/default/finetuned"}}

``base`` and ``finetuned`` are content fingerprints of the model directories
(:func:`model_dir_fingerprint`: a stage key for a model trained here, the
weights' SHA-256 for a shipped base, a hash of the weight files otherwise, ``hub:<id>`` for a hub id);
``finetuned`` is null for a result of the base alone. A fine-tuned directory knows the base it was
trained from (its stage record), so a result that loaded only the fine-tuned model still names its
base. Optional members: ``compared`` (``{name: fingerprint}``, the other bases of an ablation, which do
not count as the result's weights), ``finetuned_from`` (only when the separately loaded base is not
the one the fine-tuned model was trained from, which the check reports) and ``finetuned_bytes`` /
``base_bytes`` (the SHA-256 of a model trained here: its weight files' bytes, since its fingerprint is its
stage key, which two machines share when they train the same config to other last bits). ``dirs`` is for a
reader; the check compares fingerprints, and the bytes where files on the same fingerprint record them.

The identity of a loaded model is taken when it is loaded
(:meth:`greencode.models.EarlyExitModel.from_pretrained` sets ``model.loaded_from``), so a directory
rewritten while a run was going cannot make the run name weights it did not use.
:func:`weights_record` builds the record from loaded models, directories or identities.

**The check.** :func:`check_results` walks ``results/<name>/`` (every ``.json``),
``results/benchmark/*<name>*.json`` and ``figures/<name>/`` (each PNG/PDF through ``index.json``, where
the figure writer records the inputs and weights of every figure) and fails, naming each file, when a
file has no weights record, names several, or names other weights than the reference (the given
expected base, else the majority). ``results/archive/`` (and any ``archive`` folder) is exempt. Markdown
and CSV files are renderings of a JSON file beside them and are not checked on their own.
``scripts/check_results.py`` is the command.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from greencode.config import FIGURE_FORMATS
from greencode.utils import REPO_ROOT, portable_path, read_json

log = logging.getLogger(__name__)

WEIGHTS_KEY = "weights"
STAGE_FILE = "greencode_stage.json"  # a model directory trained here: its stage's key, payload and record
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")  # a model directory's weight files
FIGURE_EXTENSIONS = tuple(f".{f}" for f in FIGURE_FORMATS)  # the formats the figures section may write
EXEMPT_DIRS = ("archive",)


# --------------------------------------------------------------------------- identities
def file_digest(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def make_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_stage(directory: Path) -> Optional[dict]:
    p = Path(directory) / STAGE_FILE
    try:
        return read_json(p) if p.is_file() else None
    except (OSError, ValueError):
        return None


def model_dir_fingerprint(source: str) -> str:
    """A cheap identity of a base model: its stage key when we trained it, else a hash of its
    config and the names/sizes/mtimes of its weight files, else (hub id) the id itself."""
    p = Path(source)
    if not p.is_dir():
        return f"hub:{source}"
    rec = read_stage(p)
    if rec and rec.get("key"):
        return f"stage:{rec['key']}"
    shipped = p / "base_manifest.json"  # a shipped base (greencode.training.shipping): its weights' hash
    if shipped.is_file():
        try:
            return f"shipped:{read_json(shipped)['weights_sha256']}"
        except (OSError, ValueError, KeyError):
            pass
    files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.iterdir()
                   if f.suffix in WEIGHT_SUFFIXES)
    return f"dir:{file_digest(p / 'config.json')}:{make_key({'files': files})}"


def model_identity(source: Union[str, Path]) -> dict[str, Any]:
    """The identity of the model at ``source`` (a directory or a hub id) as it is now:
    ``{"dir", "fingerprint", "trained_from"}``; ``trained_from`` is the base fingerprint a
    fine-tuned directory's stage record names (None for a base)."""

    source = str(source)
    p = Path(source)
    trained_from = None
    weights_bytes = None
    if p.is_dir():
        rec = read_stage(p) or {}
        if rec.get("stage") == "finetune":
            trained_from = (rec.get("payload") or {}).get("base_fingerprint")
        if rec.get("key"):  # trained here: the stage key names the recipe, the bytes name the weights
            weights_bytes = weight_files_sha256(p, rec.get("weights_bytes"))
    out = {"dir": portable_path(p) if p.is_dir() else source, "fingerprint": model_dir_fingerprint(source),
           "trained_from": trained_from}
    if weights_bytes:
        out["bytes"] = weights_bytes
    return out


_BYTES_CACHE: dict[tuple, str] = {}


def _weight_files_stamp(directory: Path) -> list[list]:
    """[name, size, mtime_ns] of a model directory's weight files, in name order."""
    files = sorted(f for f in directory.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def weight_files_sha256(directory: Union[str, Path], recorded: Optional[dict] = None) -> Optional[str]:
    """The SHA-256 of a model directory's weight files (``*.safetensors``, ``*.bin``, ``*.pt``; names and bytes, in
    name order), None when it has none. ``recorded``: a :func:`weights_bytes_record` written when the weights were
    saved (the stage record), used while the files' names, sizes and modification times are the ones it names;
    otherwise hashed, once per process for the same files."""
    directory = Path(directory)
    stamp = _weight_files_stamp(directory)
    if not stamp:
        return None
    if recorded and recorded.get("stamp") == stamp and recorded.get("sha256"):
        return recorded["sha256"]
    key = (str(directory.resolve()), tuple(map(tuple, stamp)))
    if key not in _BYTES_CACHE:
        h = hashlib.sha256()
        for name, _, _ in stamp:
            h.update(name.encode() + b"\0")
            with open(directory / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _BYTES_CACHE[key] = h.hexdigest()
    return _BYTES_CACHE[key]


def weights_bytes_record(directory: Union[str, Path]) -> Optional[dict]:
    """What a training stage writes into its stage record once its weights are saved, so loading them later
    needs no second pass over the bytes: ``{"sha256", "stamp"}`` (None without weight files)."""
    sha = weight_files_sha256(directory)
    return None if sha is None else {"sha256": sha, "stamp": _weight_files_stamp(Path(directory))}


def _identity(x: Any) -> Optional[dict]:
    """A model (its ``loaded_from``), a directory / hub id, or an identity dict -> identity dict."""
    if x is None:
        return None
    if isinstance(x, dict):
        return x
    loaded = getattr(x, "loaded_from", None)
    if isinstance(loaded, dict):
        return loaded
    if isinstance(x, (str, Path)):
        return model_identity(x)
    return None  # a model built in memory (from a config, random weights): no directory to name


def weights_record(finetuned: Any = None, base: Any = None, *, compared: Optional[dict] = None) -> Optional[dict]:
    """The ``weights`` record of a result (see the module docstring). ``finetuned`` and ``base`` are
    the models the result used (``EarlyExitModel`` instances loaded with ``from_pretrained``, their
    directories, or identities); without ``base`` the base is the one the fine-tuned model was trained
    from. ``compared``: ``{name: model or directory}`` of other bases an ablation measured. None when
    nothing identifies the weights (models built in memory)."""
    ft, b = _identity(finetuned), _identity(base)
    base_fp = b["fingerprint"] if b else (ft or {}).get("trained_from")
    if ft is None and base_fp is None:
        return None
    rec: dict[str, Any] = {"base": base_fp, "finetuned": ft["fingerprint"] if ft else None,
                           "dirs": {"base": b["dir"] if b else None, "finetuned": ft["dir"] if ft else None}}
    for name, ident in (("finetuned", ft), ("base", b)):
        if ident and ident.get("bytes"):
            rec[f"{name}_bytes"] = ident["bytes"]
    if ft and b and ft.get("trained_from") and ft["trained_from"] != base_fp:
        rec["finetuned_from"] = ft["trained_from"]
        log.warning("the fine-tuned model %s was trained from base %s, but base %s was loaded beside it",
                    ft["dir"], ft["trained_from"], base_fp)
    if compared:
        rec["compared"] = {name: (_identity(m) or {}).get("fingerprint") for name, m in compared.items()}
    return rec


def weights_for_run(cfg) -> Optional[dict]:
    """The record of a run's own models as they are on disk now: its fine-tuned directory when it
    exists (with the base it was trained from), else its base (``model.base`` or ``runs/<name>/base_model``).
    For writers that load nothing themselves (the pipeline's timing record, the RL stage's analysis of a
    bank recorded without a record)."""
    from greencode.paths import RunPaths

    paths = RunPaths.from_config(cfg)
    if (paths.finetuned / "config.json").is_file():
        return weights_record(paths.finetuned)
    base = cfg.model.base
    if base:
        local = Path(base) if Path(base).is_dir() else REPO_ROOT / base
        return weights_record(base=local if local.is_dir() else base)
    if (paths.base_model / "config.json").is_file():
        return weights_record(base=paths.base_model)
    return None


# --------------------------------------------------------------------------- reading records
def is_weights_record(obj: Any) -> bool:
    return isinstance(obj, dict) and "base" in obj and "finetuned" in obj


def find_weights(obj: Any) -> list[dict]:
    """Every weights record anywhere in a result's JSON (a merged file may hold several runs'
    metadata), the resolved config excepted."""
    found: list[dict] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == WEIGHTS_KEY and is_weights_record(v):
                    found.append(v)
                elif k != "config":
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(obj)
    return found


def identity_of(record: dict) -> tuple[Optional[str], Optional[str]]:
    """What the check compares: (base, fine-tuned) fingerprints."""
    return record.get("base"), record.get("finetuned")


def distinct(records: Iterable[dict]) -> list[dict]:
    """Records with distinct identities, in first-seen order."""
    seen: dict[tuple, dict] = {}
    for r in records:
        seen.setdefault(identity_of(r) + (r.get("finetuned_from"), r.get("base_bytes"), r.get("finetuned_bytes")), r)
    return list(seen.values())


def weights_of_file(path: Union[str, Path]) -> list[dict]:
    """The distinct weights records of one result file. A non-JSON result (CSV, markdown) takes the
    record of the JSON beside it with the same stem, else of every JSON in its folder."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            return distinct(find_weights(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            return []
    twin = path.with_suffix(".json")
    if twin.is_file():
        return weights_of_file(twin)
    return distinct(r for p in sorted(path.parent.glob("*.json")) for r in weights_of_file(p))


def weights_of_inputs(paths: Iterable[Union[str, Path]]) -> list[dict]:
    """The distinct weights records of the result files a figure was drawn from."""
    return distinct(r for p in paths for r in weights_of_file(p))


# --------------------------------------------------------------------------- the check
@dataclass
class FileWeights:
    path: str  # relative to the root the check ran on
    records: list[dict] = field(default_factory=list)
    problem: Optional[str] = None


@dataclass
class ProvenanceReport:
    root: str
    files: list[FileWeights]
    reference: Optional[tuple[Optional[str], Optional[str]]]  # (base, fine-tuned) every file must name
    reference_from: str  # "expected base" | "majority"

    @property
    def problems(self) -> list[FileWeights]:
        return [f for f in self.files if f.problem]

    @property
    def ok(self) -> bool:
        return bool(self.files) and not self.problems

    def format(self) -> str:
        lines = []
        if not self.files:
            return f"no result files found under {self.root} (results/<name>, results/benchmark/*<name>*, figures/<name>)"
        if self.reference is not None:
            base, ft = self.reference
            lines.append(f"reference weights ({self.reference_from}): base {base}, fine-tuned {ft}")
        counts = collections.Counter(identity_of(f.records[0]) for f in self.files if len(f.records) == 1)
        for (base, ft), n in counts.most_common():
            lines.append(f"  {n:4d} files name base {base}, fine-tuned {ft}")
        bad = self.problems
        if bad:
            lines.append(f"FAIL: {len(bad)} of {len(self.files)} result files do not name the reference weights:")
            lines += [f"  {f.path}: {f.problem}" for f in bad]
        else:
            lines.append(f"OK: all {len(self.files)} result files name the same weights")
        return "\n".join(lines)


def result_files(root: Union[str, Path], name: str = "default") -> list[Path]:
    """The result files the check covers (figures as their image files)."""
    root = Path(root)
    out: list[Path] = []
    res = root / "results" / name
    if res.is_dir():
        out += sorted(p for p in res.rglob("*.json") if p.is_file())
    bench = root / "results" / "benchmark"
    if bench.is_dir():
        out += sorted(p for p in bench.glob(f"*{name}*.json") if p.is_file())
    figs = root / "figures" / name
    if figs.is_dir():
        out += sorted(p for p in figs.rglob("*") if p.suffix in FIGURE_EXTENSIONS and p.is_file())
    return [p for p in out if not any(part in EXEMPT_DIRS for part in p.relative_to(root).parts)]


def _figure_records(figs_dir: Path) -> dict[str, tuple[list[dict], Optional[str]]]:
    """{image file name: (records, problem)} from ``figures/<name>/index.json``."""
    index_path = figs_dir / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, tuple[list[dict], Optional[str]]] = {}
    prov = index.get("provenance") or {}
    for key, files in (index.get("figures") or {}).items():
        entry = prov.get(key)
        w = (entry or {}).get(WEIGHTS_KEY)  # one record, or a list when the inputs name several
        recs = distinct(r for r in (w if isinstance(w, list) else [w]) if is_weights_record(r))
        problem = None
        if entry is None:
            problem = "index.json records no inputs or weights for this figure (drawn before figures recorded them)"
        elif not recs:
            inputs = ", ".join(entry.get("inputs") or []) or "none recorded"
            problem = f"its inputs ({inputs}) name no weights"
        for f in files:
            out[f] = (recs, problem)
    return out


def _majority(files: list[FileWeights]) -> Optional[tuple[Optional[str], Optional[str]]]:
    bases = collections.Counter(identity_of(f.records[0])[0] for f in files if len(f.records) == 1
                                and identity_of(f.records[0])[0])
    if not bases:
        return None
    base = bases.most_common(1)[0][0]
    return base, _majority_finetuned(files, base)


def _majority_finetuned(files: list[FileWeights], base: str) -> Optional[str]:
    fts = collections.Counter(identity_of(f.records[0])[1] for f in files if len(f.records) == 1
                              and identity_of(f.records[0])[0] == base and identity_of(f.records[0])[1])
    return fts.most_common(1)[0][0] if fts else None


def check_results(root: Union[str, Path], name: str = "default", *,
                  expected_base: Optional[str] = None) -> ProvenanceReport:
    """Check that every result of run ``name`` under ``root`` names the same weights (see the module
    docstring). ``expected_base``: the fingerprint every result's base must be (the shipped base);
    without it the majority's base is the reference. The fine-tuned reference is the most common
    fine-tuned fingerprint among the files on the reference base; a result of the base alone
    (``finetuned`` null) passes when its base is the reference."""
    root = Path(root)
    figs_dir = root / "figures" / name
    fig_records = _figure_records(figs_dir)
    files: list[FileWeights] = []
    for p in result_files(root, name):
        rel = str(p.relative_to(root))
        if p.suffix in FIGURE_EXTENSIONS:
            recs, problem = fig_records.get(p.name, ([], f"not listed in {figs_dir.name}/index.json, so nothing "
                                                         "records what it was drawn from"))
            files.append(FileWeights(rel, list(recs), problem))
            continue
        if p.parent == figs_dir and p.name == "index.json":
            continue  # the figures' record itself: checked through the images
        files.append(FileWeights(rel, weights_of_file(p)))
    for f in files:
        if f.problem:
            continue
        if not f.records:
            f.problem = "no weights record"
        elif len(f.records) > 1:
            f.problem = "names several weights: " + "; ".join(
                f"base {b}, fine-tuned {ft}" for b, ft in (identity_of(r) for r in f.records))
    if expected_base is not None:
        reference = (expected_base, _majority_finetuned(files, expected_base))
        reference_from = "expected base"
    else:
        reference = _majority(files)
        reference_from = "majority"
    for f in files:
        if f.problem or reference is None:
            continue
        rec = f.records[0]
        base, ft = identity_of(rec)
        if base != reference[0]:
            f.problem = f"base {base}, not the reference {reference[0]}"
        elif ft is not None and ft != reference[1]:
            f.problem = f"fine-tuned {ft}, not the reference {reference[1]}"
        elif rec.get("finetuned_from") and rec["finetuned_from"] != base:
            f.problem = f"its fine-tuned model was trained from base {rec['finetuned_from']}, not {base}"
    if reference is None:
        for f in files:
            f.problem = f.problem or "no reference weights (no file names a base)"
    else:
        _check_bytes(files)
    return ProvenanceReport(str(root), files, reference, reference_from)


def _check_bytes(files: list[FileWeights]) -> None:
    """Files that pass on their fingerprints but record other weight bytes than the most common on the same
    fingerprint (the same recipe trained twice: another machine, another library) fail; files that record no
    bytes (written before results recorded them) are not compared."""
    for name in ("base", "finetuned"):
        by_fp: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for f in files:
            if not f.problem and f.records[0].get(f"{name}_bytes"):
                by_fp[f.records[0][name]][f.records[0][f"{name}_bytes"]] += 1
        for f in files:
            got = None if f.problem else f.records[0].get(f"{name}_bytes")
            if not got:
                continue
            common, n = by_fp[f.records[0][name]].most_common(1)[0]
            if got != common:
                f.problem = (f"{name} {f.records[0][name]} with other weight bytes (sha256 {got[:12]}…) than {n} other "
                             f"file(s) ({common[:12]}…): the same recipe trained twice (another machine or library); "
                             "rerun the stages after it so every result comes from one model")
