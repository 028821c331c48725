"""Figures from small synthetic result folders that follow the real formats.

The evaluation folder is written by the evaluator's own writer (greencode.eval.summary.write_results,
with the real metrics), the RL histogram / exit accuracy by the bank's and the policy analysis' own
functions, the episode curve with the columns rl.train writes.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from greencode.config import Config, RewardConfig
from greencode.eval.summary import SHARD_FORMAT, write_results
from greencode.plots import (ENERGY_NOTE, FIGURES, NAMES, MissingInput, pareto_front, plot_accuracy_by_method,
                             plot_agent_exit_accuracy, plot_agent_overhead, plot_all, plot_cost_by_method,
                             plot_exit_report, plot_finetune_loss, plot_fixed_exits, plot_lite_weights,
                             plot_optimal_exits, plot_pareto, plot_ppo_reward, plot_pretrain_loss)
from greencode.plots import inputs as I
from greencode.plots.common import method_label
from greencode.runinfo import run_metadata
from greencode.utils import write_json

NUM_LAYERS = 8
EXITS = [1, 2, 3, 5]
FINAL = NUM_LAYERS - 1
REFERENCE = "def foo ( x ) : <EOL> return x + 1 <EOL>".split()

# method id -> (family, param, share of reference tokens kept, mean exit layer, latency scale)
METHODS = {
    "base": ("base", None, 0.5, FINAL, 1.0),
    "full_hf": ("full_hf", None, 0.9, FINAL, 1.0),
    "full": ("full", None, 0.9, FINAL, 1.02),
    **{f"fixed@{L}": ("fixed", L, 0.2 + 0.12 * i, L, 0.3 + 0.15 * i) for i, L in enumerate(EXITS)},
    "confidence@0.5": ("confidence", 0.5, 0.6, 3, 0.6),
    "confidence@0.9": ("confidence", 0.9, 0.8, 5, 0.85),
    "entropy@1": ("entropy", 1.0, 0.65, 3, 0.65),
    "oracle": ("oracle", None, 0.9, 3, 1.1),
    "gc@0.5": ("gc", 0.5, 0.7, 3, 0.55),
    "gc@0.9": ("gc", 0.9, 0.85, 5, 0.75),
    "hf_early_exit@2": ("hf_early_exit", 2, 0.9, None, 1.3),
}


def _prediction(keep: float, rng: random.Random) -> str:
    return " ".join(t if rng.random() < keep else "y" for t in REFERENCE)


def _records(mid: str, n: int, energy: bool, rng: random.Random) -> list[dict]:
    fam, param, keep, layer, lat = METHODS[mid]
    recs = []
    for i in range(n):
        new = len(REFERENCE)
        exits = None if layer is None else [FINAL] + [layer] * (new - 1)
        steps = new - 1
        run = steps * (NUM_LAYERS if layer is None or fam in ("oracle",) else layer + 1)
        recs.append({
            "index": i, "id": f"s{i}", "prediction": _prediction(keep, rng), "reference": " ".join(REFERENCE),
            "new_tokens": new, "tokens": list(range(new)), "exit_layers": exits, "finish_reason": "length",
            "prompt_tokens": 20, "latency_s": lat * (0.1 + 0.01 * i), "energy_j": (lat * 5.0 + i) if energy else None,
            "gpu_energy_j": None, "cpu_energy_j": None,
            "energy_note": None if energy else "energy not measured: no GPU / RAPL; it is null, not estimated",
            "counters": ({"controller_time_s": 0.002 * lat if fam == "gc" else 0.0, "decode_time_s": lat * 0.08}
                         if fam not in ("base", "full_hf", "hf_early_exit") else None),
            "cost": {"decode_steps": steps, "layers_run": run, "layer_steps_full": steps * NUM_LAYERS,
                     "macs_done": run * 100 + steps * 50, "macs_full": steps * (NUM_LAYERS * 100 + 50)},
        })
    return recs


def write_eval(results: Path, *, energy: bool = False, n: int = 3, methods=None, seed: int = 0) -> Path:
    """results/<name>/eval written by the evaluator's own writer (real metrics)."""
    rng = random.Random(seed)
    cfg = Config(name="synthetic")
    ids = list(methods or METHODS)
    merged = {
        "format": SHARD_FORMAT, "rank": None, "world_size": 1,
        "meta": {"language": "python", "num_samples": n, "max_new_tokens": len(REFERENCE), "num_layers": NUM_LAYERS,
                 "final_layer": FINAL, "exit_layers": EXITS, "device": "cpu",
                 "energy_source": "zeus:rapl" if energy else "time-only",
                 "model": {"family": "llama", "num_layers": NUM_LAYERS, "hidden_size": 64, "vocab_size": 97,
                           "exit_layers": EXITS, "weights_sha256": "0" * 16, "name_or_path": None}, "notes": []},
        "methods": {m: {"spec": {"id": m, "family": METHODS[m][0], "description": m,
                                 **({} if METHODS[m][1] is None else
                                    {("layer" if METHODS[m][0] in ("fixed", "hf_early_exit") else "threshold"):
                                     METHODS[m][1]})},
                        "records": _records(m, n, energy, rng)} for m in ids},
        "skipped": [],
        "overhead_ab": ({"threshold": 0.9, "records": [
            {"index": i, "decode_time_s_full": 0.08, "decode_time_s_policy": 0.084 + 0.001 * i,
             "controller_time_s": 0.003, "new_tokens": 10, "same_tokens": True} for i in range(n)]}
            if any(METHODS[m][0] == "gc" for m in ids) else None),
    }
    return write_results(merged, results / "eval", run_metadata(cfg, stage="evaluate"))


def write_rl(results: Path) -> Path:
    """results/<name>/rl as rl.train writes it: analysis.json (bank histogram + exit metrics from the
    real functions) and episode_rewards.csv."""
    from greencode.rl.bank import TrajectoryBank
    from greencode.rl.policy import exit_metrics

    rng = np.random.default_rng(0)
    n_tok, e = 60, len(EXITS)
    final_pred = rng.integers(0, 50, size=n_tok)
    preds = np.stack([np.where(rng.random(n_tok) < 0.3 + 0.15 * j, final_pred, 99) for j in range(e)]
                     + [final_pred], axis=1)
    bank = TrajectoryBank.from_arrays(rng.normal(size=(n_tok, e, 8)), preds, np.array([0, 20, 40, 60]),
                                      heldout=np.array([False, False, True]),
                                      manifest={"exit_layers": EXITS, "final_layer": FINAL})
    train, held = bank.sequences(heldout=False), bank.sequences(heldout=True)
    cfg = Config(name="synthetic")
    reward = RewardConfig()
    thresholds = []
    for t in (0.5, 0.9):
        ep = np.where(rng.random(held.num_tokens) < t, e, rng.integers(0, e, size=held.num_tokens))
        thresholds.append({"threshold": t, "temperature": 1.0, **exit_metrics(ep.astype(np.int64), held, reward)})
    analysis = {
        "meta": run_metadata(cfg, stage="rl"),
        "bank": {"num_sequences": 3, "num_tokens": n_tok, "n_exit_points": e, "hidden_size": 8,
                 "exit_layers": EXITS, "final_layer": FINAL, "observation": "normed", "heldout_sequences": 1},
        "optimal_exit_histogram": {"train": train.l_opt_histogram(), "heldout": held.l_opt_histogram()},
        "exit_accuracy": {"bank": "heldout", "temperature": 1.0, "thresholds": thresholds,
                          "oracle": exit_metrics(held.l_opt.astype(np.int64), held, reward),
                          "full_model": exit_metrics(np.full(held.num_tokens, e, dtype=np.int64), held, reward)},
        "training": {"total_timesteps": 4000},
    }
    write_json(results / "rl" / "analysis.json", analysis)
    rows = [{"episode": k + 1, "timesteps": 6 * (k + 1) * 5, "episodes_in_bin": 1,
             "mean_step_reward": float(-0.5 + 0.8 * (1 - np.exp(-k / 15)) + 0.05 * rng.normal()),
             "episode_return": 0.0, "episode_length": 6.0} for k in range(60)]
    with open(results / "rl" / "episode_rewards.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return results / "rl"


def _write_loss_log(trainer_dir: Path, exit_points: list[int], steps: int = 40) -> None:
    """The loss CSV written by the training stage's own callback (long format, train + eval rows)."""
    from transformers import TrainerState

    from greencode.training.common import CsvLogCallback

    cb = CsvLogCallback(trainer_dir / "train_log.csv", exit_points, tokens_per_step=256)
    state = TrainerState()
    state.global_step = 0
    cb.on_train_begin(None, state, None)
    for s in range(2, steps + 1, 2):
        state.global_step = s
        base = 6.0 * np.exp(-s / 15) + 2.0
        per_exit = {f"loss_exit_{e}": base + 1.5 - 0.3 * i for i, e in enumerate(exit_points)}
        cb.on_log(None, state, None, logs={"loss": base, "learning_rate": 1e-3, "grad_norm": 1.0, "epoch": s / steps,
                                           **per_exit})
        if s % 10 == 0:
            cb.on_log(None, state, None, logs={"eval_loss": base + 0.1, "epoch": s / steps,
                                               **{f"eval_loss_exit_{e}": base + 1.6 - 0.3 * i
                                                  for i, e in enumerate(exit_points)}})


def write_training(results: Path) -> None:
    """pretrain/ and finetune/ as greencode.training writes them (its CSV callback and
    write_stage_results) and finetune/exit_report.json from its layer_quality on a tiny model."""
    import datasets
    import torch

    from greencode.config import ModelConfig
    from greencode.models import EarlyExitModel, lite_weights
    from greencode.training.common import write_stage_results
    from greencode.training.report import layer_quality

    cfg = Config(name="synthetic")
    cfg.model.num_layers = NUM_LAYERS
    cfg.model.exit_layers = EXITS
    points = EXITS + [FINAL]
    for stage, exits in (("pretrain", []), ("finetune", points)):
        trainer_dir = results.parent / f".trainer_{stage}"
        _write_loss_log(trainer_dir, exits)
        summary = {"stage": stage, "num_layers": NUM_LAYERS}
        if stage == "finetune":
            summary.update(exit_points=points, final_layer=FINAL, lite_weights=lite_weights(EXITS, NUM_LAYERS),
                           weights_scheme="geometric")
        write_stage_results(results / stage, trainer_dir, cfg, summary)
    torch.manual_seed(0)
    mc = ModelConfig(family="llama", hidden_size=32, num_layers=NUM_LAYERS, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=64, exit_layers=EXITS)
    model = EarlyExitModel.from_config(mc, vocab_size=50, eos_token_id=2, bos_token_id=1, pad_token_id=0).eval()
    ids = torch.randint(3, 50, (4, 16)).tolist()
    held_out = datasets.Dataset.from_dict({"input_ids": ids})
    quality = layer_quality(model, held_out, batch_size=2)
    report = {"split": "validation", "tokens": quality["tokens"], "seq_len": 16,
              "exit_points": [r["layer"] for r in quality["per_exit"]],
              "models": {"base": quality, "finetuned": quality}, "meta": run_metadata(cfg, stage="exit_report")}
    write_json(results / "finetune" / "exit_report.json", report)


def write_calibrated(results: Path) -> Path:
    """eval/calibrated.json as the evaluator writes it (targets_table over the summary rows)."""
    from greencode.eval.calibration import targets_table
    from greencode.eval.summary import summary_table
    from greencode.utils import write_json

    cal = {"targets": [0.02, 0.1], "delta": 0.1, "families": {
        "gc": {"targets": {"0.02": {"target": 0.02, "chosen": "gc@0.9", "calibration_disagreement": 0.01},
                           "0.1": {"target": 0.1, "chosen": "gc@0.5", "calibration_disagreement": 0.06}}},
        "confidence": {"targets": {"0.02": {"target": 0.02, "chosen": None, "calibration_disagreement": None},
                                   "0.1": {"target": 0.1, "chosen": "confidence@0.9",
                                           "calibration_disagreement": 0.05}}}}}
    cal["criteria"] = {"sequence": {"families": cal["families"]}, "quality": {"families": cal["families"]}}
    table = dict(targets_table(cal, summary_table(results / "eval")), split="test")
    return write_json(results / "eval" / "calibrated.json", table)


@pytest.fixture(scope="module")
def full_results(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results") / "synthetic"
    write_eval(results)
    write_calibrated(results)
    write_rl(results)
    write_training(results)
    write_signals(results)
    return results


def write_signals(results: Path) -> Path:
    """The committed exit-signal analysis (results/default/signals/auc.json) as this run's."""
    import shutil

    out = results / "signals"
    out.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(Path(__file__).resolve().parents[1] / "results" / "default" / "signals" / "auc.json",
                                out / "auc.json"))


@pytest.fixture(scope="module")
def all_figures(full_results, tmp_path_factory) -> tuple[Path, list[Path]]:
    figs = tmp_path_factory.mktemp("figures")
    return figs, plot_all(full_results, figs)


@pytest.fixture
def captured(monkeypatch):
    """Figures handed to save_figure, without writing them (for checks of the plotted data)."""
    from greencode.plots import figures

    figs: list = []

    def fake_save(fig, figures_dir, name, dpi=150):
        figs.append(fig)
        return []

    monkeypatch.setattr(figures, "save_figure", fake_save)
    return figs


def _texts(fig) -> list[str]:
    out = [t.get_text() for ax in fig.axes for t in ax.texts]
    out += [ax.get_xlabel() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
    out += [ax.get_title() for ax in fig.axes]
    return out


@pytest.mark.parametrize("key", list(FIGURES))
def test_every_figure_is_written(all_figures, key):
    figs, files = all_figures
    name = NAMES[key]
    mine = [p for p in files if p.stem == name]
    assert [p.name for p in mine] == [f"{name}.png", f"{name}.pdf"]
    png, pdf = mine
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.stat().st_size > 10_000 and pdf.stat().st_size > 5_000
    from matplotlib.image import imread

    img = imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas
    assert not list(figs.glob(f".{name}*"))  # atomic writes: no temp file left


def test_plot_all_index(all_figures):
    figs, files = all_figures
    assert {p.name for p in files} == {f"{n}.{ext}" for n in NAMES.values() for ext in ("png", "pdf")}
    index = json.loads((figs / "index.json").read_text())
    assert index["skipped"] == {}
    assert set(index["figures"]) == set(FIGURES)
    assert index["run_metadata"]["git_commit"] is None or isinstance(index["run_metadata"]["git_commit"], str)


def test_the_signals_figure_is_drawn_with_the_others_and_records_its_input(all_figures):
    figs, files = all_figures
    assert {p.name for p in files} >= {"signals_auc.png", "signals_auc.pdf"}
    index = json.loads((figs / "index.json").read_text())
    assert index["figures"]["signals_auc"] == ["signals_auc.png", "signals_auc.pdf"]
    prov = index["provenance"]["signals_auc"]
    # a results folder outside the repository is recorded as <outside>/auc.json (utils.portable_path)
    assert [Path(p).as_posix().endswith("auc.json") for p in prov["inputs"]] == [True], prov
    assert prov["weights"]  # the weights the analysis names


def test_partial_results_without_rl_still_plot_the_rest(full_results, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(full_results, partial)
    shutil.rmtree(partial / "rl")
    figs = tmp_path / "figs"
    # a stale RL figure from an earlier run must not survive as if it were current, nor a drawn figure's
    # file in a format no longer asked for
    figs.mkdir()
    (figs / f"{NAMES['ppo_reward']}.png").write_bytes(b"old")
    (figs / f"{NAMES['pareto']}.pdf").write_bytes(b"old")
    files = plot_all(partial, figs, formats=["svg"], dpi=40)  # the config's figures section
    expected = set(FIGURES) - {"ppo_reward", "optimal_exits", "agent_exit_accuracy"}
    assert {p.name for p in files} == {f"{NAMES[k]}.svg" for k in expected}
    assert all(p.read_text().lstrip().startswith("<?xml") for p in files)
    assert sorted(p.name for p in figs.iterdir() if p.suffix != ".svg") == ["index.json"]
    index = json.loads((figs / "index.json").read_text())
    assert set(index["skipped"]) == {"ppo_reward", "optimal_exits", "agent_exit_accuracy"}
    assert "episode_rewards.csv" in index["skipped"]["ppo_reward"]


def test_output_formats_choose_the_files_and_the_resolution(tmp_path):
    from matplotlib.image import imread

    from greencode.plots.common import output_formats

    r = tmp_path / "r"
    write_eval(r, methods=["full", "fixed@2"], n=2)
    with output_formats(["png"], 50):
        low = plot_fixed_exits(r, tmp_path / "low")
    with output_formats(["png", "svg"], 150):
        std = plot_fixed_exits(r, tmp_path / "std")
    assert [p.suffix for p in low] == [".png"] and [p.suffix for p in std] == [".png", ".svg"]
    (h, w), (h3, w3) = imread(low[0]).shape[:2], imread(std[0]).shape[:2]
    assert abs(w3 / w - 3.0) < 0.1 and abs(h3 / h - 3.0) < 0.1, ((w, h), (w3, h3))
    assert plot_fixed_exits(r, tmp_path / "default")[0].suffix == ".png"  # outside the block: png and pdf again
    assert sorted(p.suffix for p in (tmp_path / "default").iterdir()) == [".pdf", ".png"]


def test_empty_and_malformed_results_never_crash(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_all(empty, tmp_path / "f1") == []
    index = json.loads((tmp_path / "f1" / "index.json").read_text())
    assert set(index["skipped"]) == set(FIGURES)
    bad = tmp_path / "bad"
    (bad / "eval").mkdir(parents=True)
    (bad / "eval" / "summary.json").write_text("{not json")
    (bad / "rl").mkdir()
    (bad / "rl" / "episode_rewards.csv").write_text("")  # no finished episode
    assert plot_all(bad, tmp_path / "f2") == []
    index = json.loads((tmp_path / "f2" / "index.json").read_text())
    assert "not valid JSON" in index["skipped"]["pareto"]
    assert "no finished episode" in index["skipped"]["ppo_reward"]


def test_missing_results_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_all(tmp_path / "nope", tmp_path / "figs")


def test_single_figure_functions_raise_missing_input(tmp_path):
    for fn in (plot_fixed_exits, plot_ppo_reward, plot_optimal_exits, plot_finetune_loss, plot_exit_report,
               plot_lite_weights, plot_pretrain_loss, plot_agent_exit_accuracy, plot_accuracy_by_method,
               plot_cost_by_method, plot_agent_overhead, plot_pareto):
        with pytest.raises(MissingInput):
            fn(tmp_path, tmp_path / "figs")
    assert not (tmp_path / "figs").exists()


def test_no_gc_rows_means_no_overhead_figure(tmp_path):
    r = tmp_path / "r"
    write_eval(r, methods=["full", "fixed@2"])
    with pytest.raises(MissingInput, match="no gc@T rows"):
        plot_agent_overhead(r, tmp_path / "figs")


def test_energy_null_is_a_note_not_zeros(tmp_path, captured):
    """With energy null the energy panels show the note; with energy measured they plot joules."""
    r1 = tmp_path / "time_only"
    write_eval(r1, energy=False, methods=["full", "gc@0.9", "fixed@2"])
    plot_cost_by_method(r1, tmp_path)
    plot_pareto(r1, tmp_path)
    plot_fixed_exits(r1, tmp_path)
    for fig in captured:
        texts = _texts(fig)
        assert any(ENERGY_NOTE in t for t in texts)
        assert "energy (J per sample)" not in texts
    assert "latency (s per sample)" in _texts(captured[1])
    cost_fig = captured[0]
    energy_ax = next(ax for ax in cost_fig.axes if ax.get_title() == "Energy")
    assert not energy_ax.patches  # no bars (no zeros) in the energy panel
    captured.clear()
    r2 = tmp_path / "energy"
    write_eval(r2, energy=True, methods=["full", "gc@0.9", "fixed@2"])
    plot_cost_by_method(r2, tmp_path)
    plot_pareto(r2, tmp_path)
    plot_fixed_exits(r2, tmp_path)
    rows = {r["id"]: r for r in I.load_summary(r2)["rows"]}
    for fig in captured:
        texts = _texts(fig)
        assert not any(ENERGY_NOTE in t for t in texts)
        assert any(t.startswith("energy (J per sample)") for t in texts)
    energy_ax = next(ax for ax in captured[0].axes if ax.get_title() == "Energy")
    widths = sorted(p.get_width() for p in energy_ax.patches)
    # fixed exits have their own figure and are left out of the per-method comparison by default
    np.testing.assert_allclose(widths, sorted(r["energy_j"] for m, r in rows.items() if m != "fixed@2"))


def test_fixed_exit_figure_plots_the_summary_values(full_results, captured):
    """The accuracy lines of Fig. 1 hold exactly the summary's fixed@L values in percent (0-1 metrics
    x 100, 0-100 metrics as they are) and the reference row at the final layer."""
    plot_fixed_exits(full_results, "unused")
    lines = {ln.get_label(): ln for ln in captured[0].axes[0].get_lines()}
    rows = {r["id"]: r for r in I.load_summary(full_results)["rows"]}
    order = [f"fixed@{L}" for L in EXITS] + ["full"]
    assert list(lines["CodeBLEU"].get_xdata()) == EXITS + [FINAL]
    np.testing.assert_allclose(lines["CodeBLEU"].get_ydata(), [100 * rows[m]["codebleu"] for m in order])
    np.testing.assert_allclose(lines["BLEU"].get_ydata(), [rows[m]["bleu"] for m in order])
    lat = captured[0].axes[1].get_lines()[0]
    np.testing.assert_allclose(lat.get_ydata(), [rows[m]["latency_s"] for m in order])


def test_lite_weights_figure_uses_the_configured_weights(full_results, captured):
    from greencode.models import lite_weights

    plot_lite_weights(full_results, "unused")
    heights = [p.get_height() for p in captured[0].axes[0].patches]
    np.testing.assert_allclose(heights, lite_weights(EXITS, NUM_LAYERS))
    assert I.model_geometry(full_results)[:2] == (NUM_LAYERS, EXITS)


def test_lite_weights_follow_the_recorded_config(tmp_path, captured):
    """Without the training stage's record, the weights come from the recorded config (uniform
    here) and the evaluated model's exit layers: the figure is not hard-wired."""
    r = tmp_path / "r"
    write_eval(r, methods=["full"])
    summary = json.loads((r / "eval" / "summary.json").read_text())
    summary["run_metadata"]["config"]["finetune"]["weights"] = "uniform"
    (r / "eval" / "summary.json").write_text(json.dumps(summary))
    plot_lite_weights(r, "unused")
    np.testing.assert_allclose([p.get_height() for p in captured[0].axes[0].patches], [0.2] * 5)
    assert "8-layer model" in captured[0].axes[0].get_title()


def test_finetune_loss_reads_the_training_csv(full_results, captured):
    """Train rows and eval rows of the long-format CSV go to their own lines, per exit too."""
    plot_finetune_loss(full_results, "unused")
    total_ax, exit_ax = captured[0].axes[:2]
    lines = {ln.get_label(): ln for ln in total_ax.get_lines()}
    train, val = lines["train (weighted total)"], lines["validation (weighted total)"]
    assert list(train.get_xdata()) == list(range(2, 41, 2))
    assert list(val.get_xdata()) == [10, 20, 30, 40]
    np.testing.assert_allclose(val.get_ydata(), [6.0 * np.exp(-s / 15) + 2.1 for s in (10, 20, 30, 40)], rtol=1e-5)
    labels = [ln.get_label() for ln in exit_ax.get_lines() if not ln.get_label().startswith("_")]
    assert labels == [f"layer {L}" for L in EXITS] + [f"layer {FINAL} (final)"]


def test_exit_report_plots_every_layer(full_results, captured):
    plot_exit_report(full_results, "unused")
    report = I.load_exit_report(full_results)
    acc = [100 * r["accuracy"] for r in report["models"]["finetuned"]["per_layer"]]
    line = next(ln for ln in captured[0].axes[0].get_lines() if ln.get_label() == "LITE fine-tuned")
    assert list(line.get_xdata()) == list(range(NUM_LAYERS))
    np.testing.assert_allclose(line.get_ydata(), acc)


def test_pareto_plots_every_controller(full_results, captured):
    plot_pareto(full_results, "unused")
    ax = captured[0].axes[0]
    rows = I.load_summary(full_results)["rows"]
    plotted = {(round(float(x), 6), round(float(y), 6)) for ln in ax.get_lines() if ln.get_label() !=
               "Pareto front (deployable methods)" for x, y in zip(ln.get_xdata(), ln.get_ydata())}
    expect = {(round(100 * r["compute_ratio"], 6), round(100 * r["codebleu"], 6)) for r in rows}
    assert expect == plotted


def test_episode_rewards_follow_the_csv(full_results, captured):
    plot_ppo_reward(full_results, "unused")
    raw = captured[0].axes[0].get_lines()[0]
    rows = I.load_episode_rewards(full_results)
    np.testing.assert_allclose(raw.get_ydata(), [r["mean_step_reward"] for r in rows])
    np.testing.assert_allclose(raw.get_xdata(), [r["timesteps"] for r in rows])


def test_pareto_front():
    pts = [(1.0, 0.5), (0.5, 0.4), (0.8, 0.6), (0.6, 0.3), (1.2, 0.6)]
    assert pareto_front(pts) == [1, 2]  # (0.5, 0.4) then (0.8, 0.6); the rest are dominated


def test_loss_column_classification():
    cols = I.loss_columns(["step", "loss", "eval_loss", "loss_exit_3", "eval_loss_exit_3", "loss/layer_7",
                           "learning_rate", "epoch"])
    assert cols["train"] == "loss" and cols["eval"] == "eval_loss"
    assert cols["train_exits"] == {3: "loss_exit_3", 7: "loss/layer_7"}
    assert cols["eval_exits"] == {3: "eval_loss_exit_3"}


def test_method_labels():
    assert method_label({"id": "gc@0.9", "family": "gc", "param": 0.9}) == "GC T=0.9"
    assert method_label({"id": "fixed@3", "family": "fixed", "param": 3}) == "fixed layer 3"
    assert method_label({"id": "full", "family": "full", "param": None}) == "full (our loop)"


def test_calibrated_targets_figure_draws_the_table(full_results, captured):
    from greencode.plots import plot_calibrated_targets
    from greencode.eval.summary import summary_table

    plot_calibrated_targets(full_results, full_results)
    fig = captured[-1]
    bars = [p for p in fig.axes[0].patches]
    rows = {r["id"]: r for r in summary_table(full_results / "eval")}
    heights = sorted(round(b.get_height(), 6) for b in bars)
    expected = sorted(round(100 * v, 6) for v in (rows["gc@0.9"]["compute_ratio"], rows["gc@0.5"]["compute_ratio"],
                                                  rows["confidence@0.9"]["compute_ratio"], 1.0))  # 1.0: none certified
    assert heights == expected
    assert sum(1 for b in bars if b.get_hatch()) == 1  # confidence at 2%: nothing certified, drawn hatched
    assert len(fig.axes) == 4  # one row per fidelity criterion (sequence, quality)
