"""The exit-signal analysis: AUC by the rank formula against a hand-computed example, precision at
recall, and scripts/analyze_signals.py end to end on configs/smoke.yaml (a random model of the smoke
shape: the numbers mean nothing, the files and their shapes are checked)."""

import subprocess
import sys

import numpy as np
import pytest

from greencode.config import load_config
from greencode.eval.signal_quality import auc, default_out_dir, precision_at_recall, resolve_model
from greencode.utils import REPO_ROOT, read_json

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")


def test_auc_by_hand():
    # positives score 0.9, 0.4, 0.6; negatives 0.1, 0.4, 0.8. Pairs (pos > neg): 0.9 beats all 3; 0.4 beats 0.1,
    # ties 0.4 (1/2), loses to 0.8; 0.6 beats 0.1 and 0.4, loses to 0.8 -> (3 + 1.5 + 2) / 9
    scores = np.array([0.9, 0.1, 0.4, 0.4, 0.6, 0.8])
    labels = np.array([1, 0, 1, 0, 1, 0])
    assert auc(scores, labels) == pytest.approx(6.5 / 9)
    assert auc(-scores, labels) == pytest.approx(2.5 / 9)
    assert auc(np.ones(4), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert auc(scores, np.ones(6)) is None
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 7, 500).astype(float), rng.integers(0, 2, 500)
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_precision_at_recall_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.5])
    labels = np.array([1, 0, 1, 1, 0, 1])
    p = precision_at_recall(scores, labels, 0.5)  # 2 of 4 positives at threshold 0.7: 2 / 3
    assert p["threshold"] == 0.7 and p["recall"] == 0.5 and p["precision"] == pytest.approx(2 / 3)
    p = precision_at_recall(scores, labels, 0.8)  # the tie at 0.5 comes in whole: 4 / 6
    assert p["threshold"] == 0.5 and p["recall"] == 1.0 and p["precision"] == pytest.approx(4 / 6)
    assert p["exit_share"] == 1.0
    assert precision_at_recall(scores, np.zeros(6), 0.5) is None


def test_analyze_signals_script_on_smoke(tmp_path):
    import torch

    from greencode.data import load_tokenizer, prepare_data
    from greencode.models import EarlyExitModel

    root = tmp_path
    over = [f"run_dir={root / 'run'}", f"results_dir={root / 'results'}", f"figures_dir={root / 'figures'}",
            "data.validation_fraction=0.3"]
    cfg = load_config(SMOKE, over)
    prepare_data(cfg)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = EarlyExitModel.from_config(cfg.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "analyze_signals.py"), "--config", SMOKE, *over,
                           "--model", str(model_dir), "--files", "8", "--window", "48", "--bigram-tokens", "5000",
                           "--small-tokens", "50"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a --model other than the run's own fine-tuned one: beside the run's result, never over it
    assert not (root / "results" / "signals" / "auc.json").exists()
    rep = read_json(root / "results" / "signals" / "given" / "auc.json")
    assert default_out_dir(cfg, "finetuned") == root / "results" / "signals"
    assert default_out_dir(cfg, "base (no LITE fine-tuned model in this run)") == root / "results" / "signals" / "base"
    exits = rep["exit_layers"]
    assert exits == list(model.exit_layers) and rep["split"] == "validation" and rep["model_kind"] == "given"
    assert rep["meta"]["model_dir"] and rep["meta"]["seed"] == cfg.seed and rep["meta"]["config_name"] == "smoke"
    assert rep["files"] == 8 and rep["train_files"] == 4 and rep["tokens"]["test"] > 0
    assert rep["tokens"]["small_train"] <= 50
    names = set(rep["signals"])
    for src in ("first_full", "prev_token", "bigram", "context"):
        assert {f"cheap[{src}]_max_prob", f"cheap[{src}]_margin", f"cheap[{src}]_lr", f"hidden+cheap[{src}]_lr"} <= names
    assert {"hidden_lr", "hidden_lr_4k", "full_max_prob", "full_margin", "saturation"} <= names
    for s in rep["signals"].values():
        assert len(s["auc_per_exit"]) == len(exits)
        assert all(a is None or 0.0 <= a <= 1.0 for a in s["auc_per_exit"])
        assert s["cost"]["macs_per_check"] > 0 and s["cost"]["layers_per_check"] > 0
        if s["auc_mean"] is not None and s["auc_mean_ci"] is not None:
            assert s["auc_mean_ci"][0] - 1e-9 <= s["auc_mean"] <= s["auc_mean_ci"][1] + 1e-9 or rep["test_files"] < 3
    assert rep["signals"]["hidden_lr"]["auc_mean_minus_reference"] is None  # the reference itself
    d = rep["signals"]["full_margin"]["auc_mean_minus_reference"]
    assert d is None or d["diff"] == pytest.approx(rep["signals"]["full_margin"]["auc_mean"]
                                                   - rep["signals"]["hidden_lr"]["auc_mean"], abs=2e-4)
    assert rep["bootstrap"]["unit"] == "file"
    full, cheap = rep["signals"]["full_max_prob"]["cost"], rep["signals"]["cheap[bigram]_max_prob"]["cost"]
    assert full["macs_per_check"] > 10 * cheap["macs_per_check"]
    md = (root / "results" / "signals" / "given" / "auc.md").read_text()
    assert "AUC per exit point" in md and "95% intervals: a bootstrap over test files" in md and "Precision at matched recall" in md and "Cost of each signal" in md
    assert (root / "figures" / "signals" / "given" / "signals_auc.png").stat().st_size > 0
    assert not (root / "figures" / "signals_auc.png").exists()
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        resolve_model(cfg, str(root / "nowhere"))
