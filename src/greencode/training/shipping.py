"""The shipped base model of the embedded default (``assets/default-base``).

``ship_base(cfg)`` copies a finished pretraining run (``runs/<name>/base_model``) into a
small, self-describing folder that the demo starts from, as the paper starts from a hub
checkpoint:

    config.json, generation_config.json, model.safetensors   the HF model (fp32)
    tokenizer.json, tokenizer_config.json, ...                 its tokenizer
    base_manifest.json     command, config, data manifest hash, tokens seen, wall time,
                           losses, commit, library versions, hardware, weight sha256
    train_files.tsv.gz     path and sha1 of every training file (test-split disjointness)
    train_log.csv          the pretraining loss curve (train and validation)

``check_disjoint`` refuses evaluation samples whose file (by path or by content) the
shipped base was trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Iterable, Optional, Union

from greencode.runinfo import run_metadata
from greencode.training.data import pack_split
from greencode.utils import read_json, write_json

log = logging.getLogger(__name__)

MANIFEST = "base_manifest.json"
TRAIN_FILES = "train_files.tsv.gz"
MAX_WEIGHTS_MB = 60
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shippable(cfg, paths) -> tuple[dict, float, dict]:
    """The finished base's stage record, its weights' size (MB) and the corpus manifest, or a clear error:
    no finished base, weights missing or over ``MAX_WEIGHTS_MB``, a corpus manifest without the files by split."""
    from greencode.data.corpus import read_manifest
    from greencode.training.common import read_stage

    src = paths.base_model
    stage = read_stage(src)
    if not stage or not stage.get("complete"):
        raise FileNotFoundError(f"no finished base model in {str(src)!r}; pretrain it first: "
                                f"`python scripts/pretrain.py --config {cfg.source_path or '<cfg>'}`")
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} is missing; the pretraining run did not finish saving")
    size_mb = weights.stat().st_size / 1e6
    if size_mb > MAX_WEIGHTS_MB:
        raise ValueError(f"the base model's weights are {size_mb:.1f} MB, over the {MAX_WEIGHTS_MB} MB a shipped "
                         "checkpoint may take; pick a smaller shape")
    corpus = read_manifest(paths.corpus)
    if not corpus or "file_hashes" not in corpus:
        raise FileNotFoundError(f"the corpus manifest in {str(paths.corpus)!r} lists no files by split; rebuild the "
                                "corpus with scripts/prepare_data.py (this version records them)")
    return stage, size_mb, corpus


def _copy_files(src: Path, tmp: Path, train: list) -> None:
    """The model and tokenizer files, the training log, and the training files' list (path, sha1)."""
    from greencode.training.common import CSV_NAME, TRAINER_DIR

    for name in _MODEL_FILES + _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    csv = src / TRAINER_DIR / CSV_NAME
    if csv.is_file():
        shutil.copy2(csv, tmp / CSV_NAME)
    with gzip.open(tmp / TRAIN_FILES, "wt", encoding="utf-8") as f:
        f.write("path\tsha1\n")
        for p, h in train:
            f.write(f"{p}\t{h}\n")


def _manifest(cfg, src: Path, tmp: Path, stage: dict, corpus: dict, size_mb: float, command: Optional[str]) -> dict:
    """The shipped base's manifest: what it is, how it was trained and on what, its held-out quality
    (re-measured), the weights' digest and the runs that trained and shipped it."""
    summary = stage.get("summary", {})
    heldout = heldout_quality(cfg, src)
    meta = run_metadata(cfg, stage="ship_base")
    run_info = read_json(src / "run_info.json") if (src / "run_info.json").is_file() else {}
    return {
        "what": "GREEN-CODE embedded default base model: a Llama-architecture model pretrained from scratch on "
                "the Python sources that the project's pinned requirements install (site-packages), as written",
        "command": command or "make pretrain",
        "pretrain_command": (src / "command.txt").read_text().strip() if (src / "command.txt").is_file() else None,
        "config": cfg.to_dict(),
        "data": {"source_path_at_training": corpus.get("source_path"), "literal_mode": corpus.get("literal_mode"),
                 "content_hash": corpus.get("content_hash"), "input_fingerprint": corpus.get("input_fingerprint"),
                 "splits": corpus.get("splits"), "files": corpus.get("files"),
                 "validation_fraction": cfg.data.validation_fraction, "test_fraction": cfg.data.test_fraction,
                 "split_rule": "greencode.data.local.split_of(path inside site-packages)",
                 "train_files": TRAIN_FILES, "train_file_count": len(corpus["file_hashes"]["train"])},
        "stage_key": stage.get("key"),
        "tokens_seen": summary.get("train_tokens"),
        "steps": summary.get("steps"),
        "num_parameters": summary.get("num_parameters"),
        "wall_time_s": summary.get("train_runtime_s"),
        "cpu_time_s": summary.get("train_cpu_time_s"),
        "tokens_per_s": summary.get("train_tokens_per_s"),
        "final_train_loss": summary.get("final_train_loss"),
        "eval_loss": heldout["final_ce_loss"],
        "eval_perplexity": heldout["final_perplexity"],
        "heldout": heldout,
        "trainer_eval_loss": summary.get("eval_loss"),
        "trainer_eval_note": "the Trainer's periodic eval_loss (train_log.csv, split=eval) of this pretraining "
                             "was measured on validation files whose pieces were joined with spaces (a packing "
                             "bug fixed after it started); eval_loss / heldout above are re-measured on the "
                             "validation split as written",
        "weights_sha256": sha256_file(tmp / "model.safetensors"),
        "weights_mb": round(size_mb, 2),
        "pretrain_run": {k: v for k, v in run_info.items() if k in ("created", "git_commit", "versions", "hardware",
                                                                     "command")},
        "shipped": {k: meta[k] for k in ("created", "git_commit", "versions", "hardware")},
    }


def ship_base(cfg, out_dir: Union[str, Path], *, command: Optional[str] = None) -> Path:
    """Copy the finished base model of ``cfg`` into ``out_dir`` with its manifest (atomically: a temporary
    folder renamed into place)."""
    from greencode.paths import RunPaths

    paths = RunPaths.from_config(cfg)
    src = paths.base_model
    stage, size_mb, corpus = _shippable(cfg, paths)
    train = corpus["file_hashes"]["train"]
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _copy_files(src, tmp, train)
        write_json(tmp / MANIFEST, _manifest(cfg, src, tmp, stage, corpus, size_mb, command))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("shipped %s (%.1f MB, %d training files listed) -> %s", src, size_mb, len(train), out)
    return out


def heldout_quality(cfg, model_dir: Union[str, Path], max_tokens: int = 65536) -> dict:
    """Per-layer next-token accuracy and cross-entropy of a model on ``max_tokens`` validation
    tokens of the run's corpus (packed as training packs them)."""
    import math

    import torch

    from greencode.data import load_corpus, load_tokenizer
    from greencode.data.corpus import text_sep
    from greencode.models import EarlyExitModel
    from greencode.training.report import layer_quality

    tokenizer = load_tokenizer(cfg)
    held = pack_split(load_corpus(cfg)["validation"], tokenizer, cfg.pretrain.seq_len, max_tokens=max_tokens,
                      seed=cfg.seed, desc="packing held-out", sep=text_sep(cfg))
    model = EarlyExitModel.from_run_config(cfg, model_dir, dtype=torch.float32).eval()
    q = layer_quality(model, held, cfg.pretrain.batch_size)
    final = q["per_layer"][-1]
    return {"split": "validation", "tokens": q["tokens"], "final_accuracy": q["final_accuracy"],
            "final_ce_loss": final["ce_loss"], "final_perplexity": math.exp(final["ce_loss"]),
            "per_layer": q["per_layer"]}


def read_train_files(base_dir: Union[str, Path]) -> Optional[tuple[set[str], set[str]]]:
    """(paths, sha1s) of the files a shipped base was trained on; None for other models."""
    p = Path(base_dir) / TRAIN_FILES
    if not p.is_file():
        return None
    paths, hashes = set(), set()
    with gzip.open(p, "rt", encoding="utf-8") as f:
        next(f, None)
        for line in f:
            path, _, sha = line.rstrip("\n").partition("\t")
            paths.add(path)
            if sha:
                hashes.add(sha)
    return paths, hashes


def check_disjoint(base_dir: Union[str, Path, None], records: Iterable[dict], what: str) -> int:
    """Raise when any record (``path`` / ``sha1``) is among the shipped base's training
    files; returns the number of records checked (0 when the base lists no files)."""
    if not base_dir:
        return 0
    listed = read_train_files(base_dir)
    if listed is None:
        return 0
    paths, hashes = listed
    n, bad = 0, []
    for r in records:
        n += 1
        if r.get("path") in paths or (r.get("sha1") and r["sha1"] in hashes):
            bad.append(r.get("path"))
    if bad:
        raise ValueError(f"{len(bad)} {what} file(s) were in the base model's training data ({bad[:3]}...); "
                         f"the split must be disjoint from {base_dir}/{TRAIN_FILES}. Keep data.validation_fraction and "
                         "data.test_fraction equal to the base's (see its base_manifest.json) and the same source")
    return n


def check_split_disjoint(cfg, split: str) -> int:
    """``check_disjoint`` for a whole split of the run's corpus (its manifest's file list)
    against ``model.base``; 0 when either side lists no files."""
    from greencode.data.corpus import read_manifest
    from greencode.paths import RunPaths

    manifest = read_manifest(RunPaths.from_config(cfg).corpus) or {}
    files = (manifest.get("file_hashes") or {}).get(split)
    if not files or not cfg.model.base:
        return 0
    return check_disjoint(cfg.model.base, ({"path": p, "sha1": h} for p, h in files), f"{split}-split")
