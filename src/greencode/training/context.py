"""Does more context help? The same target tokens, predicted with a long context and with a short one.

On held-out (validation) files of at least ``min_file_tokens`` tokens (bos + text + eos, the training
encoding), each file's first ``window`` tokens are read twice: whole (the target tokens see up to
``window - 1`` tokens before them) and as only the last ``short`` tokens of the window (the targets see
at most ``short - 1``). The targets are the tokens at positions ``target_from .. window - 1``, the same
in both reads, so the two accuracies are paired per file. A model trained on chunks shorter than the
window has never seen positions past its chunk length; this is where that shows: with the long
context it should predict at least as well as with the short one.

Per layer (0-based, every layer decoded through the model's own final norm and LM head; exit points
flagged): the accuracy with each context and their difference (long - short) with a 95% paired
bootstrap CI over files. Written to ``results/<name>/ablations/<out_name>.{json,md}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from greencode.data import load_corpus, load_tokenizer
from greencode.data.corpus import text_sep
from greencode.data.tokenizer import encode_record
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.stats import bootstrap_indices
from greencode.utils import setup_torch, write_json, write_text

log = logging.getLogger(__name__)


def long_files(cfg, tokenizer, *, min_file_tokens: int, max_files: int, split: str = "validation") -> list[list[int]]:
    """Token ids (training encoding) of the first ``max_files`` files of ``split`` with at least
    ``min_file_tokens`` tokens, in the corpus' (hash-split) order."""
    sep = text_sep(cfg)
    out = []
    for rec in load_corpus(cfg)[split]:
        ids = encode_record(tokenizer, rec["code"], sep)
        if len(ids) >= min_file_tokens:
            out.append(ids)
            if len(out) >= max_files:
                break
    return out


@torch.no_grad()
def _correct(model, ids: torch.Tensor, first_logit: int, targets: torch.Tensor) -> np.ndarray:
    """Per row and per layer: how many of ``targets`` [B, n] the layer predicts from the logits at
    positions ``first_logit .. first_logit + n - 1``."""
    n = targets.shape[1]
    rows = []
    for h in model.exit_hidden_states(ids):
        pred = model.decode(h[:, first_logit:first_logit + n]).argmax(-1)
        rows.append((pred == targets).sum(1))
    return torch.stack(rows, 1).cpu().numpy().astype(float)  # [B, layers]


def context_effect(cfg, models: dict, *, window: int = 512, short: int = 255, target_from: int = 384,
                   min_file_tokens: int = 520, max_files: int = 60, batch_size: int = 8, resamples: int = 2000,
                   out_dir: Optional[Path] = None, out_name: str = "context") -> dict:
    """The context ablation for each named model directory (``{name: dir}``); see the module doc."""
    if not 0 < short < window or not window - short <= target_from < window:
        raise ValueError(f"need 0 < short ({short}) < window ({window}) and the targets (from {target_from}) inside "
                         f"the short read (positions {window - short}..{window - 1})")
    if min_file_tokens < window:
        raise ValueError(f"min_file_tokens ({min_file_tokens}) must be at least the window ({window})")
    device, dtype = setup_torch(cfg.hardware)
    tokenizer = load_tokenizer(cfg)
    files = long_files(cfg, tokenizer, min_file_tokens=min_file_tokens, max_files=max_files)
    if len(files) < 2:
        raise ValueError(f"only {len(files)} validation files have >= {min_file_tokens} tokens; lower "
                         "--min-file-tokens or use a larger corpus")
    ids = torch.tensor([f[:window] for f in files], dtype=torch.long)
    targets = ids[:, target_from:window]
    n_targets = window - target_from
    start = window - short
    idx = bootstrap_indices(len(files), resamples, cfg.seed)

    def ci(values):
        return [round(float(np.percentile(values, 2.5)), 6), round(float(np.percentile(values, 97.5)), 6)]

    report_models = {}
    for name, d in models.items():
        m = EarlyExitModel.from_run_config(cfg, str(d), device=device, dtype=dtype).eval()
        every = EarlyExitModel(m.hf, list(range(m.num_layers - 1))).eval()
        long_c, short_c = [], []
        for b in range(0, len(files), batch_size):
            x, y = ids[b:b + batch_size].to(device), targets[b:b + batch_size].to(device)
            long_c.append(_correct(every, x, target_from - 1, y))
            short_c.append(_correct(every, x[:, start:], target_from - 1 - start, y))
        lc, sc = np.concatenate(long_c), np.concatenate(short_c)  # [files, layers]
        exits = set(m.exit_points)
        layers = []
        for layer in range(lc.shape[1]):
            acc_l, acc_s = lc[:, layer] / n_targets, sc[:, layer] / n_targets
            diff = acc_l - acc_s
            lo, hi = ci(diff[idx].mean(1))
            layers.append({"layer": layer, "is_exit_point": layer in exits,
                           "accuracy_long": round(float(acc_l.mean()), 6), "accuracy_short": round(float(acc_s.mean()), 6),
                           "difference": round(float(diff.mean()), 6), "difference_ci": [lo, hi],
                           "long_at_least_as_good": bool(lo >= 0), "long_worse": bool(hi < 0)})
        report_models[name] = {"model_dir": str(d), "per_layer": layers, "final": layers[-1]}
        log.info("context %s: final layer %.4f with %d tokens vs %.4f with %d: %+.4f [%+.4f, %+.4f]", name,
                 layers[-1]["accuracy_long"], window, layers[-1]["accuracy_short"], short, layers[-1]["difference"],
                 *layers[-1]["difference_ci"])
        del m, every
    report = {"description": f"the same target tokens (positions {target_from}-{window - 1}) predicted with the "
                             f"file's first {window} tokens as context and with only the last {short} of them; "
                             f"accuracy per layer, difference long - short with a 95% paired bootstrap CI over files",
              "split": "validation", "files": len(files), "window": window, "short": short,
              "target_from": target_from, "targets_per_file": n_targets, "min_file_tokens": min_file_tokens,
              "resamples": resamples, "models": report_models, "meta": run_metadata(cfg, stage="context_ablation")}
    out_dir = Path(out_dir) if out_dir is not None else RunPaths.from_config(cfg).results / "ablations"
    write_json(out_dir / f"{out_name}.json", report)
    write_text(out_dir / f"{out_name}.md", render_context(report))
    return report


def render_context(report: dict) -> str:
    lines = [f"# Context: {report['window']} tokens vs the last {report['short']} ({report['split']} split, "
             f"{report['files']} files of >= {report['min_file_tokens']} tokens, targets at positions "
             f"{report['target_from']}-{report['window'] - 1})", "", report["description"] + ".", ""]
    for name, m in report["models"].items():
        lines += [f"## {name}", "", f"| layer | accuracy, {report['window']} tokens | accuracy, last {report['short']} | "
                  "long - short (points) | 95% CI |", "|---|---|---|---|---|"]
        for r in m["per_layer"]:
            mark = " (final)" if r is m["per_layer"][-1] else (" (exit)" if r["is_exit_point"] else "")
            lo, hi = r["difference_ci"]
            lines.append(f"| {r['layer']}{mark} | {r['accuracy_long']:.4f} | {r['accuracy_short']:.4f} | "
                         f"{100 * r['difference']:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
        f = m["final"]
        verdict = ("at least as good with the long context" if f["long_at_least_as_good"] else
                   "worse with the long context" if f["long_worse"] else "no significant difference")
        lines += ["", f"Final layer: {verdict}.", ""]
    return "\n".join(lines)
