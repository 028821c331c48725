"""Hub loader: fails at once offline with the local-corpus fix; standardizes CodeXGLUE
records (PY150 validation carved by path hash). scripts/prepare_data.py end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from greencode.config import ConfigError, config_from_dict
from greencode.data import HubUnavailableError, load_hub_corpus
from greencode.data import hub as hub_mod
from greencode.data.local import split_of

REPO = Path(__file__).resolve().parents[1]


def hub_cfg(tmp_path, language="python", **data):
    return config_from_dict({"name": "h", "run_dir": str(tmp_path / "run"),
                             "data": {"source": "hub", "language": language, **data}})


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update({"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_CACHE": str(tmp_path / "hf_home" / "datasets"),
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def test_offline_fails_at_once_with_the_local_fix(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: a clear error, no retry loop (timeout is a guard)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
         "data.source=hub", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env=_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
        cwd=REPO)
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert "google/code_x_glue_cc_code_completion_token" in err
    assert "data.source=local" in err and "data.local_path" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "corpus").exists()


def test_unreachable_hub_without_cache_raises_clear_error(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(hub_mod, "_probe", lambda hub_id: "ConnectError: [Errno -2] Name or service not known")

    def fake_load(hub_id, language, offline):
        calls.append(offline)
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(hub_mod, "_load_raw", fake_load)
    with pytest.raises(HubUnavailableError, match="Name or service not known") as ei:
        load_hub_corpus(hub_cfg(tmp_path))
    assert calls == [True]  # only the cache was tried, never the network retry loop
    assert isinstance(ei.value, ConfigError) and "data.source=local" in str(ei.value)


def test_missing_dataset_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_mod, "hub_offline", lambda: False)

    def probe(hub_id):
        raise ConfigError(f"data.hub_id={hub_id!r} is not a dataset on the hub")

    monkeypatch.setattr(hub_mod, "_probe", probe)
    with pytest.raises(ConfigError, match="hub_id"):
        load_hub_corpus(hub_cfg(tmp_path, hub_id="nobody/nothing"))


def _fake_py150(n_train=400, n_test=30):
    def split(n, offset):
        return datasets.Dataset.from_dict({
            "id": list(range(n)),
            "path": [f"repo{(i + offset) % 7}/mod{i + offset}.py\n" for i in range(n)],
            "code": [["<s>", "x", "=", "<NUM_LIT>", "<EOL>", f"y{i}", "</s>"] for i in range(n)],
        })
    return datasets.DatasetDict({"train": split(n_train, 0), "test": split(n_test, 10_000)})


def test_py150_records_standardized_and_validation_carved(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(hub_mod, "_probe", lambda hub_id: None)
    monkeypatch.setattr(hub_mod, "_load_raw", lambda hub_id, language, offline: _fake_py150())
    dsd = load_hub_corpus(hub_cfg(tmp_path, validation_fraction=0.1))
    assert list(dsd) == ["train", "validation", "test"]
    assert len(dsd["train"]) + len(dsd["validation"]) == 400 and len(dsd["test"]) == 30
    assert 20 <= len(dsd["validation"]) <= 65
    for r in dsd["validation"]:
        assert split_of(r["path"], 0.1, 0.0) == "validation"
    r = dsd["train"][0]
    assert isinstance(r["id"], str) and not r["path"].endswith("\n")
    assert r["num_tokens"] == 5 and r["language"] == "python" and r["code"][0] == "<s>"
    # deterministic
    again = load_hub_corpus(hub_cfg(tmp_path, validation_fraction=0.1))
    assert again["validation"]["path"] == dsd["validation"]["path"]


def test_java_records_get_synthetic_paths_and_max_files(tmp_path, monkeypatch):
    def split(n):
        return datasets.Dataset.from_dict({"id": list(range(n)), "code": [["<s>", "int", "x", ";", "</s>"]] * n})
    raw = datasets.DatasetDict({"train": split(9), "validation": split(4), "test": split(5)})
    monkeypatch.setattr(hub_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(hub_mod, "_probe", lambda hub_id: None)
    monkeypatch.setattr(hub_mod, "_load_raw", lambda hub_id, language, offline: raw)
    dsd = load_hub_corpus(hub_cfg(tmp_path, language="java", max_files=3))
    assert {k: len(v) for k, v in dsd.items()} == {"train": 3, "validation": 3, "test": 3}
    assert dsd["test"][2]["path"] == "java/test/2" and dsd["test"][2]["id"] == "2"


def test_prepare_corpus_from_hub_writes_manifest(tmp_path, monkeypatch):
    from greencode.data import load_corpus, prepare_corpus

    monkeypatch.setattr(hub_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(hub_mod, "_probe", lambda hub_id: None)
    monkeypatch.setattr(hub_mod, "_load_raw", lambda hub_id, language, offline: _fake_py150(60, 10))
    cfg = hub_cfg(tmp_path)
    corpus_dir, m = prepare_corpus(cfg, progress=False)
    assert m["source"] == "hub" and m["source_path"] == "google/code_x_glue_cc_code_completion_token"
    assert sum(s["records"] for s in m["splits"].values()) == 70 and m["tokens_total"] == 70 * 5
    assert len(load_corpus(cfg)["test"]) == 10
    # unchanged settings: reused without touching the hub
    monkeypatch.setattr(hub_mod, "_load_raw", lambda *a, **k: pytest.fail("should have been reused"))
    assert prepare_corpus(cfg, progress=False)[1]["content_hash"] == m["content_hash"]


def test_prepare_data_script_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
           "data.max_files=12", "tokenizer.vocab_size=300", f"run_dir={run}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=_env(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "train" in first.stdout and "records" in first.stdout
    manifest = json.loads((run / "corpus" / "manifest.json").read_text())
    assert manifest["files"]["used"] == 12 and manifest["language"] == "python"
    assert (run / "corpus" / "dataset_dict.json").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "tokenizer" / "tokenizer_config.json").is_file()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=_env(tmp_path))
    assert second.returncode == 0 and "reusing" in second.stderr
    assert json.loads((run / "corpus" / "manifest.json").read_text())["content_hash"] == manifest["content_hash"]
