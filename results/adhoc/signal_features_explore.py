"""Exploration (issue 30, "learning works"): which cheap features could lift the exit decision's held-out AUC
from ~0.81 to the issue's 0.85? Uses the signal analysis's own teacher-forced pass (greencode.eval.signal_quality:
the same validation windows, file-disjoint split and per-exit AUC) and adds candidate features it does not have:

* ``history``: the cheap[first_full] features of every earlier exit point of the same token (the trajectory of
  the candidate softmax over depth), zero-padded, beside this exit's;
* ``token prior``: the agreement rate, per exit point, of the exit's top candidate token (and of the input token),
  counted on the train files (a lookup: no MACs);
* nonlinear read-outs (sklearn HistGradientBoosting) of the same features, to see whether the linear read-out is
  what limits.

Validation split only (train part fits, test part scores). Not a result of the pipeline: a sweep to choose what to
build. Usage: python results/adhoc/signal_features_explore.py --config configs/default.yaml [--model DIR]
Writes results/adhoc/signal_features_explore.json.
"""

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from greencode.config import load_config
from greencode.decoding.signals import FEATURES
from greencode.eval import signal_quality as sq
from greencode.provenance import weights_record
from greencode.runinfo import run_metadata
from greencode.stats import auc
from greencode.utils import write_json


def per_exit_auc(score, y, ex, e):
    out = [auc(score[ex == j], y[ex == j]) for j in range(e)]
    return [[round(float(a), 4) for a in out], round(float(np.mean(out)), 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--files", type=int, default=150)
    ap.add_argument("--out", default="results/adhoc/signal_features_explore.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(cfg.seed)
    src_dir, kind, model, tok, windows, bigram, _ = sq._load(cfg, args.model, args.files, 512, 64, 4, ["first_full"], 0)
    exits = list(model.exit_layers)
    e = len(exits)
    extra = {"cand_top1_id": [], "full_top1_id": [], "input_id": []}
    real = sq._exit_heads
    counter = {"b0": 0}

    def spy(model_, hs, exits_):
        out = real(model_, hs, exits_)
        final_logits, final_pred, agree, full, first_logits = out
        batch = windows[counter["b0"]:counter["b0"] + agree.shape[1]]
        counter["b0"] += agree.shape[1]
        cands = torch.topk(first_logits, 4, -1).indices  # [B, T, 4]
        cand_ids, full_ids = [], []
        for layer in exits_:
            lg = model_.decode(hs[layer]).float()
            full_ids.append(lg.argmax(-1))
            cand_ids.append(torch.gather(cands, -1, torch.gather(lg, -1, cands).argmax(-1, keepdim=True))[..., 0])
        cand_ids, full_ids = torch.stack(cand_ids, -1), torch.stack(full_ids, -1)  # [B, T, E]
        for r, w in enumerate(batch):
            n = len(w["ids"])
            extra["cand_top1_id"].append(cand_ids[r, 1:n].reshape(-1).cpu().numpy())
            extra["full_top1_id"].append(full_ids[r, 1:n].reshape(-1).cpu().numpy())
            extra["input_id"].append(np.repeat(np.asarray(w["ids"][1:n]), e))
        return out

    sq._exit_heads = spy
    t0 = time.perf_counter()
    cache = Path(args.out).with_suffix(".pkl")
    if cache.exists():  # the teacher-forced pass of an earlier run of this script (same model and windows)
        with open(cache, "rb") as f:
            data = pickle.load(f)
    else:
        data = sq.collect(model, windows, k=4, sources=["first_full"], bigram=None, batch_size=8,
                          pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        for key, v in extra.items():
            data[key] = np.concatenate(v)
            assert len(data[key]) == len(data["label"]), (key, len(data[key]), len(data["label"]))
        with open(cache, "wb") as f:
            pickle.dump(data, f)
    if "prev_final_max_prob" not in data:  # the previous token's own confidence at the final layer (free online)
        vals = []
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with torch.no_grad():
            for b0 in range(0, len(windows), 8):
                batch = windows[b0:b0 + 8]
                ids, mask = sq._pad_right(batch, pad, model.device)
                probs = torch.softmax(model.hf(input_ids=ids, attention_mask=mask).logits.float(), -1).amax(-1)
                for r, w in enumerate(batch):
                    n = len(w["ids"])
                    vals.append(np.repeat(probs[r, :n - 1].cpu().numpy(), e))  # position t sees t-1's
        data["prev_final_max_prob"] = np.concatenate(vals)
        assert len(data["prev_final_max_prob"]) == len(data["label"])
        with open(cache, "wb") as f:
            pickle.dump(data, f)
    t_pass = time.perf_counter() - t0
    n_train_files, train, test, small = sq._split(data, len(windows), 0.5, 4000, cfg.seed)
    y, ex = data["label"], data["exit"]
    hidden = data["hidden"].astype(np.float32)
    cheap = data["cheap_first_full"]  # [N*E, F + E]
    nf = len(FEATURES)
    # history: features of exit points <= j of the same token ([n, E, F] -> per row j the first j+1 blocks)
    blocks = cheap[:, :nf].reshape(-1, e, nf)
    hist = np.zeros((len(y), e * nf), dtype=np.float32)
    for j in range(e):
        rows = np.flatnonzero(ex == j)
        hist[rows, :(j + 1) * nf] = blocks[:, :j + 1].reshape(len(rows), -1)

    # token priors: smoothed agreement rate per (exit point, token). Test rows get the rate counted on all train
    # rows; train rows get it out of fold (5 folds by file), so the read-out is not fitted on in-sample rates
    def rates(ids, rows, j, v):
        tr = rows[ex[rows] == j]
        base = y[tr].mean()
        cnt = np.bincount(ids[tr], minlength=v).astype(np.float64)
        pos = np.bincount(ids[tr], weights=y[tr].astype(np.float64), minlength=v)
        return (pos + 20 * base) / (cnt + 20)

    def prior(ids):
        v = int(ids.max()) + 1
        out = np.zeros(len(y), dtype=np.float32)
        fold = data["file"] % 5
        is_train = np.zeros(len(y), dtype=bool)
        is_train[train] = True
        for j in range(e):
            rows = np.flatnonzero((ex == j) & ~is_train)
            rate = rates(ids, train, j, v)
            out[rows] = np.log(rate[ids[rows]] / (1 - rate[ids[rows]]))
            for k in range(5):
                held = np.flatnonzero((ex == j) & is_train & (fold == k))
                rate = rates(ids, train[fold[train] != k], j, v)
                out[held] = np.log(rate[ids[held]] / (1 - rate[ids[held]]))
        return out

    p_cand, p_full, p_in = prior(data["cand_top1_id"]), prior(data["full_top1_id"]), prior(data["input_id"])
    full3 = np.stack([data[f"full_{s}"] for s in sq.FULL_STATS], 1)
    pf = data["prev_final_max_prob"]
    sets = {
        "cheap": lambda r: cheap[r],
        "cheap+prevconf": lambda r: np.concatenate([cheap[r], pf[r, None]], 1),
        "cheap+hist+prior+prevconf": lambda r: np.concatenate([cheap[r], hist[r], p_cand[r, None], p_in[r, None],
                                                               pf[r, None]], 1),
        "cheap+hist": lambda r: np.concatenate([cheap[r], hist[r]], 1),
        "cheap+prior": lambda r: np.concatenate([cheap[r], p_cand[r, None], p_in[r, None]], 1),
        "cheap+hist+prior": lambda r: np.concatenate([cheap[r], hist[r], p_cand[r, None], p_in[r, None]], 1),
        "hidden+cheap": lambda r: np.concatenate([hidden[r], cheap[r]], 1),
        "hidden+cheap+hist+prior": lambda r: np.concatenate([hidden[r], cheap[r], hist[r], p_cand[r, None],
                                                             p_in[r, None]], 1),
        "full3+prior_full": lambda r: np.concatenate([full3[r], p_full[r, None], p_in[r, None],
                                                      np.eye(e, dtype=np.float32)[ex[r]]], 1),
    }
    res = {"note": "AUC per exit point [1, 2, 3, 4, 5, 7, 9] and mean; read-outs fitted on the train files, scored "
                   "on the test files; [per-exit, mean, fit seconds]", "model_dir": src_dir,
           "model": model.fingerprint(), "weights": getattr(model, "loaded_from", None), "files": len(windows), "train_files": n_train_files,
           "tokens": {"train": len(train) // e, "test": len(test) // e}, "pass_s": round(t_pass, 1), "signals": {}}
    for name, sc in {"prior[cand_top1]": p_cand, "prior[input]": p_in, "full_margin": data["full_margin"],
                     "cheap_max_prob": cheap[:, 0],
                     "prev_final_max_prob": data["prev_final_max_prob"]}.items():
        res["signals"][name] = per_exit_auc(sc[test], y[test], ex[test], e)
        print(name, res["signals"][name], flush=True)
    from sklearn.ensemble import HistGradientBoostingClassifier

    for name, fn in sets.items():
        t1 = time.perf_counter()
        s = sq.fit_logistic(fn(train), y[train], cfg.seed)(fn(test))
        res["signals"][f"{name}_lr"] = per_exit_auc(s, y[test], ex[test], e) + [round(time.perf_counter() - t1, 1)]
        print(f"{name}_lr", res["signals"][f"{name}_lr"], flush=True)
        if not name.startswith("hidden"):
            t1 = time.perf_counter()
            gb = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, random_state=cfg.seed)
            gb.fit(fn(train), y[train])
            s = gb.predict_proba(fn(test))[:, 1]
            res["signals"][f"{name}_gbt"] = per_exit_auc(s, y[test], ex[test], e) + [round(time.perf_counter() - t1, 1)]
            print(f"{name}_gbt", res["signals"][f"{name}_gbt"], flush=True)
    res["meta"] = run_metadata(cfg, stage="adhoc_signal_features", weights=weights_record(model))
    write_json(args.out, res)  # scrubs machine paths
    print("->", args.out)


if __name__ == "__main__":
    sys.exit(main())
