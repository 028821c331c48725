"""Per-exit quality report: what LITE buys.

For the base model and the LITE-fine-tuned model, on held-out (validation) tokens, at
every layer (0-based; exit points flagged): next-token accuracy, agreement of the layer's
prediction with the final layer's prediction, and the mean cross-entropy, each decoded
through the model's own final norm and LM head. This is the data behind the paper's
motivation figure (early layers of a normal model decode nearly nothing) and its
alignment argument.

Written to ``results/<name>/finetune/exit_report.json`` and ``exit_report.csv``.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from greencode.data import load_corpus, load_tokenizer
from greencode.data.corpus import text_sep
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.provenance import weights_record
from greencode.runinfo import run_metadata
from greencode.stats import bootstrap_indices
from greencode.training import common
from greencode.training.data import pack_split
from greencode.training.finetuning import base_source
from greencode.training.lite import IGNORE_INDEX, exit_token_stats, shifted_targets
from greencode.utils import atomic_path, read_json, setup_torch, write_json, write_text

log = logging.getLogger(__name__)

CSV_COLUMNS = ["model", "layer", "is_exit_point", "accuracy", "agreement_with_final", "ce_loss",
               "accuracy_share_of_final", "tokens"]


@torch.no_grad()
def layer_quality(model, dataset, batch_size: int, device: Optional[torch.device] = None) -> dict:
    """Per-layer next-token accuracy / agreement with the final layer / mean CE of an
    :class:`EarlyExitModel` over a packed dataset (``input_ids`` rows). Every layer
    ``0..num_layers-1`` is measured; ``exit_points`` of ``model`` are flagged."""
    all_layers = EarlyExitModel(model.hf, list(range(model.num_layers - 1)))
    all_layers.eval()
    device = device or model.device
    tot: Optional[dict] = None
    for start in range(0, len(dataset), batch_size):
        ids = torch.as_tensor(dataset[start:start + batch_size]["input_ids"]).to(device)
        s = exit_token_stats(all_layers, ids)
        tot = s if tot is None else {k: tot[k] + s[k] for k in s}
    if tot is None:
        raise ValueError("the held-out set is empty; lower finetune.seq_len or enlarge the validation split")
    n = float(tot["tokens"])
    acc = (tot["correct"] / n).tolist()
    final_acc = acc[-1]
    exits = set(model.exit_points)
    layers = []
    for i, layer in enumerate(all_layers.exit_points):
        layers.append({"layer": layer, "is_exit_point": layer in exits, "accuracy": round(acc[i], 6),
                       "agreement_with_final": round(float(tot["agree"][i] / n), 6),
                       "ce_loss": round(float(tot["ce_sum"][i] / n), 6),
                       "accuracy_share_of_final": round(acc[i] / final_acc, 6) if final_acc > 0 else None})
    return {"tokens": int(n), "final_accuracy": round(final_acc, 6), "per_layer": layers,
            "per_exit": [r for r in layers if r["is_exit_point"]]}


def exit_report(cfg, base: Optional[str] = None, finetuned: Optional[str] = None) -> dict:
    """Measure base vs LITE-fine-tuned per-exit quality on the validation split (at most
    ``finetune.eval_max_tokens`` tokens in ``finetune.seq_len`` chunks) and write
    ``results/<name>/finetune/exit_report.{json,csv}``. Returns the report dict."""
    t0 = time.perf_counter()
    paths = RunPaths.from_config(cfg)
    device, dtype = setup_torch(cfg.hardware)
    finetuned = finetuned or str(paths.finetuned)
    base = base or base_source(cfg)
    src = cfg.source_path or "<config>"
    common.check_same_tokenizer(finetuned, cfg, f"python scripts/finetune.py --config {src} --force")
    if cfg.model.base is None:
        common.check_same_tokenizer(base, cfg, f"python scripts/pretrain.py --config {src}")
    ft = EarlyExitModel.from_pretrained(finetuned, device=device, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    stage = cfg.finetune

    held_out = pack_split(load_corpus(cfg)["validation"], tokenizer, stage.seq_len, max_tokens=stage.eval_max_tokens,
                          seed=cfg.seed, desc="packing held-out", sep=text_sep(cfg))
    models = {}
    models["finetuned"] = layer_quality(ft, held_out, stage.batch_size, device)
    ft_identity = ft.loaded_from
    del ft
    bm = EarlyExitModel.from_pretrained(base, exit_layers=models_exit_layers(models["finetuned"]), device=device,
                                        dtype=dtype)
    models["base"] = layer_quality(bm, held_out, stage.batch_size, device)

    weights = weights_record(ft_identity, bm)
    report = {
        "description": "per-layer next-token accuracy, agreement with the final layer's prediction and mean "
                       "cross-entropy on held-out (validation) tokens, decoded through the model's own final norm "
                       "and LM head; layers are 0-based, the final layer is the full model",
        "split": "validation", "tokens": models["finetuned"]["tokens"], "seq_len": stage.seq_len,
        "exit_points": [r["layer"] for r in models["finetuned"]["per_exit"]],
        "base_model": base, "finetuned_model": finetuned,
        "models": {"base": models["base"], "finetuned": models["finetuned"]},
        "time_s": round(time.perf_counter() - t0, 3),
        "meta": run_metadata(cfg, stage="exit_report", weights=weights),
    }
    out_dir = paths.results_finetune
    write_json(out_dir / "exit_report.json", report)
    with atomic_path(out_dir / "exit_report.csv") as tmp:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for name in ("base", "finetuned"):
                for r in report["models"][name]["per_layer"]:
                    w.writerow({"model": name, "tokens": report["tokens"], **r})
    ex = report["exit_points"][0]
    first = {n: report["models"][n]["per_exit"][0] for n in ("base", "finetuned")}
    log.info("exit report on %d held-out tokens in %.1f s: earliest exit (layer %d) accuracy base %.3f -> LITE %.3f "
             "(%.0f%% of the final layer's) -> %s", report["tokens"], report["time_s"], ex, first["base"]["accuracy"],
             first["finetuned"]["accuracy"], 100 * (first["finetuned"]["accuracy_share_of_final"] or 0),
             out_dir / "exit_report.json")
    return report


def models_exit_layers(quality: dict) -> list[int]:
    return [r["layer"] for r in quality["per_exit"]][:-1]


def format_report(report: dict) -> str:
    """A small text table: accuracy (share of final) and agreement per exit point."""
    lines = [f"{'exit layer':>10} | {'base acc':>8} {'agree':>6} | {'LITE acc':>8} {'share':>6} {'agree':>6}"]
    base = {r["layer"]: r for r in report["models"]["base"]["per_exit"]}
    for r in report["models"]["finetuned"]["per_exit"]:
        b = base.get(r["layer"], {})
        share = r["accuracy_share_of_final"]
        lines.append(f"{r['layer']:>10} | {b.get('accuracy', float('nan')):8.3f} "
                     f"{b.get('agreement_with_final', float('nan')):6.3f} | {r['accuracy']:8.3f} "
                     f"{(share if share is not None else float('nan')):6.2f} {r['agreement_with_final']:6.3f}")
    return "\n".join(lines)


def read_report(cfg) -> dict:
    return read_json(Path(RunPaths.from_config(cfg).results_finetune) / "exit_report.json")


# --------------------------------------------------------------------------- base ablation
@torch.no_grad()
def chunk_stats(model, dataset, batch_size: int) -> dict:
    """Per packed chunk and per layer (every layer, 0-based): correct next-token predictions and
    agreements with the final layer's prediction, plus the chunk's token count; numpy arrays
    ``correct`` / ``agree`` [chunks, layers] and ``tokens`` [chunks] (the unit of the bootstrap)."""
    every = EarlyExitModel(model.hf, list(range(model.num_layers - 1)))
    every.eval()
    correct, agree, tokens = [], [], []
    for start in range(0, len(dataset), batch_size):
        ids = torch.as_tensor(dataset[start:start + batch_size]["input_ids"]).to(model.device)
        targets = shifted_targets(ids)
        valid = targets != IGNORE_INDEX
        preds = [every.decode(h)[:, :-1].argmax(-1) for h in every.exit_hidden_states(ids)]
        final = preds[-1]
        correct.append(torch.stack([((p == targets) & valid).sum(1) for p in preds], 1).cpu().numpy())
        agree.append(torch.stack([((p == final) & valid).sum(1) for p in preds], 1).cpu().numpy())
        tokens.append(valid.sum(1).cpu().numpy())
    return {"correct": np.concatenate(correct).astype(float), "agree": np.concatenate(agree).astype(float),
            "tokens": np.concatenate(tokens).astype(float)}


def _training_cost(model_dir: Path) -> dict:
    """What a base cost to train, from its shipped manifest or its pretraining stage record."""
    m = model_dir / "base_manifest.json"
    if m.is_file():
        d = read_json(m)
        run = d.get("pretrain_run") or {}
        cfg = d.get("config") or {}
        return {"tokens": d.get("tokens_seen"), "steps": d.get("steps"), "wall_time_s": d.get("wall_time_s"),
                "cpu_time_s": d.get("cpu_time_s"), "tokens_per_s": d.get("tokens_per_s"),
                "recipe": ("early_exit" if ((cfg.get("pretrain") or {}).get("early_exit") or {}).get("enabled")
                           else "plain"),
                "pretrain_config": cfg.get("pretrain"), "hardware": run.get("hardware"),
                "git_commit": run.get("git_commit")}
    rec = common.read_stage(model_dir) or {}
    s = rec.get("summary") or {}
    return {"tokens": s.get("train_tokens"), "steps": s.get("steps"), "wall_time_s": s.get("train_runtime_s"),
            "cpu_time_s": s.get("train_cpu_time_s"), "tokens_per_s": s.get("train_tokens_per_s"),
            "recipe": s.get("recipe"), "pretrain_config": (rec.get("payload") or {}).get("pretrain")}


def _ci(values) -> list[float]:
    """The 95% percentile interval of bootstrap values, rounded."""
    return [round(float(np.percentile(values, 2.5)), 6), round(float(np.percentile(values, 97.5)), 6)]


def _base_record(s: dict, idx: np.ndarray, exit_points: list[int], model_dir) -> dict:
    """One base: per layer its accuracy, share of the final layer's and agreement with it (each with its CI over
    the resampled chunks ``idx``), the final accuracy and the training cost."""
    tok = s["tokens"].sum()
    acc = s["correct"].sum(0) / tok
    boot_tok = s["tokens"][idx].sum(1)  # [resamples]
    boot_acc = s["correct"][idx].sum(1) / boot_tok[:, None]  # [resamples, layers]
    boot_agree = s["agree"][idx].sum(1) / boot_tok[:, None]
    boot_share = boot_acc / boot_acc[:, -1:]
    layers = [{"layer": layer, "is_exit_point": layer in exit_points,
               "accuracy": round(float(acc[layer]), 6), "accuracy_ci": _ci(boot_acc[:, layer]),
               "accuracy_share_of_final": round(float(acc[layer] / acc[-1]), 6),
               "accuracy_share_of_final_ci": _ci(boot_share[:, layer]),
               "agreement_with_final": round(float(s["agree"][:, layer].sum() / tok), 6),
               "agreement_with_final_ci": _ci(boot_agree[:, layer])} for layer in range(acc.shape[0])]
    return {"model_dir": str(model_dir), "tokens": int(tok), "final_accuracy": round(float(acc[-1]), 6),
            "final_accuracy_ci": _ci(boot_acc[:, -1]), "per_layer": layers,
            "training_cost": _training_cost(Path(model_dir))}


def _pair_differences(stats: dict, models: dict, idx: np.ndarray) -> dict:
    """Every two bases (``a - b`` with a < b): the final layer's accuracy difference and each layer's, with
    paired CIs (the same resampled chunks)."""
    diffs = {}
    names = list(stats)
    for a in names:
        for b in names:
            if not a < b:
                continue
            ba = stats[a]["correct"][idx].sum(1) / stats[a]["tokens"][idx].sum(1)[:, None]
            bb = stats[b]["correct"][idx].sum(1) / stats[b]["tokens"][idx].sum(1)[:, None]
            lo, hi = _ci(ba[:, -1] - bb[:, -1])
            per_layer = [{"layer": layer, "accuracy_diff": round(models[a]["per_layer"][layer]["accuracy"]
                                                                  - models[b]["per_layer"][layer]["accuracy"], 6),
                          "ci": _ci(ba[:, layer] - bb[:, layer])} for layer in range(ba.shape[1])]
            diffs[f"{a} - {b}"] = {"final_accuracy_diff": round(models[a]["final_accuracy"] - models[b]["final_accuracy"],
                                                                6),
                                   "ci": [lo, hi], "significant": bool(lo > 0 or hi < 0), "per_layer": per_layer}
    return diffs


def compare_bases(cfg, bases: dict, *, resamples: int = 2000, out_dir: Optional[Path] = None,
                  out_name: str = "base_recipes") -> dict:
    """The base ablation: each named base model (``{name: directory}``) on the same validation
    tokens (the exit report's: ``finetune.eval_max_tokens`` in ``finetune.seq_len`` chunks), per
    layer: next-token accuracy, its share of the final layer's, agreement with the final layer,
    each with a 95% bootstrap CI over chunks (paired: the same resampled chunks for every base),
    the difference of the final layers' accuracies with its CI, and each base's training cost.
    Also each layer's accuracy difference between every two bases (paired, with its CI: what a
    recipe change such as fill-in-the-middle costs an exit). Written to
    ``results/<name>/ablations/<out_name>.{json,md}``."""
    device, dtype = setup_torch(cfg.hardware)
    tokenizer = load_tokenizer(cfg)
    stage = cfg.finetune
    held = pack_split(load_corpus(cfg)["validation"], tokenizer, stage.seq_len, max_tokens=stage.eval_max_tokens,
                      seed=cfg.seed, desc="packing held-out", sep=text_sep(cfg))
    stats, exit_points, identities = {}, None, {}
    for name, d in bases.items():
        m = EarlyExitModel.from_run_config(cfg, str(d), device=device, dtype=dtype).eval()
        identities[name] = m.loaded_from
        exit_points = list(m.exit_points)
        stats[name] = chunk_stats(m, held, stage.batch_size)
        del m
    n = len(next(iter(stats.values()))["tokens"])
    idx = bootstrap_indices(n, resamples, cfg.seed)
    models = {name: _base_record(s, idx, exit_points, bases[name]) for name, s in stats.items()}
    report = {"description": "base ablation: per-layer next-token accuracy, its share of the final layer's and "
                             "agreement with the final layer on the same held-out (validation) tokens, decoded "
                             "through each model's own final norm and LM head; 95% bootstrap CIs over 256-token "
                             "chunks, paired across models",
              "split": "validation", "chunks": n, "seq_len": stage.seq_len, "resamples": resamples,
              "exit_points": exit_points, "models": models,
              "final_accuracy_differences": _pair_differences(stats, models, idx),
              "meta": run_metadata(cfg, stage="base_ablation", weights=_ablation_weights(cfg, identities))}
    out_dir = Path(out_dir) if out_dir is not None else RunPaths.from_config(cfg).results / "ablations"
    write_json(out_dir / f"{out_name}.json", report)
    write_text(out_dir / f"{out_name}.md", render_bases(report))
    return report


def _ablation_weights(cfg, identities: dict) -> Optional[dict]:
    """An ablation's record: the run's own base is its weights; the bases it compared are listed
    under ``compared`` (they do not make it a result of another base)."""
    try:
        base = base_source(cfg)
    except (FileNotFoundError, ValueError):
        base = None
    return weights_record(base=base, compared=identities)


def render_bases(report: dict) -> str:
    names = list(report["models"])
    lines = [f"# Base recipes side by side ({report['split']} split, {report['chunks']} chunks of "
             f"{report['seq_len']} tokens, the same for every base)", "",
             report["description"] + ".", "",
             "| layer | " + " | ".join(f"{n}: accuracy (share of final) | {n}: agreement" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    exits = set(report["exit_points"])
    rows = {n: report["models"][n]["per_layer"] for n in names}
    for i in range(len(rows[names[0]])):
        mark = " (exit)" if i in exits else ""
        cells = []
        for n in names:
            r = rows[n][i]
            lo, hi = r["accuracy_ci"]
            cells.append(f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] ({100 * r['accuracy_share_of_final']:.0f}%)")
            cells.append(f"{r['agreement_with_final']:.3f}")
        lines.append(f"| {i}{mark} | " + " | ".join(cells) + " |")
    lines += ["", "| base | final accuracy [95% CI] | recipe | tokens | steps | wall time (min) | CPU time (min) | "
                  "tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        m, c = report["models"][n], report["models"][n]["training_cost"]
        lo, hi = m["final_accuracy_ci"]

        def mins(v):
            return "–" if v is None else f"{v / 60:.0f}"
        lines.append(f"| {n} | {m['final_accuracy']:.4f} [{lo:.4f}, {hi:.4f}] | {c.get('recipe')} | {c.get('tokens')} | "
                     f"{c.get('steps')} | {mins(c.get('wall_time_s'))} | {mins(c.get('cpu_time_s'))} | "
                     f"{c.get('tokens_per_s')} |")
    for k, d in report["final_accuracy_differences"].items():
        lines.append(f"\nFinal accuracy {k}: {d['final_accuracy_diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                     f"{' (significant)' if d['significant'] else ''}.")
        if d.get("per_layer"):
            lines += ["", f"Per-layer accuracy difference {k} (points, 95% paired CI):", "",
                      "| layer | difference | 95% CI |", "|---|---|---|"]
            for r in d["per_layer"]:
                mark = " (exit)" if r["layer"] in exits else (" (final)" if r["layer"] == len(d["per_layer"]) - 1 else "")
                lines.append(f"| {r['layer']}{mark} | {100 * r['accuracy_diff']:+.2f} | "
                             f"[{100 * r['ci'][0]:+.2f}, {100 * r['ci'][1]:+.2f}] |")
    return "\n".join(lines) + "\n"
