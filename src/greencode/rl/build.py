"""Build the trajectory bank from the LITE fine-tuned model (see :mod:`greencode.rl.bank`).

For each sampled file of ``rl.bank.split``: draw a context fraction uniformly from
``rl.bank.context_fraction``, build the prompt like the evaluator's samples (that
fraction of the file's CodeXGLUE tokens, bos + text, left-truncated to
``rl.bank.max_context_tokens`` model tokens; :func:`context_ids`), then decode ``T + 1`` tokens
with the sequence's behaviour controller (``rl.bank.behaviour``) through the one decoding loop with
``observe=True`` (:func:`record_batch`): for every decided token, its hidden state at every exit
point of the state that decoding reached (through :func:`greencode.decoding.policy_observation`),
every exit point's greedy prediction and the full model's prediction there (the label).
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

from greencode.config import config_from_dict
from greencode.data.corpus import text_sep
from greencode.decoding import generate, policy_observation
from greencode.decoding.controllers import recorded_features
from greencode.distributed import Dist
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.rl.bank import MANIFEST, TrajectoryBank, bytes_per_token, manifest_head
from greencode.rl.policy import load_policy
from greencode.rl.simulate import build_simulated_bank
from greencode.rl.sources import behaviour_specs, context_ids, load_data, make_behaviour
from greencode.utils import atomic_path, read_json, set_seed, setup_torch, torch_threads

log = logging.getLogger(__name__)


def _model_key(fp: dict) -> dict:
    return {k: v for k, v in fp.items() if k != "name_or_path"}


def _file_sha(path) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def _bank_settings(bc) -> dict:
    """The bank config as keyed: the simulate-only keys only when ``source`` is simulate, so a decoding
    bank built before they existed keeps its key."""
    d = dataclasses.asdict(bc)
    d.pop("record_features", None)  # keyed as the bank's observation_features (what it records)
    if bc.source == "decode":
        for k in ("source", "decision_tokens", "min_context_tokens"):
            d.pop(k, None)
    else:  # a simulated bank is the same bit for bit on any number of processes (tests/test_rl_simulate.py)
        d.pop("workers", None)
    return d


def bank_key(cfg, model) -> dict:
    """What a bank depends on: reused only when all of it matches (model fingerprint, exit
    layers, observation mode, corpus config and its manifest, bank config, seed)."""
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
        "observation_features": list(cfg.rl.observation_features),
        # the cand_* features' candidate source and k (only when they are observed, so other banks keep their key)
        **({"candidates": cfg.rl.candidates()} if cfg.rl.candidates() else {}),
        "corpus": {**cfg.section_dict("data", "tokenizer"), "split": cfg.rl.bank.split,
                   "corpus_manifest_sha256": corpus_id,
                   # the tuning slice's files follow from these (tuning_records)
                   **({"tuning_slice": {"size": cfg.calibration.sample_offset, "sample_seed": cfg.eval.sample_seed,
                                        "mode": cfg.eval.mode, "context_fraction": cfg.eval.context_fraction,
                                        "max_context_tokens": cfg.eval.max_context_tokens,
                                        "max_new_tokens": cfg.eval.max_new_tokens}}
                      if cfg.rl.bank.split == "tuning" else {})},
        "bank": _bank_settings(cfg.rl.bank),
        "behaviour_policy_sha256": _file_sha(cfg.rl.bank.policy_path) if cfg.rl.bank.behaviour == "policy" else None,
        "decoding": {"kv_strategy": cfg.decoding.kv_strategy,
                     "policy_temperature": cfg.decoding.policy_temperature if cfg.rl.bank.behaviour == "policy"
                     else None},
        "seed": cfg.seed,
    }, default=str))


def _load_model(cfg, model):
    if model is not None:
        return model
    device, dtype = setup_torch(cfg.hardware)
    return EarlyExitModel.from_run_config(cfg, RunPaths.from_config(cfg).finetuned, device=device, dtype=dtype)


@torch.inference_mode()
def record_batch(model, contexts: Sequence[Sequence[int]], controllers: Sequence, max_new_tokens: int,
                 observation: str, eos_token_id: Optional[int] = None,
                 kv_strategy: str = "propagate", features: Sequence[str] = (),
                 candidates: Optional[dict] = None) -> list[Optional[dict[str, np.ndarray]]]:
    """Decode each context with its behaviour controller (rows of one batched decode,
    :func:`greencode.decoding.generate` with ``observe=True``) and record, for every *decided*
    token (token 0 comes from the prefill and is never decided, so it is left out; up to
    ``max_new_tokens`` decided tokens): the observation at each early exit point [T, E, H]
    (float32, through :func:`greencode.decoding.policy_observation`), every exit point's
    greedy prediction [T, E+1] on the state this decoding reached (the last column: the full
    model's prediction there, the label), the emitted tokens [T] and the behaviour's exit
    point [T] (E = the final layer). None for a context whose decoding ended at token 0.
    ``features`` (``rl.observation_features``) are appended to each observation exactly as
    :class:`~greencode.decoding.PolicyExit` computes them at inference
    (:func:`greencode.decoding.controllers.recorded_features`; ``candidates``: ``{"source", "k"}`` of the
    cand_* features, ``RLConfig.candidates()``)."""
    if len(contexts) != len(controllers):
        raise ValueError(f"{len(contexts)} contexts but {len(controllers)} behaviour controllers")
    prompts = [list(c) for c in contexts]
    results = generate(model, prompts if len(prompts) > 1 else prompts[0], list(controllers),
                       max_new_tokens=max_new_tokens + 1, eos_token_id=eos_token_id, kv_strategy=kv_strategy,
                       observe=True)
    points = {layer: k for k, layer in enumerate(model.exit_points)}
    out: list[Optional[dict[str, np.ndarray]]] = []
    for res in results:
        if not res.exit_states:
            out.append(None)
            continue
        states = torch.stack(res.exit_states).to(model.device)  # [T, E, H]
        obs = policy_observation(model, states, observation)
        behaviour = np.asarray([points[layer] for layer in res.exit_layers[1:]], dtype=np.int16)
        if features:
            e = states.shape[1]
            prev = torch.cat([torch.tensor([e]), torch.from_numpy(behaviour[:-1].astype(np.int64))])  # token 0: final
            extra = recorded_features(model, states, prev, features, **(candidates or {}))
            obs = torch.cat([obs.cpu(), extra], dim=-1)
        out.append({"obs": obs.cpu().numpy(), "preds": torch.stack(res.exit_preds).numpy().astype(np.int32),
                    "tokens": np.asarray(res.tokens[1:], dtype=np.int32), "behaviour_exit": behaviour})
    return out


def build_bank(cfg, model=None, tokenizer=None, dataset=None, *, path: Optional[Path] = None,
               force: bool = False) -> Path:
    """Build (or reuse) the trajectory bank of ``cfg`` at ``RunPaths.bank``.

    Reuses an existing bank when its manifest matches the model fingerprint, exit layers,
    observation mode, corpus and bank config; otherwise rebuilds it. ``model`` defaults
    to the LITE fine-tuned model of the run, ``tokenizer`` to its tokenizer and
    ``dataset`` to ``greencode.data.load_corpus(cfg)`` (a DatasetDict, a Dataset or a
    list of records with a ``code`` token list, or plain strings). A ``dataset`` passed
    here is not part of the reuse check: pass ``force=True`` after changing it."""
    path = Path(path) if path is not None else RunPaths.from_config(cfg).bank
    cfg = dataclasses.replace(cfg, rl=cfg.rl.recording())  # the features the bank records (rl.bank.record_features)
    bc = cfg.rl.bank
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
    if bc.source == "simulate":  # teacher-forced windows with the behaviour's exits simulated

        return build_simulated_bank(cfg, model, path, key, tokenizer, dataset)

    tokenizer, records = load_data(cfg, tokenizer, dataset)
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    limit = getattr(model.hf.config, "max_position_embeddings", None) or 1 << 30
    max_ctx = max(2, min(bc.max_context_tokens, limit - bc.tokens_per_sequence))
    eos = getattr(tokenizer, "eos_token_id", None)
    model.eval()
    # one torch thread on CPU unless hardware.num_threads says otherwise (see torch_threads)
    threads = cfg.hardware.num_threads or (1 if model.device.type == "cpu" else torch.get_num_threads())

    dist = Dist.from_env()
    items, skipped = _plan(cfg, tokenizer, records, rng, max_ctx)
    try:
        with torch_threads(threads):
            recs = _record_all(cfg, model, items, eos, dist)
        if recs is None:  # another rank: rank 0 merges and saves
            dist.barrier()
            return path
        chunks, total, ended = _collect(cfg, items, recs)
        skipped += ended
        n_records = len(records)
        if not chunks:
            raise ValueError(f"no usable sequences in the {bc.split!r} split (all {n_records} records too short); "
                             "use a larger corpus or another rl.bank.split")
        out = _save_bank(cfg, model, chunks, total, skipped, key, path, rng)
        dist.barrier()
        return out
    finally:
        dist.close()


def _plan(cfg, tokenizer, records, rng, max_ctx) -> tuple[list[tuple[list[int], float, dict]], int]:
    """The sequences to record, fixed before any decoding (so every process agrees): for records in
    a seeded order, a context fraction and the prompt (records too short are skipped), until
    ``rl.bank.num_sequences``; then one behaviour spec each from its own seeded stream."""
    bc = cfg.rl.bank
    sep = text_sep(cfg)
    plan: list[tuple[list[int], float]] = []
    skipped = 0
    for idx in rng.permutation(len(records)):
        if len(plan) >= bc.num_sequences:
            break
        frac = float(rng.uniform(bc.context_fraction[0], bc.context_fraction[1]))
        context = context_ids(tokenizer, records[int(idx)], frac, max_ctx, sep)
        if context is None:
            skipped += 1
            continue
        plan.append((context, frac))
    specs = behaviour_specs(cfg, np.random.default_rng([cfg.seed, 1]), len(plan))
    return [(c, f, s) for (c, f), s in zip(plan, specs)], skipped


def _record_items(cfg, model, items, eos, progress: bool = True) -> list[Optional[dict[str, np.ndarray]]]:
    """Record planned sequences in batches of ``rl.bank.batch_size`` rows."""
    from tqdm.auto import tqdm

    bc = cfg.rl.bank
    policy = None
    if any(s["kind"] == "policy" for _, _, s in items):
        policy = load_policy(bc.policy_path, model)
    out: list[Optional[dict[str, np.ndarray]]] = []
    bar = tqdm(total=len(items), desc="trajectory bank", unit="seq", disable=not progress)
    for start in range(0, len(items), bc.batch_size):
        batch = items[start:start + bc.batch_size]
        controllers = [make_behaviour(s, cfg, model, policy) for _, _, s in batch]
        recs = record_batch(model, [c for c, _, _ in batch], controllers, bc.tokens_per_sequence, cfg.rl.observation,
                            eos, cfg.decoding.kv_strategy, cfg.rl.observation_features, cfg.rl.candidates())
        for (context, frac, spec), ctrl, rec in zip(batch, controllers, recs):
            if rec is not None:
                rec.update(context_len=np.asarray(len(context)), frac=np.asarray(frac), behaviour=ctrl.describe())
            out.append(rec)
        bar.update(len(batch))
    bar.close()
    return out


def _bank_worker(model, cfg_dict: dict, items, eos) -> list:
    """One process of a local multi-process bank (1 torch thread)."""
    cfg = config_from_dict(cfg_dict)
    with torch_threads(1):
        return _record_items(cfg, model, items, eos, progress=False)


def _record_all(cfg, model, items, eos, dist) -> Optional[list]:
    """Record every planned item: sharded over the ranks of a torchrun / accelerate launch (merged
    on rank 0 through files; other ranks get None), or over ``rl.bank.workers`` local processes
    (CPU), or here. The order of ``items`` is kept."""
    bc = cfg.rl.bank
    if dist.world_size > 1:
        shard_dir = RunPaths.from_config(cfg).root / ".bank-shards"
        mine = items[dist.rank::dist.world_size]
        recs = _record_items(cfg, model, mine, eos, progress=dist.is_main)
        shard_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(shard_dir / f"rank{dist.rank}.pt") as tmp:
            torch.save(recs, tmp)
        dist.barrier()
        out = None
        if dist.is_main:
            shards = [torch.load(shard_dir / f"rank{r}.pt", weights_only=False) for r in range(dist.world_size)]
            out = [None] * len(items)
            for r, shard in enumerate(shards):
                out[r::dist.world_size] = shard
            import shutil

            shutil.rmtree(shard_dir, ignore_errors=True)
        return out
    workers = min(bc.workers, len(items))
    if workers > 1 and model.device.type == "cpu":
        import concurrent.futures as cf
        import multiprocessing as mp

        log.info("trajectory bank: %d sequences on %d processes", len(items), workers)
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_bank_worker, model, cfg.to_dict(), items[k::workers], eos) for k in range(workers)]
            shards = [f.result() for f in futures]
        out = [None] * len(items)
        for k, shard in enumerate(shards):
            out[k::workers] = shard
        return out
    return _record_items(cfg, model, items, eos)


def _collect(cfg, items, recs) -> tuple[list[dict[str, np.ndarray]], int, int]:
    """The recorded sequences in plan order, cut at ``rl.bank.max_tokens``."""
    bc = cfg.rl.bank
    chunks, total, ended = [], 0, 0
    for rec in recs:
        if rec is None:
            ended += 1
            continue
        if bc.max_tokens is not None and total >= bc.max_tokens:
            break
        if bc.max_tokens is not None and total + len(rec["tokens"]) > bc.max_tokens:
            keep = bc.max_tokens - total
            rec = {k: (v[:keep] if isinstance(v, np.ndarray) and v.ndim else v) for k, v in rec.items()}
        chunks.append(rec)
        total += len(rec["tokens"])
    return chunks, total, ended


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

    manifest = {
        **manifest_head(cfg, model, key, bc),
        "context_lengths": [int(c["context_len"]) for c in chunks],
        "context_fractions": [round(float(c["frac"]), 4) for c in chunks],
        "behaviour": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c["behaviour"].items()}
                      for c in chunks],
        "behaviour_early_exit_share": float(np.mean(np.concatenate([c["behaviour_exit"] for c in chunks])
                                                    < len(model.exit_layers))),
        "first_token_left_out": True,
        "skipped_records": skipped,
        "note": "obs float16 [N, E, H] at the early exit points (final excluded) of the states the behaviour's "
                "decoding reached; preds [N, E+1] (column E = the final layer's prediction on that state, the "
                "label); l_opt [N] exit-point index (E = final layer); tokens [N] the emitted tokens; "
                "behaviour_exit [N] the behaviour's exit point; token 0 of each decoding (from the prefill, "
                "never decided) left out; 0-based layers",
    }
    bank = TrajectoryBank.from_arrays(obs16, np.concatenate([c["preds"] for c in chunks]),
                                      np.concatenate([[0], np.cumsum(lengths)]),
                                      tokens=np.concatenate([c["tokens"] for c in chunks]), heldout=heldout,
                                      manifest=manifest,
                                      behaviour_exit=np.concatenate([c["behaviour_exit"] for c in chunks]))
    bank.save(path)
    agree_y = float(np.mean(bank.preds[:, -1] == bank.tokens))
    log.info("trajectory bank: %d sequences, %d tokens, %d exit points, hidden %d, %d B/token (%.1f MB) at %s; "
             "behaviour %s exited early on %.1f%% of tokens; emitted token == full model's on %.1f%%", n_seq,
             bank.num_tokens, bank.n_exit_points, bank.hidden_size,
             bytes_per_token(bank.n_exit_points, bank.hidden_size), bank.manifest["size_bytes"] / 1e6, path,
             cfg.rl.bank.behaviour, 100 * manifest["behaviour_early_exit_share"], 100 * agree_y)
    return path
