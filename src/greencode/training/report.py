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

import torch

from greencode.paths import RunPaths
from greencode.training import common
from greencode.training.lite import exit_token_stats
from greencode.utils import atomic_path, run_metadata, setup_torch, write_json

log = logging.getLogger(__name__)

CSV_COLUMNS = ["model", "layer", "is_exit_point", "accuracy", "agreement_with_final", "ce_loss",
               "accuracy_share_of_final", "tokens"]


@torch.no_grad()
def layer_quality(model, dataset, batch_size: int, device: Optional[torch.device] = None) -> dict:
    """Per-layer next-token accuracy / agreement with the final layer / mean CE of an
    :class:`EarlyExitModel` over a packed dataset (``input_ids`` rows). Every layer
    ``0..num_layers-1`` is measured; ``exit_points`` of ``model`` are flagged."""
    from greencode.models import EarlyExitModel

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
    from greencode.data import load_corpus, load_tokenizer
    from greencode.models import EarlyExitModel
    from greencode.training.data import pack_split
    from greencode.training.finetuning import base_source

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
    from greencode.data.corpus import text_sep

    held_out = pack_split(load_corpus(cfg)["validation"], tokenizer, stage.seq_len, max_tokens=stage.eval_max_tokens,
                          seed=cfg.seed, desc="packing held-out", sep=text_sep(cfg))
    models = {}
    models["finetuned"] = layer_quality(ft, held_out, stage.batch_size, device)
    del ft
    bm = EarlyExitModel.from_pretrained(base, exit_layers=models_exit_layers(models["finetuned"]), device=device,
                                        dtype=dtype)
    models["base"] = layer_quality(bm, held_out, stage.batch_size, device)
    report = {
        "description": "per-layer next-token accuracy, agreement with the final layer's prediction and mean "
                       "cross-entropy on held-out (validation) tokens, decoded through the model's own final norm "
                       "and LM head; layers are 0-based, the final layer is the full model",
        "split": "validation", "tokens": models["finetuned"]["tokens"], "seq_len": stage.seq_len,
        "exit_points": [r["layer"] for r in models["finetuned"]["per_exit"]],
        "base_model": base, "finetuned_model": finetuned,
        "models": {"base": models["base"], "finetuned": models["finetuned"]},
        "time_s": round(time.perf_counter() - t0, 3),
        "meta": run_metadata(cfg, stage="exit_report"),
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
    from greencode.utils import read_json

    return read_json(Path(RunPaths.from_config(cfg).results_finetune) / "exit_report.json")
