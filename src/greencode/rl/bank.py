"""The trajectory bank: every exit point's hidden state and prediction for generated tokens.

The bank is what makes PPO fast: the LLM runs once per sampled sequence when the bank
is built, and never inside the environment. For each sampled training file a context
fraction is drawn uniformly from ``rl.bank.context_fraction``, and the sequence is decoded by
the real early-exit loop with a behaviour controller (``rl.bank.behaviour``: random exits, an
exported policy, or the full model), recording for each of its ``T = rl.bank.tokens_per_sequence``
decided tokens (token 0, from the prefill, is left out) the state that decoding reached:

* ``obs``   float16 [N, E, H]: the observation at each *early* exit point (``E`` =
  number of early exits; no decision is taken at the final layer), already through the
  one preprocessing :func:`greencode.decoding.policy_observation` (``rl.observation``:
  ``raw`` residual stream or ``normed`` = the model's own final norm) that
  :class:`~greencode.decoding.PolicyExit` applies identically at inference;
* ``preds`` int32 [N, E+1]: each exit point's greedy prediction; column ``E`` is the
  final layer's prediction ``y`` (the label);
* ``l_opt`` int16 [N]: the first exit point agreeing with ``y`` (``E`` = the final layer);
* ``tokens`` int32 [N]: the emitted token ids; ``behaviour_exit`` int16 [N] (optional file):
  the exit point the behaviour took; ``offsets`` int64 [S+1]: sequence
  ``s`` is tokens ``offsets[s]:offsets[s+1]``; ``heldout`` bool [S]: sequences kept
  aside for the agent's exit-accuracy report (``rl.bank.heldout_fraction``).

Size per token: ``2*E*H + 4*(E+1) + 2 + 4`` bytes, i.e. about ``2*E*H`` bytes (fp16
observations dominate). The embedded default (E=4 early exits, H=256) is 2,074 B/token,
about 9.3 MB for 300 x 15 tokens; Llama-3.2-3B (E=9, H=3072) is about 55 KB/token.
``rl.bank.max_tokens`` caps the number of stored tokens.

On disk: ``obs.npy``, ``preds.npy``, ``l_opt.npy``, ``tokens.npy``, ``offsets.npy``,
``heldout.npy`` and ``manifest.json`` (the model fingerprint, exit layers, observation
mode, corpus and bank config, sizes). The directory is written to a temporary folder
and renamed into place, so a half-written bank never exists.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from greencode.decoding.controllers import feature_size, uses_candidates
from greencode.provenance import weights_record
from greencode.rl.reward import optimal_exit
from greencode.utils import read_json, write_json

log = logging.getLogger(__name__)

BANK_FORMAT = "greencode-trajectory-bank/1"
MANIFEST = "manifest.json"
_ARRAYS = ("obs", "preds", "l_opt", "tokens", "offsets", "heldout")
# fingerprint keys that must match exactly for a bank/policy to belong to a model
STRUCTURE_KEYS = ("family", "num_layers", "hidden_size", "vocab_size", "exit_layers")


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` in ``path``'s place (a bank that exists is replaced whole), so a
    half-written bank never stands at ``path``."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def manifest_head(cfg, model, key: dict, bank_cfg) -> dict[str, Any]:
    """What every bank's manifest starts with, whichever source recorded it: its key, the model's
    fingerprint and weights record, the exit points, the observation and the bank settings."""
    import dataclasses

    fp = model.fingerprint()
    return {
        "key": key,
        "model": fp.get("name_or_path"),
        "fingerprint": fp,
        "weights": weights_record(model),  # carried into the RL stage's results (greencode.provenance)
        "exit_layers": list(model.exit_layers),
        "exit_points": list(model.exit_points),
        "final_layer": int(model.final_layer),
        "observation_features": list(cfg.rl.observation_features),
        "candidates": cfg.rl.candidates(),
        "observation": cfg.rl.observation,
        "corpus": key["corpus"],
        "bank_config": dataclasses.asdict(bank_cfg),
        "seed": cfg.seed,
    }


def bytes_per_token(n_exit_points: int, hidden_size: int) -> int:
    """Stored bytes per generated token (see module docstring)."""
    return 2 * n_exit_points * hidden_size + 4 * (n_exit_points + 1) + 2 + 4


def check_fingerprint(stored: dict, model_fp: dict, what: str, fix: str, strict_weights: bool = True) -> None:
    """Raise ValueError when ``stored`` (a bank's or a policy's) does not belong to the model."""
    for key in STRUCTURE_KEYS:
        if key in stored and key in model_fp and stored[key] != model_fp[key]:
            noun = {"exit_layers": "exit points (0-based exit layers)"}.get(key, key)
            raise ValueError(f"{what} was built for a model with {noun} {stored[key]!r}, but this model has "
                             f"{model_fp[key]!r}; {fix}")
    sw, mw = stored.get("weights_sha256"), model_fp.get("weights_sha256")
    if sw and mw and sw != mw:
        msg = (f"{what} was built for other model weights (weights_sha256 {sw} vs this model's {mw}, "
               f"model {stored.get('name_or_path')!r}); {fix}")
        if strict_weights:
            raise ValueError(msg)
        log.warning(msg)


@dataclass
class TrajectoryBank:
    obs: np.ndarray  # float16 [N, E, H]
    preds: np.ndarray  # int32 [N, E+1]
    l_opt: np.ndarray  # int16 [N]
    tokens: np.ndarray  # int32 [N]
    offsets: np.ndarray  # int64 [S+1]
    heldout: np.ndarray  # bool [S]
    manifest: dict
    behaviour_exit: Optional[np.ndarray] = None  # int16 [N]: the exit point the recording decoding took

    def __post_init__(self) -> None:
        self.validate()
        self._obs32: Optional[np.ndarray] = None

    def obs_float32(self) -> np.ndarray:
        """The observations as one contiguous float32 array, converted once and shared by every user of this
        bank (the vectorised environments, the classifier): a copy per environment made 8 copies of a 400k-token
        bank (2.7 GB each) and ran the 24 GB machine out of memory."""
        if self._obs32 is None:
            self._obs32 = np.ascontiguousarray(self.obs, dtype=np.float32)
        return self._obs32

    # ------------------------------------------------------------------ facts
    @property
    def num_tokens(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_exit_points(self) -> int:
        """Number of early exit points E (decision points); index E is the final layer."""
        return int(self.obs.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.obs.shape[2])

    @property
    def state_size(self) -> int:
        """The hidden-state part of an observation (the rest: ``observation_features``)."""
        return self.hidden_size - feature_size(self.manifest.get("observation_features", []), self.n_exit_points)

    @property
    def num_sequences(self) -> int:
        return int(len(self.offsets) - 1)

    @property
    def exit_layers(self) -> list[int]:
        return list(self.manifest.get("exit_layers", []))

    @property
    def observation(self) -> Optional[str]:
        return self.manifest.get("observation")

    def validate(self) -> None:
        n = self.obs.shape[0] if self.obs.ndim == 3 else -1
        problems = []
        if self.obs.ndim != 3:
            problems.append(f"obs must be [N, E, H], got shape {self.obs.shape}")
        elif self.preds.shape != (n, self.obs.shape[1] + 1):
            problems.append(f"preds shape {self.preds.shape} != (N, E+1) = {(n, self.obs.shape[1] + 1)}")
        if self.l_opt.shape != (n,) or self.tokens.shape != (n,):
            problems.append(f"l_opt {self.l_opt.shape} / tokens {self.tokens.shape} must be [N]={n}")
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != n or np.any(np.diff(self.offsets) < 1):
            problems.append("offsets must start at 0, end at N and be strictly increasing (no empty sequence)")
        if self.heldout.shape != (max(len(self.offsets) - 1, 0),):
            problems.append(f"heldout must have one flag per sequence, got {self.heldout.shape}")
        exits = self.manifest.get("exit_layers")
        if self.behaviour_exit is not None and self.behaviour_exit.shape != (n,):
            problems.append(f"behaviour_exit {self.behaviour_exit.shape} must be [N]={n}")
        if exits is not None and self.obs.ndim == 3 and len(exits) != self.obs.shape[1]:
            problems.append(f"manifest exit_layers {exits} do not match E={self.obs.shape[1]} in obs")
        if not problems and n and not np.array_equal(self.l_opt.astype(np.int64), optimal_exit(self.preds)):
            problems.append("l_opt does not equal the first exit point agreeing with the final prediction")
        if problems:
            raise ValueError("invalid trajectory bank: " + "; ".join(problems)
                             + ". Rebuild it with scripts/build_bank.py")

    def sequences(self, heldout: Optional[bool]) -> "TrajectoryBank":
        """The bank restricted to training (``False``), held-out (``True``) or all (``None``) sequences."""
        if heldout is None:
            return self
        keep = np.flatnonzero(self.heldout == heldout)
        if keep.size == 0:
            raise ValueError(f"the bank has no {'held-out' if heldout else 'training'} sequences; "
                             "change rl.bank.heldout_fraction or rl.bank.num_sequences and rebuild the bank")
        return self._take(keep)

    def _take(self, keep: np.ndarray) -> "TrajectoryBank":
        """The bank of sequences ``keep`` (sorted indices), their held-out flags kept."""
        idx = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in keep])
        lengths = self.offsets[keep + 1] - self.offsets[keep]
        return TrajectoryBank(obs=self.obs[idx], preds=self.preds[idx], l_opt=self.l_opt[idx], tokens=self.tokens[idx],
                              offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                              heldout=self.heldout[keep], manifest=dict(self.manifest),
                              behaviour_exit=None if self.behaviour_exit is None else self.behaviour_exit[idx])

    def with_features(self, features, candidates: Optional[dict]) -> "TrajectoryBank":
        """The bank as if recorded with observation features ``features`` (any subset of the stored ones, in
        any order: the hidden state, then each asked feature's columns, as the policy computes them online),
        so ablations over the observation share one bank. ``candidates`` (``RLConfig.candidates()``) must equal
        the stored source and k when a cand_* feature is asked. Returns ``self`` when nothing changes; raises
        ValueError naming the fix when a feature was not recorded."""
        stored = list(self.manifest.get("observation_features", []))
        features = list(features)
        fix = "rebuild the bank with scripts/build_bank.py (rl.observation_features)"
        if features == stored and (not uses_candidates(features) or self.manifest.get("candidates") == candidates):
            return self
        missing = [f for f in features if f not in stored]
        if missing:
            raise ValueError(f"the bank holds observation features {stored}; {missing} were not recorded; {fix}")
        if uses_candidates(features) and self.manifest.get("candidates") != candidates:
            raise ValueError(f"the bank's candidate features come from {self.manifest.get('candidates')} but the "
                             f"config asks for {candidates} (rl.candidate_source, rl.candidate_k); {fix}")
        e, h = self.n_exit_points, self.state_size
        spans, at = {}, h
        for f in stored:
            w = feature_size([f], e)
            spans[f] = np.arange(at, at + w)
            at += w
        cols = np.concatenate([np.arange(h)] + [spans[f] for f in features])
        manifest = dict(self.manifest, observation_features=features,
                        candidates=candidates if uses_candidates(features) else None,
                        recorded_features=stored)
        return TrajectoryBank(obs=np.ascontiguousarray(self.obs[:, :, cols]), preds=self.preds, l_opt=self.l_opt,
                              tokens=self.tokens, offsets=self.offsets, heldout=self.heldout, manifest=manifest,
                              behaviour_exit=self.behaviour_exit)

    def training_subset(self, max_tokens: Optional[int], seed: int = 0) -> "TrajectoryBank":
        """A seeded random subset of the training sequences holding at most ``max_tokens`` tokens (at least one
        sequence), the held-out sequences all kept, so an agent trained on less data is judged on the same
        held-out tokens (the data-size ablation). ``None``, or a cap the training part fits in: ``self``."""
        train = np.flatnonzero(~self.heldout)
        lengths = np.diff(self.offsets)
        if max_tokens is None or int(lengths[train].sum()) <= int(max_tokens):
            return self
        order = np.random.default_rng(seed).permutation(train)
        cum = np.cumsum(lengths[order])
        keep_train = order[:max(1, int(np.searchsorted(cum, int(max_tokens), side="right")))]
        sub = self._take(np.sort(np.concatenate([keep_train, np.flatnonzero(self.heldout)])))
        sub.manifest.update(num_tokens=sub.num_tokens, num_sequences=sub.num_sequences,
                            training_subset={"max_tokens": int(max_tokens), "seed": int(seed),
                                             "of_tokens": self.num_tokens})
        return sub

    def l_opt_histogram(self) -> dict[str, Any]:
        """How often each exit point is the optimal exit (paper Fig. 7)."""
        counts = np.bincount(self.l_opt.astype(np.int64), minlength=self.n_exit_points + 1)
        layers = self.exit_layers + [self.manifest.get("final_layer")] if self.exit_layers else None
        total = max(int(counts.sum()), 1)
        return {"exit_point": list(range(self.n_exit_points + 1)), "layer": layers,
                "count": counts.tolist(), "share": (counts / total).tolist(), "num_tokens": self.num_tokens}

    # ------------------------------------------------------------------ io
    @classmethod
    def from_arrays(cls, obs: np.ndarray, preds: np.ndarray, offsets: np.ndarray, *, tokens: Optional[np.ndarray] = None,
                    heldout: Optional[np.ndarray] = None, manifest: Optional[dict] = None,
                    behaviour_exit: Optional[np.ndarray] = None) -> "TrajectoryBank":
        """Build a bank from arrays (``l_opt`` is derived from ``preds``)."""
        obs = np.asarray(obs, dtype=np.float16)
        preds = np.asarray(preds, dtype=np.int32)
        offsets = np.asarray(offsets, dtype=np.int64)
        n = obs.shape[0]
        return cls(obs=obs, preds=preds, l_opt=optimal_exit(preds).astype(np.int16),
                   tokens=np.asarray(tokens if tokens is not None else preds[:, -1], dtype=np.int32),
                   offsets=offsets,
                   heldout=np.asarray(heldout if heldout is not None else np.zeros(len(offsets) - 1, bool), dtype=bool),
                   manifest=dict(manifest or {}, num_tokens=int(n)),
                   behaviour_exit=None if behaviour_exit is None else np.asarray(behaviour_exit, dtype=np.int16))

    def save(self, path: Union[str, Path]) -> Path:
        """Write atomically: a temporary sibling directory renamed over ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name), allow_pickle=False)
            if self.behaviour_exit is not None:
                np.save(tmp / "behaviour_exit.npy", self.behaviour_exit, allow_pickle=False)
            manifest = {k: v for k, v in self.manifest.items() if k != "path"}
            manifest = dict(manifest, format=BANK_FORMAT, num_tokens=self.num_tokens,
                            num_sequences=self.num_sequences, n_exit_points=self.n_exit_points,
                            hidden_size=self.hidden_size,
                            bytes_per_token=bytes_per_token(self.n_exit_points, self.hidden_size),
                            size_bytes=int(sum(getattr(self, a).nbytes for a in _ARRAYS)))
            write_json(tmp / MANIFEST, manifest)
            replace_dir(tmp, path)
            self.manifest = manifest
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model=None, *, observation: Optional[str] = None,
             mmap: bool = False, strict_weights: bool = True) -> "TrajectoryBank":
        """Load a bank; with ``model`` (an EarlyExitModel) check it was built for that model
        (family, depth, hidden size, vocabulary, exit layers, weights); with ``observation``
        check the preprocessing mode. Mismatches raise ValueError naming the fix."""
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"no trajectory bank at {str(path)!r} (missing {MANIFEST}); build it with "
                                    "`python scripts/build_bank.py --config <cfg>`")
        manifest = read_json(mf)
        if manifest.get("format") != BANK_FORMAT:
            raise ValueError(f"{str(mf)!r} has format {manifest.get('format')!r}, expected {BANK_FORMAT!r}; "
                             "rebuild the bank with scripts/build_bank.py")
        fix = "rebuild the bank for this model with `python scripts/build_bank.py --config <cfg>`"
        if model is not None:
            check_fingerprint(manifest.get("fingerprint", {}), model.fingerprint(), f"the bank at {str(path)!r}",
                              fix, strict_weights=strict_weights)
        if observation is not None and manifest.get("observation") != observation:
            raise ValueError(f"the bank at {str(path)!r} holds {manifest.get('observation')!r} observations but "
                             f"rl.observation={observation!r}; {fix}")
        arrays = {}
        for name in _ARRAYS:
            f = path / f"{name}.npy"
            if not f.is_file():
                raise FileNotFoundError(f"trajectory bank {str(path)!r} is incomplete (missing {f.name}); {fix}")
            arrays[name] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
        extra = path / "behaviour_exit.npy"  # optional: banks recorded from an exiting decoding
        if extra.is_file():
            arrays["behaviour_exit"] = np.load(extra, mmap_mode="r" if mmap else None, allow_pickle=False)
        bank = cls(manifest=dict(manifest, path=str(path)), **arrays)
        if model is not None and bank.state_size != model.hidden_size:
            raise ValueError(f"the bank at {str(path)!r} has hidden size {bank.state_size} but the model has "
                             f"{model.hidden_size}; {fix}")
        return bank


def synthetic_bank(num_sequences: int = 20, tokens_per_sequence: int = 15, n_exit_points: int = 4,
                   hidden_size: int = 32, *, vocab_size: int = 50, heldout_fraction: float = 0.2,
                   seed: int = 0, signal: float = 2.0) -> TrajectoryBank:
    """A bank with random observations in which ``obs`` carries information about
    ``l_opt`` (its first coordinates encode whether each exit point agrees with the final
    prediction, scaled by ``signal``), so a policy can learn from it. For tests and for
    measuring environment / PPO speed without an LLM."""
    rng = np.random.default_rng(seed)
    n = num_sequences * tokens_per_sequence
    e = n_exit_points
    y = rng.integers(0, vocab_size, size=n)
    # l_opt skewed to early exits like a LITE model: geometric over 0..E
    l_opt = np.minimum(rng.geometric(0.45, size=n) - 1, e)
    preds = rng.integers(0, vocab_size, size=(n, e + 1))
    for k in range(e):
        agree = k >= l_opt  # monotone agreement after l_opt ...
        flip = rng.random(n) < 0.1  # ... with occasional disagreement after l_opt
        preds[:, k] = np.where(agree & ~(flip & (k > l_opt)), y, np.where(preds[:, k] == y, (y + 1) % vocab_size, preds[:, k]))
    preds[:, e] = y
    obs = rng.standard_normal((n, e, hidden_size)).astype(np.float32)
    agree_now = preds[:, :e] == y[:, None]
    obs[:, :, 0] += signal * (2 * agree_now - 1)
    obs[:, :, 1] += signal * (np.arange(e)[None, :] / max(e - 1, 1))
    offsets = np.arange(0, n + 1, tokens_per_sequence)
    n_held = int(round(heldout_fraction * num_sequences))
    heldout = np.zeros(num_sequences, bool)
    heldout[rng.permutation(num_sequences)[:n_held]] = True
    manifest = {"synthetic": True, "exit_layers": list(range(1, e + 1)), "final_layer": e + 1,
                "observation": "normed", "fingerprint": {"hidden_size": hidden_size,
                                                         "exit_layers": list(range(1, e + 1))}}
    return TrajectoryBank.from_arrays(obs, preds, offsets, tokens=y, heldout=heldout, manifest=manifest)
