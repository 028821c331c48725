"""The shipped base model of the embedded default (assets/default-base): it loads, matches its
manifest, and was trained on files disjoint from the demo's validation and test splits."""

import gzip
import hashlib
import json
import sysconfig
from pathlib import Path

import pytest

from greencode.config import load_config
from greencode.data.local import path_hash, split_of
from greencode.training.shipping import MANIFEST, TRAIN_FILES, sha256_file

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "default-base"
DEFAULT = ROOT / "configs" / "default.yaml"
PLACEHOLDERS = ("<STR_LIT", "<NUM_LIT", "<CHAR_LIT", "<EOL>")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((BASE / MANIFEST).read_text())


def test_manifest_records_how_the_base_was_made(manifest):
    for key in ("command", "config", "data", "tokens_seen", "wall_time_s", "final_train_loss", "eval_loss",
                "weights_sha256", "pretrain_run", "num_parameters"):
        assert manifest.get(key) is not None, key
    run = manifest["pretrain_run"]
    for key in ("git_commit", "versions", "hardware"):
        assert run.get(key), key
    assert manifest["data"]["content_hash"] and manifest["data"]["literal_mode"] == "source"
    assert manifest["tokens_seen"] >= 5_000_000
    cfg = manifest["config"]
    assert cfg["pretrain"]["early_exit"]["enabled"]  # the demo's base is the early-exit-ready one
    weights = BASE / "model.safetensors"
    assert weights.stat().st_size <= 60e6
    assert sha256_file(weights) == manifest["weights_sha256"]


def test_the_default_config_loads_the_shipped_base_and_tokenizer(manifest):
    from transformers import AutoTokenizer

    from greencode.models import EarlyExitModel

    cfg = load_config(DEFAULT)
    assert Path(cfg.model.base).resolve() == BASE.resolve() and Path(cfg.tokenizer.path).resolve() == BASE.resolve()
    model = EarlyExitModel.from_run_config(cfg, cfg.model.base)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert model.num_layers == manifest["config"]["model"]["num_layers"] and model.exit_layers == [1, 2, 3, 4, 5, 7, 9]
    tok = AutoTokenizer.from_pretrained(str(BASE))
    assert not any(p in t for t in tok.get_vocab() for p in PLACEHOLDERS)
    text = "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return"
    assert tok.decode(tok(text)["input_ids"]) == text


def _train_files():
    with gzip.open(BASE / TRAIN_FILES, "rt", encoding="utf-8") as f:
        next(f)
        return [line.rstrip("\n").split("\t") for line in f]


def test_training_files_are_disjoint_from_the_demo_test_split_by_path_and_content(manifest):
    cfg = load_config(DEFAULT)
    d = manifest["data"]
    # the demo splits with the base's fractions, so its held-out files were never trained on
    assert (cfg.data.validation_fraction, cfg.data.test_fraction) == (d["validation_fraction"], d["test_fraction"])
    train = _train_files()
    assert len(train) == d["train_file_count"] > 10_000
    assert all(split_of(p, d["validation_fraction"], d["test_fraction"]) == "train" for p, _ in train)
    train_paths = {p for p, _ in train}
    first_path_of = {}
    for p, h in train:
        first_path_of.setdefault(h, p)
    site = Path(sysconfig.get_paths()["purelib"])
    held_out = [p for p in site.rglob("*.py")
                if split_of(p.relative_to(site).as_posix(), d["validation_fraction"], d["test_fraction"]) != "train"]
    assert len(held_out) > 500
    same_content = 0
    for p in held_out:
        rel = p.relative_to(site).as_posix()
        assert rel not in train_paths
        digest = hashlib.sha1(p.read_bytes()).hexdigest()
        if digest in first_path_of:
            # an identical copy (a vendored file) is kept once, by the file examined first: a held-out copy
            # can only exist on disk if the trained copy came first, and is then skipped as a duplicate
            assert path_hash(first_path_of[digest], "order") < path_hash(rel, "order"), rel
            same_content += 1
    assert same_content < len(held_out) // 10
