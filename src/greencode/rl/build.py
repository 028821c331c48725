"""Build the trajectory bank from the LITE fine-tuned model (see :mod:`greencode.rl.bank`).

For each sampled file of ``rl.bank.split``: draw a context fraction uniformly from
``rl.bank.context_fraction``, build the prompt like the evaluator's samples (that
fraction of the file's CodeXGLUE tokens, bos + text, left-truncated to
``rl.bank.max_context_tokens`` model tokens; :func:`context_ids`), generate ``T`` tokens greedily
with the full model (:func:`greencode.decoding.generate`, ``NeverExit``), then one
forward pass over context + generated tokens records each generated token's hidden
state at every exit point (through :func:`greencode.decoding.policy_observation`),
every exit point's greedy prediction and the final layer's prediction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from greencode.rl.bank import MANIFEST, TrajectoryBank, bytes_per_token, torch_threads
from greencode.utils import read_json

log = logging.getLogger(__name__)


def _model_key(fp: dict) -> dict:
    return {k: v for k, v in fp.items() if k != "name_or_path"}


def bank_key(cfg, model) -> dict:
    """What a bank depends on: reused only when all of it matches (model fingerprint, exit
    layers, observation mode, corpus config and its manifest, bank config, seed)."""
    from greencode.paths import RunPaths

    corpus_manifest = RunPaths.from_config(cfg).corpus / "manifest.json"
    corpus_id = None
    if corpus_manifest.is_file():
        try:
            corpus_id = hashlib.sha256(corpus_manifest.read_bytes()).hexdigest()[:16]
        except OSError:
            corpus_id = None
    return json.loads(json.dumps({
        "model": _model_key(model.fingerprint()),
        "exit_layers": list(model.exit_layers),
        "observation": cfg.rl.observation,
        "corpus": {**cfg.section_dict("data", "tokenizer"), "split": cfg.rl.bank.split,
                   "corpus_manifest_sha256": corpus_id},
        "bank": dataclasses.asdict(cfg.rl.bank),
        "seed": cfg.seed,
    }, default=str))


def _records(dataset: Any, split: str) -> Sequence:
    if hasattr(dataset, "keys") and callable(dataset.keys) and split in dataset.keys():
        return dataset[split]
    if hasattr(dataset, "keys") and callable(dataset.keys) and "code" not in dataset.keys():
        raise ValueError(f"the corpus has no split {split!r} (has {list(dataset.keys())}); "
                         "set rl.bank.split to one of them")
    return dataset


def _code_tokens(record: Any) -> list[str]:
    """The CodeXGLUE tokens of a record without ``<s>`` / ``</s>`` (a plain string: its
    space-separated words)."""
    if isinstance(record, str):
        return record.split()
    code = list(record["code"])
    if code and code[0] == "<s>":
        code = code[1:]
    if code and code[-1] == "</s>":
        code = code[:-1]
    return code


def context_ids(tokenizer, record: Any, fraction: float, max_context_tokens: int, sep: str = " ") -> Optional[list[int]]:
    """The prompt for one bank sequence, built like the evaluator's samples: the first
    ``int(fraction * n)`` CodeXGLUE tokens of the record joined by spaces, encoded by
    :func:`greencode.data.encode_context` (bos + text, left-truncated to
    ``max_context_tokens``). None when the record has fewer than 2 tokens."""
    from greencode.data import encode_context

    body = _code_tokens(record)
    if len(body) < 2:
        return None
    n = min(max(1, int(len(body) * fraction)), len(body) - 1)
    return encode_context(tokenizer, sep.join(body[:n]), max_context_tokens)


def _load_model(cfg, model):
    if model is not None:
        return model
    from greencode.models import EarlyExitModel
    from greencode.paths import RunPaths
    from greencode.utils import setup_torch

    device, dtype = setup_torch(cfg.hardware)
    return EarlyExitModel.from_run_config(cfg, RunPaths.from_config(cfg).finetuned, device=device, dtype=dtype)


def _load_data(cfg, tokenizer, dataset):
    from greencode.paths import RunPaths

    finetuned = RunPaths.from_config(cfg).finetuned
    if tokenizer is None:
        if (finetuned / "tokenizer_config.json").is_file() or (finetuned / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(finetuned)
        else:
            from greencode.data import load_tokenizer

            tokenizer = load_tokenizer(cfg)
    if dataset is None:
        from greencode.data import load_corpus

        dataset = load_corpus(cfg)
    return tokenizer, _records(dataset, cfg.rl.bank.split)


@torch.inference_mode()
def record_sequence(model, context_ids: Sequence[int], max_new_tokens: int, observation: str,
                    eos_token_id: Optional[int] = None) -> dict[str, np.ndarray]:
    """Generate greedily with the full model, then record every generated token's
    observations [T, E, H] (float32), predictions [T, E+1] and the tokens [T]."""
    from greencode.decoding import NeverExit, generate, policy_observation

    res = generate(model, list(context_ids), NeverExit(), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    toks = res.tokens
    ids = torch.tensor([list(context_ids) + toks[:-1]], dtype=torch.long, device=model.device)
    p = len(context_ids)
    hs = model.exit_hidden_states(ids)  # [1, L, H] per exit point + final
    sl = slice(p - 1, p - 1 + len(toks))  # position i predicts token i + 1
    preds = torch.stack([model.decode(h[0, sl]).argmax(-1) for h in hs], dim=1)  # [T, E+1]
    obs = torch.stack([policy_observation(model, h[0, sl], observation) for h in hs[:-1]], dim=1)  # [T, E, H]
    return {"obs": obs.float().cpu().numpy(), "preds": preds.cpu().numpy().astype(np.int32),
            "tokens": np.asarray(toks, dtype=np.int32)}


def build_bank(cfg, model=None, tokenizer=None, dataset=None, *, path: Optional[Path] = None,
               force: bool = False) -> Path:
    """Build (or reuse) the trajectory bank of ``cfg`` at ``RunPaths.bank``.

    Reuses an existing bank when its manifest matches the model fingerprint, exit layers,
    observation mode, corpus and bank config; otherwise rebuilds it. ``model`` defaults
    to the LITE fine-tuned model of the run, ``tokenizer`` to its tokenizer and
    ``dataset`` to ``greencode.data.load_corpus(cfg)`` (a DatasetDict, a Dataset or a
    list of records with a ``code`` token list, or plain strings). A ``dataset`` passed
    here is not part of the reuse check: pass ``force=True`` after changing it."""
    from greencode.paths import RunPaths
    from greencode.utils import set_seed

    bc = cfg.rl.bank
    path = Path(path) if path is not None else RunPaths.from_config(cfg).bank
    model = _load_model(cfg, model)
    key = bank_key(cfg, model)
    if not force and (path / MANIFEST).is_file():
        try:
            stored = read_json(path / MANIFEST).get("key")
        except (OSError, ValueError):
            stored = None
        if stored == key:
            log.info("reusing the trajectory bank at %s (manifest matches model, exits, corpus and config)", path)
            return path
        log.info("the trajectory bank at %s was built for another model/exits/corpus/config; rebuilding", path)

    tokenizer, records = _load_data(cfg, tokenizer, dataset)
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    limit = getattr(model.hf.config, "max_position_embeddings", None) or 1 << 30
    max_ctx = max(2, min(bc.max_context_tokens, limit - bc.tokens_per_sequence))
    eos = getattr(tokenizer, "eos_token_id", None)
    model.eval()
    # one torch thread on CPU unless hardware.num_threads says otherwise (see torch_threads)
    threads = cfg.hardware.num_threads or (1 if model.device.type == "cpu" else torch.get_num_threads())
    with torch_threads(threads):
        chunks, total, skipped = _record_all(cfg, model, tokenizer, records, rng, max_ctx, eos)
    n_records = len(records)
    if not chunks:
        raise ValueError(f"no usable sequences in the {bc.split!r} split (all {n_records} records too short); "
                         "use a larger corpus or another rl.bank.split")
    return _save_bank(cfg, model, chunks, total, skipped, key, path, rng)


def _record_all(cfg, model, tokenizer, records, rng, max_ctx, eos):
    from tqdm.auto import tqdm

    from greencode.data.corpus import text_sep

    bc = cfg.rl.bank
    sep = text_sep(cfg)
    chunks: list[dict[str, np.ndarray]] = []
    total = 0
    skipped = 0
    order = rng.permutation(len(records))
    bar = tqdm(total=bc.num_sequences, desc="trajectory bank", unit="seq")
    for idx in order:
        if len(chunks) >= bc.num_sequences or (bc.max_tokens is not None and total >= bc.max_tokens):
            break
        frac = float(rng.uniform(bc.context_fraction[0], bc.context_fraction[1]))
        context = context_ids(tokenizer, records[int(idx)], frac, max_ctx, sep)
        if context is None:
            skipped += 1
            continue
        rec = record_sequence(model, context, bc.tokens_per_sequence, cfg.rl.observation, eos)
        if bc.max_tokens is not None and total + len(rec["tokens"]) > bc.max_tokens:
            keep = bc.max_tokens - total
            rec = {k: v[:keep] for k, v in rec.items()}
        rec["context_len"] = np.asarray(len(context))
        rec["frac"] = np.asarray(frac)
        chunks.append(rec)
        total += len(rec["tokens"])
        bar.update(1)
    bar.close()
    return chunks, total, skipped


def _save_bank(cfg, model, chunks, total, skipped, key, path, rng) -> Path:
    bc = cfg.rl.bank
    if len(chunks) < bc.num_sequences and (bc.max_tokens is None or total < bc.max_tokens):
        log.warning("the corpus gave only %d of rl.bank.num_sequences=%d sequences", len(chunks), bc.num_sequences)
    obs = np.concatenate([c["obs"] for c in chunks])
    obs16 = obs.astype(np.float16)
    if not np.isfinite(obs16).all():
        raise ValueError("some observations overflow float16 (|value| > 65504); use rl.observation=normed")
    lengths = [len(c["tokens"]) for c in chunks]
    n_seq = len(chunks)
    n_held = min(int(round(bc.heldout_fraction * n_seq)), n_seq - 1)
    heldout = np.zeros(n_seq, dtype=bool)
    heldout[rng.permutation(n_seq)[:n_held]] = True
    fp = model.fingerprint()
    manifest = {
        "key": key,
        "model": fp.get("name_or_path"),
        "fingerprint": fp,
        "exit_layers": list(model.exit_layers),
        "exit_points": list(model.exit_points),
        "final_layer": int(model.final_layer),
        "observation": cfg.rl.observation,
        "corpus": key["corpus"],
        "bank_config": dataclasses.asdict(bc),
        "seed": cfg.seed,
        "context_lengths": [int(c["context_len"]) for c in chunks],
        "context_fractions": [round(float(c["frac"]), 4) for c in chunks],
        "skipped_records": skipped,
        "note": "obs float16 [N, E, H] at the early exit points (final excluded); preds [N, E+1] (column E = "
                "final layer); l_opt [N] exit-point index (E = final layer); 0-based layers",
    }
    bank = TrajectoryBank.from_arrays(obs16, np.concatenate([c["preds"] for c in chunks]),
                                      np.concatenate([[0], np.cumsum(lengths)]),
                                      tokens=np.concatenate([c["tokens"] for c in chunks]), heldout=heldout,
                                      manifest=manifest)
    bank.save(path)
    agree_y = float(np.mean(bank.preds[:, -1] == bank.tokens))
    log.info("trajectory bank: %d sequences, %d tokens, %d exit points, hidden %d, %d B/token (%.1f MB) at %s; "
             "final-layer prediction == generated token on %.1f%%", n_seq, bank.num_tokens, bank.n_exit_points,
             bank.hidden_size, bytes_per_token(bank.n_exit_points, bank.hidden_size),
             bank.manifest["size_bytes"] / 1e6, path, 100 * agree_y)
    return path
