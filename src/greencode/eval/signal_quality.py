"""Decision quality of exit signals, measured directly (issue 30, item 3).

Before any controller is tuned: on held-out **validation** files (never test), one teacher-forced
pass of an early-exit model gives, for every token position and every early exit point, the
**oracle label** (this exit's greedy token equals the final layer's) and every signal an exit
decision could use. Each signal's AUC against the label per exit point, and its precision at
matched recall, say which signals can reach the oracle's savings at all:

* ``hidden_lr``: a logistic regression on the normed hidden state (what the paper's GC and the
  classifier see), one model over all exit points, trained on a file-disjoint train part of the
  validation files and scored on the rest; ``hidden_lr_4k``: the same trained on 4,000 tokens
  (about today's trajectory bank);
* ``full_max_prob``, ``full_margin`` (top-1 - top-2 probability), ``full_neg_entropy``: the full LM
  head at the exit (2.65 decoder layers per check on the default);
* per candidate source ``s`` (:mod:`greencode.decoding.signals`): ``cheap[s]_max_prob``,
  ``cheap[s]_margin``, ``cheap[s]_neg_entropy`` alone, ``cheap[s]_lr`` (a logistic regression on all
  cheap features + the exit index) and ``hidden+cheap[s]_lr`` (the normed state + those features);
* ``saturation``: the cosine of this exit's normed state to the previous exit point's (the layer below
  the first exit point for the first);
* ``hidden+full_lr``: the normed state + the full head's max softmax, margin and entropy + saturation
  (what a policy could learn with the expensive features; a reference, not a candidate).

Teacher forcing runs every layer with exact K/V (no exits simulated); ``prev_exit`` (the previous
token's exit point) is the previous position's oracle exit, what a perfect controller would have
done. The ``prev_token`` source takes the previous position's final-layer top-k; the ``bigram`` table is
counted on the corpus' train split; the ``context`` source reads the window itself up to the position.

Written to ``results/<name>/signals/auc.{json,md}``; ``scripts/analyze_signals.py`` also draws
``figures/<name>/signals_auc.*`` (:mod:`greencode.plots.signals`).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from greencode.data import encode_record, load_corpus, load_tokenizer
from greencode.data.corpus import text_sep
from greencode.decoding.controllers import policy_observation
from greencode.decoding.signals import (CANDIDATE_SOURCES, FEATURES, LowRankShortlist, ModelShape, bigram_table,
                                        check_candidates, context_candidates, exit_signals, first_candidates,
                                        head_parts, macs_in_layers, signal_macs, token_macs)
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.runinfo import run_metadata
from greencode.stats import auc, auc_table, paired_auc_difference
from greencode.utils import REPO_ROOT, setup_torch, write_json, write_text

log = logging.getLogger(__name__)

FULL_STATS = ("max_prob", "margin", "neg_entropy")
FIXED_RECALLS = (0.5, 0.8)
MATCH_THRESHOLD = 0.9  # precision at the recall that full_max_prob >= 0.9 reaches
# every signal's mean AUC is also reported as a paired difference from this one (what GC's paper observation sees)
REFERENCE_SIGNAL = "hidden_lr"


# --------------------------------------------------------------------------- metrics
def precision_at_recall(scores: np.ndarray, labels: np.ndarray, recall: float) -> Optional[dict]:
    """The precision at the highest threshold whose recall (exits taken among the positives) reaches
    ``recall``: exit when ``score >= threshold``; tied scores are all in or all out. None without
    positives."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    # the ends of runs of equal scores: a threshold takes a whole run
    ends = np.r_[np.flatnonzero(np.diff(s)) , len(s) - 1]
    rec = tp[ends] / n_pos
    i = int(np.searchsorted(rec, recall - 1e-12))  # rec is non-decreasing
    i = min(i, len(ends) - 1)
    end = ends[i]
    return {"threshold": float(s[end]), "recall": float(rec[i]), "precision": float(tp[end] / (end + 1)),
            "exit_share": float((end + 1) / len(s))}


def recall_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Optional[float]:
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    return float((np.asarray(scores)[labels] >= threshold).mean())


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int, max_iter: int = 300):
    """A standardised L2 logistic regression (sklearn, lbfgs). Returns a ``score(x) -> P(agree)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y)) < 2:  # nothing to learn: a constant score
        const = float(np.mean(y)) if len(y) else 0.5
        return lambda z: np.full(len(z), const)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=1.0, random_state=seed))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the ranking is what is scored
        model.fit(x.astype(np.float32), y.astype(np.int64))
    return lambda z: model.predict_proba(z.astype(np.float32))[:, 1]


# --------------------------------------------------------------------------- data
def resolve_model(cfg, model_dir: Optional[str] = None) -> tuple[str, str]:
    """(directory, kind): ``model_dir`` if given, else the run's LITE fine-tuned model when it exists,
    else the base the run starts from (``model.base``, e.g. the shipped ``assets/default-base``)."""
    if model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_dir}: no HF model there (config.json missing)")
        return str(model_dir), "given"
    ft = RunPaths.from_config(cfg).finetuned
    if (ft / "config.json").is_file():
        return str(ft), "finetuned"
    from greencode.training.finetuning import base_source

    return base_source(cfg), "base (no LITE fine-tuned model in this run)"


def kind_folder(kind: str) -> Optional[str]:
    """The subfolder another model's analysis goes to (``base``, ``given``); None for the run's own
    fine-tuned model, whose analysis is the run's result."""
    return None if kind == "finetuned" else kind.split(" ")[0]


def default_out_dir(cfg, kind: str) -> Path:
    """``results/<name>/signals`` for the run's own fine-tuned model; for any other model (its base, a
    ``--model``) ``signals/base`` or ``signals/given``, so that it never replaces the run's result."""
    out = RunPaths.from_config(cfg).results / "signals"
    sub = kind_folder(kind)
    return out if sub is None else out / sub


def _portable(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def validation_windows(cfg, tokenizer, n_files: int, window: int, min_tokens: int, seed: int) -> list[dict]:
    """Up to ``n_files`` validation files in a seeded order, each encoded (bos + text + eos) and cut to
    one seeded window of at most ``window`` tokens; files shorter than ``min_tokens`` are skipped."""
    dsd = load_corpus(cfg)
    if "validation" not in dsd or len(dsd["validation"]) == 0:
        raise ValueError("the corpus has no validation files; rebuild it with scripts/prepare_data.py")
    val = dsd["validation"]
    order = list(range(len(val)))
    rng = random.Random(seed)
    rng.shuffle(order)
    sep = text_sep(cfg)
    out = []
    for i in order:
        if len(out) >= n_files:
            break
        rec = val[i]
        ids = encode_record(tokenizer, rec, sep)
        if len(ids) < min_tokens:
            continue
        start = rng.randint(0, len(ids) - window) if len(ids) > window else 0
        out.append({"file": rec.get("path") or rec.get("id") or str(i), "ids": ids[start:start + window],
                    "start": start})
    if len(out) < 2:
        raise ValueError(f"only {len(out)} validation files have >= {min_tokens} tokens; the file-disjoint split needs "
                         "two or more (enlarge the corpus or lower --min-tokens)")
    return out


def train_bigrams(cfg, tokenizer, vocab_size: int, k: int, max_tokens: int, seed: int) -> tuple[torch.Tensor, int]:
    """The bigram candidate table from the corpus' **train** split (seeded files up to ``max_tokens``)."""
    train = load_corpus(cfg)["train"]
    order = list(range(len(train)))
    random.Random(seed + 1).shuffle(order)
    seqs, total = [], 0
    for i in order:
        if total >= max_tokens:
            break
        ids = encode_record(tokenizer, train[i], text_sep(cfg))
        seqs.append(ids)
        total += len(ids)
    return bigram_table(seqs, vocab_size, k), total


def _pad_right(batch: list[dict], pad_id: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of windows right-padded with ``pad_id``, and its mask (1 = token)."""
    t = max(len(w["ids"]) for w in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for r, w in enumerate(batch):
        ids[r, :len(w["ids"])] = torch.tensor(w["ids"])
        mask[r, :len(w["ids"])] = 1
    return ids.to(dev), mask.to(dev)


def _exit_heads(model, hs: dict, exits: list[int]):
    """The full head at every exit point: the final layer's logits and prediction, each exit's agreement with
    it ``[E, B, T]``, its full-head statistics (``FULL_STATS``) and the first exit point's logits."""
    final_logits = model.decode(hs[model.final_layer]).float()  # [B, T, V]
    final_pred = final_logits.argmax(-1)
    agree, full, first_logits = [], [], None
    for j, layer in enumerate(exits):
        lg = final_logits if layer == model.final_layer else model.decode(hs[layer]).float()
        agree.append(lg.argmax(-1) == final_pred)
        logp = torch.log_softmax(lg, -1)
        top2 = torch.topk(logp, 2, -1).values.exp()
        full.append(torch.stack([top2[..., 0], top2[..., 0] - top2[..., 1], (logp.exp() * logp).sum(-1)], -1))
        if j == 0:
            first_logits = lg
        del lg, logp
    return final_logits, final_pred, torch.stack(agree, 0), full, first_logits


def _coverage(model, src: str, k: int, normed0: torch.Tensor, first_logits: torch.Tensor, fin: torch.Tensor,
              **inputs) -> np.ndarray:
    """Per token: whether the final layer's answer is among ``src``'s candidates (fixed per token)."""
    cands = first_candidates(src, k, **inputs)
    weight, bias = head_parts(model)
    low_rank = LowRankShortlist.of(weight, src)
    if cands is None and low_rank is not None:
        cands = low_rank.candidates(weight, bias, normed0, k)[0]
    elif cands is None:
        cands = torch.topk(first_logits, k, -1).indices
    return (cands == fin[:, None]).any(-1).cpu().numpy()


def _context(batch: list[dict], t: int, k: int, bigram, dev) -> torch.Tensor:
    """The prompt's own bigram candidates, position by position as online ``[B, T, k]``."""
    context = torch.zeros((len(batch), t, k), dtype=torch.long)
    for r, w in enumerate(batch):
        context[r, :len(w["ids"])] = context_candidates(w["ids"], k, bigram)
    return context.to(dev)


@torch.no_grad()
def collect(model, windows: list[dict], *, k: int, sources: Sequence[str], bigram: Optional[torch.Tensor],
            batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """The teacher-forced pass: per (position, early exit point) example, its label, file, exit index,
    normed state (float16), full-head statistics and each source's cheap features. Position 0 of each
    window (no previous token) and padding are left out."""
    exits = list(model.exit_layers)
    e, first, dev = len(exits), exits[0], model.device
    layers = sorted(set(exits) | {model.final_layer} | ({first - 1} if first >= 1 else set()))
    every = type(model)(model.hf, [x for x in layers if x != model.final_layer])
    cols: dict[str, list] = {key: [] for key in ("label", "file", "exit", "hidden", "token_pos",
                                                 *(f"full_{s}" for s in FULL_STATS),
                                                 *(f"cheap_{src}" for src in sources))}
    cov: dict[str, list] = {src: [] for src in sources}
    for b0 in range(0, len(windows), batch_size):
        batch = windows[b0:b0 + batch_size]
        ids, mask = _pad_right(batch, pad_id, dev)
        t = ids.shape[1]
        hs = dict(zip(every.exit_points, every.exit_hidden_states(ids, mask)))
        final_logits, final_pred, agree, full, first_logits = _exit_heads(model, hs, exits)
        # oracle exit per position: the first agreeing exit point, E when none does
        oracle = torch.where(agree.any(0), agree.float().argmax(0), torch.full_like(final_pred, e))
        valid = mask.bool().clone()
        valid[:, 0] = False
        sel = valid.reshape(-1)
        n = int(sel.sum())
        if n == 0:
            continue
        flat = lambda x: x.reshape(-1, x.shape[-1])[sel]  # noqa: E731
        normed = [policy_observation(model, flat(hs[layer]), "normed") for layer in exits]
        inputs = dict(input_ids=ids.reshape(-1)[sel], bigram=bigram,
                      prev_logits=flat(torch.cat([final_logits[:, :1], final_logits[:, :-1]], 1)),
                      context=flat(_context(batch, t, k, bigram, dev)) if "context" in sources else None)
        fin = final_pred.reshape(-1)[sel]
        prev_exit = torch.cat([torch.full_like(oracle[:, :1], e), oracle[:, :-1]], 1).reshape(-1)[sel]
        below = policy_observation(model, flat(hs[first - 1]), "normed") if first >= 1 else None
        for src in sources:
            feats = exit_signals(model, normed, k=k, source=src, prev_exit=prev_exit, below=below,
                                 full_logits_first=flat(first_logits), **inputs)  # [E, n, F]
            cols[f"cheap_{src}"].append(feats.permute(1, 0, 2).reshape(n * e, -1).cpu().numpy())
            cov[src].append(_coverage(model, src, k, normed[0], flat(first_logits), fin, **inputs))
        file_idx = torch.arange(b0, b0 + len(batch), device=dev)[:, None].expand(-1, t).reshape(-1)[sel]
        cols["label"].append(agree.permute(1, 2, 0).reshape(-1, e)[sel].reshape(-1).cpu().numpy())
        cols["exit"].append(np.tile(np.arange(e), n))
        cols["file"].append(np.repeat(file_idx.cpu().numpy(), e))
        cols["token_pos"].append(np.repeat(np.arange(n) + sum(len(x) for x in cols["token_pos"]) // e, e))
        cols["hidden"].append(torch.stack(normed, 1).reshape(n * e, -1).to(torch.float16).cpu().numpy())
        fs = torch.stack(full, 0).permute(1, 2, 0, 3).reshape(-1, e, 3)[sel].reshape(n * e, 3).cpu().numpy()
        for i, s in enumerate(FULL_STATS):
            cols[f"full_{s}"].append(fs[:, i])
        log.info("signals: %d / %d windows", min(b0 + batch_size, len(windows)), len(windows))
    out = {key: np.concatenate(v) for key, v in cols.items()}
    out["label"] = out["label"].astype(bool)
    for src in sources:
        out[f"coverage_{src}"] = np.concatenate(cov[src])
    return out


def _signal_table(data: dict, train: np.ndarray, test: np.ndarray, small: np.ndarray, sources: Sequence[str],
                  e: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Scores of every signal on the test examples, and a description of each."""
    col = {c: i for i, c in enumerate(FEATURES)}
    hidden = data["hidden"]
    y = data["label"]
    scores: dict[str, np.ndarray] = {}
    desc: dict[str, str] = {}

    def lr(name: str, x_fn, rows: np.ndarray, what: str):
        t0 = time.perf_counter()
        score = fit_logistic(x_fn(rows), y[rows], seed)
        scores[name] = score(x_fn(test))
        desc[name] = what
        log.info("signals: %s fitted on %d examples in %.1f s", name, len(rows), time.perf_counter() - t0)

    lr("hidden_lr", lambda r: hidden[r].astype(np.float32), train,
       "logistic regression on the normed hidden state (GC's observation), all train-part tokens")
    lr("hidden_lr_4k", lambda r: hidden[r].astype(np.float32), small,
       "the same trained on 4,000 train-part tokens (about today's bank)")
    for s in FULL_STATS:
        scores[f"full_{s}"] = data[f"full_{s}"][test]
    desc.update({"full_max_prob": "max softmax of the full LM head", "full_margin": "full head: top-1 - top-2 probability",
                 "full_neg_entropy": "full head: minus the entropy (nats)"})
    for src in sources:
        f = data[f"cheap_{src}"]
        for s in ("max_prob", "margin", "neg_entropy"):
            scores[f"cheap[{src}]_{s}"] = f[test, col[f"cand_{s}"]]
            desc[f"cheap[{src}]_{s}"] = f"candidates from {src}: {s.replace('_', ' ')} over the k candidates"
        lr(f"cheap[{src}]_lr", lambda r, f=f: f[r], train,
           f"logistic regression on the cheap features ({src}) + exit index")
        lr(f"hidden+cheap[{src}]_lr", lambda r, f=f: np.concatenate([hidden[r].astype(np.float32), f[r]], 1), train,
           f"logistic regression on the normed hidden state + the cheap features ({src})")
    sat = data[f"cheap_{sources[0]}"][:, col["saturation"]]
    scores["saturation"] = sat[test]
    desc["saturation"] = "cosine of this exit's normed state to the previous exit point's"
    full3 = np.stack([data[f"full_{s}"] for s in FULL_STATS], 1)
    onehot = np.eye(e, dtype=np.float32)[data["exit"]]
    lr("hidden+full_lr", lambda r: np.concatenate([hidden[r].astype(np.float32), full3[r], sat[r, None], onehot[r]], 1),
       train, "reference: normed hidden state + full-head max softmax, margin, entropy + saturation + exit index")
    return scores, desc


def _costs(shape: ModelShape, k: int, sources: Sequence[str]) -> dict[str, dict]:
    """Per signal: MACs of a check at a later exit point and at the first exit point, and of one token
    checked at every exit point, with the layer equivalents."""
    e, d, nf = shape.n_exit_points, shape.head_in, len(FEATURES) + shape.n_exit_points
    spec: dict[str, tuple[str, dict]] = {
        "hidden_lr": ("hidden", {"readout": d}), "hidden_lr_4k": ("hidden", {"readout": d}),
        "full_max_prob": ("full_head", {}), "full_margin": ("full_head", {}), "full_neg_entropy": ("full_head", {}),
        "saturation": ("saturation", {}),
    }
    for src in sources:
        for s in ("max_prob", "margin", "neg_entropy"):
            spec[f"cheap[{src}]_{s}"] = ("cheap", {"k": k, "source": src})
        spec[f"cheap[{src}]_lr"] = ("cheap", {"k": k, "source": src, "readout": nf})
        spec[f"hidden+cheap[{src}]_lr"] = ("cheap", {"k": k, "source": src, "readout": nf + d})
    out = {}
    for name, (sig, kw) in spec.items():
        later = signal_macs(shape, sig, exit_index=min(1, e - 1), **kw)["macs"]
        first = signal_macs(shape, sig, exit_index=0, **kw)["macs"]
        per_token = token_macs(shape, sig, e, **kw)
        out[name] = {"macs_per_check": later, "macs_first_check": first, "macs_per_token_all_checks": per_token,
                     "layers_per_check": round(macs_in_layers(later, shape), 5),
                     "layers_first_check": round(macs_in_layers(first, shape), 5),
                     "layers_per_token_all_checks": round(macs_in_layers(per_token, shape), 5)}
    # the reference: full head + saturation + a read-out of the state and 4 numbers + the exit index
    full = signal_macs(shape, "full_head", exit_index=1)["macs"] + 2 * d + d + 4 + e
    out["hidden+full_lr"] = {"macs_per_check": full, "macs_first_check": full + 4 * d,
                             "macs_per_token_all_checks": full * e + 4 * d,
                             "layers_per_check": round(macs_in_layers(full, shape), 5),
                             "layers_first_check": round(macs_in_layers(full + 4 * d, shape), 5),
                             "layers_per_token_all_checks": round(macs_in_layers(full * e + 4 * d, shape), 5)}
    return out


def _split(data: dict, n_windows: int, train_fraction: float, small_tokens: int, seed: int):
    """The file-disjoint split (windows are in the seeded order): the train files' count, the train and test
    examples, and the small (bank-sized) training set: ``small_tokens`` of the train tokens, seeded."""
    n_train_files = max(1, min(n_windows - 1, int(round(train_fraction * n_windows))))
    is_train = data["file"] < n_train_files
    train, test = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    rng = np.random.default_rng(seed)
    train_tokens = np.unique(data["token_pos"][train])
    pick = rng.choice(train_tokens, size=min(small_tokens, len(train_tokens)), replace=False)
    small = train[np.isin(data["token_pos"][train], pick)]
    return n_train_files, train, test, small


def _signal_rows(scores: dict, desc: dict, y: np.ndarray, ex: np.ndarray, files: np.ndarray, e: int, costs: dict,
                 resamples: int, seed: int) -> tuple[dict, dict]:
    """Per signal on the test examples: AUC per exit point and mean (bootstrap CIs over files, the same draws
    for every signal, so differences are paired), pooled AUC, precision at fixed and matched recall, cost, and
    the mean AUC's difference from the reference signal; and the matched recalls."""
    per_exit_masks = [ex == j for j in range(e)]
    conf = scores["full_max_prob"]
    matched_pooled = recall_at_threshold(conf, y, MATCH_THRESHOLD)
    matched_exit = [recall_at_threshold(conf[m], y[m], MATCH_THRESHOLD) for m in per_exit_masks]
    signals: dict[str, Any] = {}
    tables = {}
    for name, sc in scores.items():
        tables[name] = tab = auc_table([sc[m] for m in per_exit_masks], [y[m] for m in per_exit_masks],
                                       [files[m] for m in per_exit_masks], resamples=resamples, seed=seed)
        prec = {f"recall_{r}": precision_at_recall(sc, y, r) for r in FIXED_RECALLS}
        prec["matched_recall"] = precision_at_recall(sc, y, matched_pooled) if matched_pooled else None
        per_prec = [precision_at_recall(sc[m], y[m], r) if r else None for m, r in zip(per_exit_masks, matched_exit)]
        pp = [p["precision"] for p in per_prec if p is not None]
        pooled = auc(sc, y)
        signals[name] = {"description": desc[name],
                         "auc_per_exit": [None if a is None else round(a, 4) for a in tab["auc"]],
                         "auc_per_exit_ci": [None if c is None else [round(v, 4) for v in c] for c in tab["ci"]],
                         "auc_mean": None if tab["mean"] is None else round(tab["mean"], 4),
                         "auc_mean_ci": None if tab["mean_ci"] is None else [round(v, 4) for v in tab["mean_ci"]],
                         "auc_pooled": None if pooled is None else round(pooled, 4),
                         "precision_pooled": prec, "precision_matched_per_exit": per_prec,
                         "precision_matched_mean": round(float(np.mean(pp)), 4) if pp else None,
                         "cost": costs[name]}
    ref = REFERENCE_SIGNAL if REFERENCE_SIGNAL in tables else None
    for name in signals:
        d = paired_auc_difference(tables[name], tables[ref]) if ref and name != ref else None
        signals[name]["auc_mean_minus_reference"] = None if d is None else {
            "diff": round(d["diff"], 4), "ci": [round(v, 4) for v in d["ci"]], "excludes_zero": d["excludes_zero"]}
    matched = {"threshold": MATCH_THRESHOLD, "pooled": matched_pooled, "per_exit": matched_exit}
    return signals, matched


REPORT_DESCRIPTION = (
    "decision quality of exit signals on held-out validation tokens (teacher forced, every layer run, exact K/V): AUC "
    "of each signal against the oracle label (this exit point's greedy token == the final layer's) per early exit "
    "point, and precision at matched recall (exit when the signal >= a threshold; pooled over exit points at recall "
    f"0.5 and 0.8 and at the recall full_max_prob >= {MATCH_THRESHOLD} reaches; per exit point at that exit's matched "
    "recall). Logistic regressions are trained on a file-disjoint train part of the same validation files and scored "
    "on the rest; layers are 0-based")


def _load(cfg, model_dir: Optional[str], n_files: int, window: int, min_tokens: int, k: int, sources: list[str],
          bigram_tokens: int):
    """The model (the run's or ``model_dir``), its tokenizer, the validation windows and, for the bigram and
    context sources, the bigram table (with the train tokens it counted)."""
    src_dir, kind = resolve_model(cfg, model_dir)
    device, dtype = setup_torch(cfg.hardware)
    model = EarlyExitModel.from_run_config(cfg, src_dir, device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(cfg)
    windows = validation_windows(cfg, tokenizer, n_files, window, min_tokens, cfg.seed)
    bigram, bigram_seen = None, 0
    if "bigram" in sources or "context" in sources:  # the context source fills up from the bigram table
        bigram, bigram_seen = train_bigrams(cfg, tokenizer, ModelShape.of(model).vocab_size, k, bigram_tokens, cfg.seed)
        bigram = bigram.to(device)
    return src_dir, kind, model, tokenizer, windows, bigram, bigram_seen


def analyze_signals(cfg, *, model_dir: Optional[str] = None, n_files: int = 150, window: int = 512,
                    min_tokens: int = 64, k: int = 4, sources: Sequence[str] = CANDIDATE_SOURCES,
                    train_fraction: float = 0.5, small_tokens: int = 4000, bigram_tokens: int = 2_000_000,
                    batch_size: int = 8, resamples: int = 200, out_dir: Optional[Path] = None) -> dict:
    """Run the analysis (see the module docstring) and write ``auc.json`` and ``auc.md``. Returns the
    report; its figure is :func:`greencode.plots.signals.plot_signals_auc` (scripts/analyze_signals.py
    and the figures stage draw it: evaluation imports nothing of plots). Without ``out_dir``:
    :func:`default_out_dir`."""
    t0 = time.perf_counter()
    sources = list(sources)
    for s in sources:
        check_candidates(k, s)
    if not sources:
        raise ValueError("give at least one candidate source")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must be in (0, 1)")
    src_dir, kind, model, tokenizer, windows, bigram, bigram_seen = _load(cfg, model_dir, n_files, window, min_tokens,
                                                                          k, sources, bigram_tokens)
    shape = ModelShape.of(model)
    e = shape.n_exit_points
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = collect(model, windows, k=k, sources=sources, bigram=bigram, batch_size=batch_size, pad_id=pad)
    t_pass = time.perf_counter() - t0
    n_train_files, train, test, small = _split(data, len(windows), train_fraction, small_tokens, cfg.seed)
    scores, desc = _signal_table(data, train, test, small, sources, e, cfg.seed)
    y = data["label"][test]
    signals, matched = _signal_rows(scores, desc, y, data["exit"][test], data["file"][test], e,
                                    _costs(shape, k, sources), resamples, cfg.seed)
    test_tokens = data["file"][::e] >= n_train_files
    report = {
        "description": REPORT_DESCRIPTION,
        "split": "validation", "model_dir": _portable(src_dir), "model_kind": kind,
        "model": model.fingerprint(), "weights": getattr(model, "loaded_from", None),
        "exit_layers": list(model.exit_layers), "final_layer": model.final_layer,
        "shape": {"hidden_size": shape.hidden_size, "head_in": shape.head_in, "vocab_size": shape.vocab_size,
                  "layer_macs": shape.layer_macs, "lm_head_layers": round(macs_in_layers(
                      shape.vocab_size * shape.head_in, shape), 4)},
        "files": len(windows), "train_files": n_train_files, "test_files": len(windows) - n_train_files,
        "window": window, "min_tokens": min_tokens, "bootstrap": {"resamples": resamples, "unit": "file",
                                                                   "level": 0.95, "seed": cfg.seed},
        "tokens": {"train": int(len(train) // e), "test": int(len(test) // e), "small_train": int(len(small) // e)},
        "examples": {"train": int(len(train)), "test": int(len(test))},
        "k": k, "sources": sources, "bigram_train_tokens": bigram_seen,
        "candidate_coverage_test": {src: {"final_answer_among_candidates": round(float(
            data[f"coverage_{src}"][test_tokens].mean()), 4)} for src in sources},
        "positive_share_per_exit": [round(float(y[m].mean()), 4) if m.any() else None
                                    for m in (data["exit"][test] == j for j in range(e))],
        "matched_recall": matched,
        "signals": signals,
        "time_s": {"pass": round(t_pass, 2), "total": round(time.perf_counter() - t0, 2)},
        "meta": run_metadata(cfg, stage="signal_quality", model_dir=_portable(src_dir)),
    }
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg, kind)
    write_json(out_dir / "auc.json", report)
    write_text(out_dir / "auc.md", render_markdown(report))
    log.info("signal quality: %d test tokens, %d signals in %.1f s -> %s", report["tokens"]["test"], len(signals),
             report["time_s"]["total"], out_dir / "auc.json")
    return report


def _f(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(report: dict) -> str:
    exits = report["exit_layers"]
    sig = report["signals"]
    lines = [f"# Exit signals: AUC against the oracle label ({report['split']} split)", "",
             f"Model `{report['model_dir']}` ({report['model_kind']}); exit points {exits} (0-based), final layer "
             f"{report['final_layer']}. {report['files']} validation files, one window of <= {report['window']} "
             f"tokens each; logistic regressions trained on {report['train_files']} files "
             f"({report['tokens']['train']:,} tokens; `hidden_lr_4k`: {report['tokens']['small_train']:,}) and scored "
             f"on the other {report['test_files']} ({report['tokens']['test']:,} tokens x {len(exits)} exit points). "
             f"Candidates: k = {report['k']}.", "",
             report["description"] + ".", "",
             "Share of test tokens whose exit agrees with the final layer (the label's base rate), per exit point: "
             + ", ".join(f"{x}: {_f(p)}" for x, p in zip(exits, report["positive_share_per_exit"])) + ".", "",
             "Candidate coverage (the final layer's token among the k candidates, test tokens): "
             + ", ".join(f"{s}: {_f(c['final_answer_among_candidates'])}" for s, c in
                         report["candidate_coverage_test"].items()) + ".", "",
             "## AUC per exit point", "",
             f"95% intervals: a bootstrap over test files ({(report.get('bootstrap') or {}).get('resamples', '?')} "
             f"resamples, the same files for every signal). 'vs `{REFERENCE_SIGNAL}`': the mean AUC's paired "
             "difference from the hidden-state regression (GC's paper observation).", "",
             "| signal | " + " | ".join(f"exit {x}" for x in exits) + " | mean [95% CI] | vs `" + REFERENCE_SIGNAL
             + "` [95% CI] | pooled |",
             "|---|" + "---|" * (len(exits) + 3)]
    for name, s in sig.items():
        ci = s.get("auc_mean_ci") or [None, None]
        d = s.get("auc_mean_minus_reference")
        dtxt = "–" if d is None else f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
        lines.append(f"| `{name}` | " + " | ".join(_f(a) for a in s["auc_per_exit"])
                     + f" | **{_f(s['auc_mean'])}** [{_f(ci[0])}, {_f(ci[1])}] | {dtxt} | {_f(s['auc_pooled'])} |")
    mr = report["matched_recall"]
    lines += ["", "## Precision at matched recall", "",
              f"Exit when the signal >= a threshold. Pooled over exit points: the precision at the first threshold "
              f"reaching recall 0.5, 0.8, and {_f(mr['pooled'])} (the recall of `full_max_prob >= {mr['threshold']}`); "
              "per exit point: at each exit's own matched recall ("
              + ", ".join(f"{x}: {_f(r)}" for x, r in zip(exits, mr["per_exit"])) + "), then the mean. "
              "The precision of always exiting is the base rate above.", "",
              "| signal | P @ R=0.5 | P @ R=0.8 | P @ matched R (pooled) | exits taken (matched) | "
              "P @ matched R, mean over exits |", "|---|---|---|---|---|---|"]
    for name, s in sig.items():
        p = s["precision_pooled"]
        m = p.get("matched_recall") or {}
        lines.append(f"| `{name}` | {_f((p.get('recall_0.5') or {}).get('precision'))} | "
                     f"{_f((p.get('recall_0.8') or {}).get('precision'))} | {_f(m.get('precision'))} | "
                     f"{_f(m.get('exit_share'))} | {_f(s['precision_matched_mean'])} |")
    sh = report["shape"]
    lines += ["", "## Cost of each signal", "",
              f"Multiply-accumulates per check (hidden {sh['hidden_size']}, vocabulary {sh['vocab_size']}, one decoder "
              f"layer = {sh['layer_macs']:,} MACs; a full LM head = {sh['lm_head_layers']} layers). 'first' is the "
              "check at the first exit point (the `first_full` source runs the full head there; saturation normalises "
              "the layer below); 'per token' checks every exit point.", "",
              "| signal | MACs / check | layers / check | MACs first check | layers first check | "
              "layers / token (all checks) |", "|---|---|---|---|---|---|"]
    for name, s in sig.items():
        c = s["cost"]
        lines.append(f"| `{name}` | {c['macs_per_check']:,} | {c['layers_per_check']:.4f} | {c['macs_first_check']:,} | "
                     f"{c['layers_first_check']:.4f} | {c['layers_per_token_all_checks']:.4f} |")
    lines += ["", "Descriptions:", ""] + [f"- `{n}`: {s['description']}" for n, s in sig.items()]
    return "\n".join(lines) + "\n"
