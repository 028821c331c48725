"""Cheap exit signals: what an exit decision can see without running the full LM head.

At an exit point the full LM head (``vocab x hidden`` multiply-accumulates: 2.65 decoder layers on
the embedded default) tells whether the exit's prediction is settled (max softmax, margin, entropy),
but paying it at every check costs more than an exit saves. These signals see the same logits
through a handful of **candidate tokens**: the logits of ``k`` (<= 10) candidates, ``k x hidden``
MACs, from which the max softmax over the candidates, the margin top-1 - top-2 and the entropy over
the candidates follow (SpecEE, ISCA 2025, uses the top-4 of a draft model the same way).

**Candidate sources** (where a token's ``k`` candidates come from at its *first* exit point; every
later exit point takes the previous exit point's top-k of the same token, i.e. the same set re-ranked
by this exit's candidate logits, so the set is fixed once per token):

* ``first_full``: one full LM head at the first exit point (``vocab x hidden`` MACs once per token;
  when the token exits right there, that head is the one that chooses the token, so it costs nothing
  extra), its top-k; the features at the first exit point are those of the full head's top-k logits.
* ``low_rank`` (``low_rank:R:M``; ``low_rank`` = ``low_rank:32:64``): a rank-R factorisation of the LM
  head, ``W ~ A B`` (``A`` [V, R], ``B`` [R, D], the head's truncated SVD, computed once per model),
  gives approximate logits ``(B h) A^T`` at the first exit point for ``R x (D + V)`` MACs; their top-M
  are a shortlist whose exact logits (``M x D``) pick the candidates, the exact top-k. No full head is
  paid for the decision (a token that exits at the first exit point gets its head from the loop, as
  every exiting token does). On the default, ``low_rank:32:64``'s top-1 is the full head's top-1 for
  98% of first-exit states, for 0.36 decoder layers instead of the full head's 2.65.
* ``prev_token``: the top-k of the logits that chose the current input token (the previous token's
  own head, at whatever exit it left; the prefill's last position for the first new token). No MACs:
  those logits are computed anyway. Weak by construction: they rank candidates for the *current*
  token, not the next one (the analysis reports how often the final answer is among them).
* ``bigram``: the ``k`` most frequent next tokens after the current input token, counted once on
  training tokens (:func:`bigram_table`, a ``[vocab, k]`` table). No MACs: a table lookup.
* ``context``: the prompt's own bigrams (code repeats itself): the distinct tokens that followed the
  most recent earlier occurrences of the current input token in this sequence, most recent first,
  filled up to ``k`` from the bigram table (:class:`ContextBigrams`). No MACs: a lookup per token.

**Features** per check, in :data:`FEATURES` order, then a one-hot of the exit point (``E`` values):
``cand_max_prob``, ``cand_margin`` (top-1 - top-2 probability over the candidates),
``cand_neg_entropy`` (minus the entropy over the candidates, nats: larger = more certain, like the
others), ``cand_top1_logit`` (the largest candidate logit itself), ``cand_top1_stable`` (1 when this
exit's top candidate equals the previous exit point's; 0 at the first exit point), ``saturation`` (the
cosine between this exit's normed state and the previous exit point's; at the first exit point the
layer just below it, as :class:`~greencode.decoding.SaturationExit` does; 0 when the first exit is
layer 0), ``prev_exit`` (the previous token's exit point / E; 1 = the final layer).

The same step (:func:`signal_step`, over rows) serves both uses: offline over teacher-forced hidden
states (:func:`exit_signals`, every exit point of every position at once) and online inside the
decoding loop (:class:`CheapSignals` keeps the per-row state between a token's checks).

**Cost.** :func:`signal_macs` counts every multiply-accumulate of a check (the state's norm, the
candidate logits or the full head, the candidate softmax and entropy, the saturation's dot products,
a linear read-out of the features), so a compute ratio can include it; :func:`macs_in_layers`
expresses it in decoder layers of the model's shape (``EarlyExitModel.cost_model()``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from greencode.errors import ConfigError
from greencode.utils import torch_threads

CANDIDATE_SOURCES = ("first_full", "low_rank", "prev_token", "bigram", "context")
LOW_RANK_DEFAULT = (32, 64)  # rank R, shortlist M
# the sources whose candidate set opens at a token's first check, from the state there (not before it)
OPEN_AT_FIRST_CHECK = ("first_full", "low_rank")
FEATURES = ("cand_max_prob", "cand_margin", "cand_neg_entropy", "cand_top1_logit", "cand_top1_stable",
            "saturation", "prev_exit")
MAX_CANDIDATES = 10


def policy_observation(model, h: torch.Tensor, mode: str) -> torch.Tensor:
    """THE preprocessing of a hidden state into an RL observation, shared by the trajectory
    bank (training) and :class:`~greencode.decoding.controllers.PolicyExit` (inference): ``raw`` is the residual stream
    as the layer outputs it; ``normed`` goes through the model's own final norm (OPT: and
    ``project_out``), the same transform the LM head sees. Computed in float32 from the norm's
    parts whatever the model's dtype, so a bf16 model's bank and the fused fast path of
    :class:`PolicyExit` normalise alike."""
    if mode == "normed":
        kind, eps, scale, bias, proj = model.adapter.final_norm_parts()
        x = h.float()
        if kind == "rms":
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)
        elif kind == "layer":
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
        if scale is not None:
            x = x * scale.float()
        if bias is not None:
            x = x + bias.float()
        return x @ proj.float().T if proj is not None else x
    if mode == "raw":
        return h.float()
    raise ConfigError(f"rl.observation={mode!r}; use 'raw' or 'normed'")


def feature_names(n_exit_points: int) -> list[str]:
    """The feature vector's column names: :data:`FEATURES`, then ``exit_index_0 .. exit_index_{E-1}``."""
    return list(FEATURES) + [f"exit_index_{j}" for j in range(n_exit_points)]


def parse_source(source: str) -> tuple[str, Optional[tuple[int, int]]]:
    """A candidate source's name and, for ``low_rank[:R[:M]]``, its rank R and shortlist M (None for the
    others). Raises a ConfigError naming the fix for an unknown source or a malformed rank."""
    if not isinstance(source, str):
        raise ConfigError(f"candidate source {source!r}; choose one of {', '.join(CANDIDATE_SOURCES)}")
    name, sep, rest = source.partition(":")
    if name not in CANDIDATE_SOURCES or (sep and name != "low_rank"):
        raise ConfigError(f"candidate source {source!r}; choose one of {', '.join(CANDIDATE_SOURCES)} "
                          "(low_rank takes a rank and a shortlist: low_rank:32:64)")
    if name != "low_rank":
        return name, None
    if not sep:
        return name, LOW_RANK_DEFAULT
    parts = rest.split(":")
    if len(parts) > 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ConfigError(f"candidate source {source!r}: write low_rank:R or low_rank:R:M with positive integers "
                          "(R the rank of the head's factorisation, M the shortlist), e.g. low_rank:32:64")
    rank = int(parts[0])
    return name, (rank, int(parts[1]) if len(parts) == 2 else LOW_RANK_DEFAULT[1])


def check_candidates(k: int, source: str) -> None:
    if not isinstance(k, int) or not 2 <= k <= MAX_CANDIDATES:
        raise ConfigError(f"candidates k={k!r} must be an integer in [2, {MAX_CANDIDATES}] (the margin needs two)")
    _name, low = parse_source(source)
    if low is not None and low[1] < k:
        raise ConfigError(f"candidate source {source!r}: the shortlist M={low[1]} must hold the k={k} candidates")


# --------------------------------------------------------------------------- shape and cost
@dataclass(frozen=True)
class ModelShape:
    """What the cost of a signal depends on. ``head_in`` is the LM head's input width (the hidden size,
    or OPT's ``word_embed_proj_dim`` behind ``project_out``); ``norm`` is the final norm's kind."""

    hidden_size: int
    head_in: int
    vocab_size: int
    layer_macs: int
    n_exit_points: int  # early exit points (decisions are taken there; not the final layer)
    norm: str = "rms"  # "rms" | "layer" | "none"
    has_proj: bool = False

    @classmethod
    def of(cls, model) -> "ModelShape":
        kind, _eps, _scale, _bias, proj = model.adapter.final_norm_parts()
        w = model.adapter.lm_head.weight
        return cls(hidden_size=int(model.hidden_size), head_in=int(w.shape[1]), vocab_size=int(w.shape[0]),
                   layer_macs=int(model.cost_model()["layer_macs"]), n_exit_points=len(model.exit_layers),
                   norm=kind, has_proj=proj is not None)


def norm_macs(shape: ModelShape) -> int:
    """The final norm of one state: RMS = sum of squares, scale, weight (3 H); LayerNorm adds the mean
    (4 H); OPT's ``project_out`` adds ``H x head_in``."""
    per = {"rms": 3, "layer": 4, "none": 0}[shape.norm]
    return per * shape.hidden_size + (shape.hidden_size * shape.head_in if shape.has_proj else 0)


def signal_macs(shape: ModelShape, signal: str, *, k: int = 4, source: str = "first_full", exit_index: int = 1,
                readout: int = 0, saturation: bool = True) -> dict:
    """Multiply-accumulates of one check of ``signal`` at exit point ``exit_index`` (0-based among the
    early exit points), with its parts. ``signal``:

    * ``cheap``: the candidate features (norm + ``k x head_in`` candidate logits, or the full head at
      the first exit point for ``source=first_full``, or the rank-R head ``R x (head_in + vocab)`` and
      the shortlist's ``M`` exact logits there for ``low_rank:R:M``, + ``2k`` for the candidate softmax and entropy +
      ``2 head_in`` for the saturation's dot product and this state's squared norm; at the first exit
      point the saturation also normalises the layer below: + norm + ``head_in``);
    * ``full_head``: norm + ``vocab x head_in`` + ``2 vocab`` (softmax, entropy);
    * ``hidden``: a read-out of the normed state: norm + ``head_in``;
    * ``saturation``: norm + ``2 head_in`` (+ the layer below's norm + ``head_in`` at the first exit point).

    ``readout``: the number of inputs of a linear read-out on top (e.g. a logistic regression over the
    features: one MAC each). ``saturation=False``: a ``cheap`` check that does not compute the saturation
    (:class:`CheapSignals` with ``saturation=False``; its feature is 0), without its parts. Softmax
    exponentials and comparisons (top-k) are not MACs and not counted."""
    h = shape.head_in
    parts: dict[str, int] = {"norm": norm_macs(shape)}
    first = exit_index == 0
    below = {"saturation_layer_below": norm_macs(shape) + h} if first else {}
    if signal == "cheap":
        check_candidates(k, source)
        name, low = parse_source(source)
        if first and name == "first_full":
            parts["full_head"] = shape.vocab_size * h
        elif first and name == "low_rank":
            parts["low_rank_head"] = low[0] * (h + shape.vocab_size)
            parts["shortlist_logits"] = low[1] * h
        else:
            parts["candidate_logits"] = k * h
        parts["candidate_softmax_entropy"] = 2 * k
        if saturation:
            parts["saturation"] = 2 * h
            parts.update(below)
    elif signal == "full_head":
        parts["full_head"] = shape.vocab_size * h
        parts["softmax_entropy"] = 2 * shape.vocab_size
    elif signal == "hidden":
        pass
    elif signal == "saturation":
        parts["saturation"] = 2 * h
        parts.update(below)
    else:
        raise ValueError(f"signal {signal!r}; known: cheap, full_head, hidden, saturation")
    if readout:
        parts["readout"] = int(readout)
    return {"macs": int(sum(parts.values())), "parts": parts}


def macs_in_layers(macs: float, shape: ModelShape) -> float:
    """``macs`` in decoder-layer equivalents (one layer's per-token MACs, attention scores excluded)."""
    return float(macs) / float(shape.layer_macs)


def token_macs(shape: ModelShape, signal: str, checks: int, **kw) -> int:
    """MACs of ``checks`` consecutive checks of one token (exit points ``0 .. checks-1``)."""
    return sum(signal_macs(shape, signal, exit_index=j, **kw)["macs"] for j in range(checks))


# --------------------------------------------------------------------------- the computation
def head_parts(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The LM head's weight [V, D] and bias [V] (None for Llama / OPT)."""
    head = model.adapter.lm_head
    return head.weight, getattr(head, "bias", None)


_FACTORS: dict[int, tuple] = {}  # id(weight) -> (weakref to it, (rank, version), factor)


def _forget(wid: int, ref) -> None:
    if wid in _FACTORS and _FACTORS[wid][0] is ref:  # not a newer tensor that reuses the id
        del _FACTORS[wid]


def low_rank_factor(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` factorisation of the LM head's weight [V, D]: ``A`` [V, R] (the left singular
    vectors scaled by the singular values) and ``B`` [R, D], float32, with ``A B`` the best rank-R
    approximation of ``W`` (truncated SVD, computed in float64 on one CPU thread so its bits do not depend
    on the machine's thread count). Cached per weight tensor (and its in-place version)."""
    if not 1 <= rank <= min(weight.shape):
        raise ConfigError(f"low_rank:{rank}: the rank must be in [1, {min(weight.shape)}] for a head of shape "
                          f"{tuple(weight.shape)}")
    key = (int(rank), weight._version)
    hit = _FACTORS.get(id(weight))
    if hit is None or hit[0]() is not weight or hit[1] != key:
        with torch_threads(1):
            u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
        a = (u[:, :rank] * s[:rank]).float().to(weight.device)
        b = vh[:rank].float().to(weight.device)
        wid = id(weight)
        _FACTORS[wid] = hit = (weakref.ref(weight, lambda r, wid=wid: _forget(wid, r)), key, (a, b))
    return hit[2]


@dataclass(frozen=True)
class LowRankShortlist:
    """The ``low_rank:R:M`` source's opener: the head's rank-R factor (:func:`low_rank_factor`) and the
    shortlist size M."""

    factor: tuple[torch.Tensor, torch.Tensor]
    shortlist: int

    @classmethod
    def of(cls, weight: torch.Tensor, source: str) -> Optional["LowRankShortlist"]:
        """The opener of ``source`` for the head ``weight`` [V, D]; None for a source that is not low_rank."""
        _name, low = parse_source(source)
        return None if low is None else cls(low_rank_factor(weight, low[0]), low[1])

    def candidates(self, weight: torch.Tensor, bias: Optional[torch.Tensor], normed: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates of normed states [N, D]: the top-M of the approximate logits ``(B h) A^T`` (+ bias),
        then the top-``k`` of those by their exact logits. Returns the token ids [N, k] and their exact logits
        [N, k] (float32), largest first."""
        a, b = self.factor
        approx = (normed.float() @ b.T) @ a.T
        if bias is not None:
            approx = approx + bias.float()
        short = torch.topk(approx, self.shortlist, dim=-1).indices
        exact = candidate_logits(weight, bias, normed, short)
        vals, pos = torch.topk(exact, k, dim=-1)
        return torch.gather(short, 1, pos), vals


def candidate_logits(weight: torch.Tensor, bias: Optional[torch.Tensor], normed: torch.Tensor,
                     candidates: torch.Tensor) -> torch.Tensor:
    """Logits [N, k] (float32) of ``candidates`` [N, k] for normed states ``normed`` [N, D]: the same
    numbers as the full head's logits at those ids, for ``k x D`` MACs instead of ``V x D``."""
    rows = weight[candidates].float()  # [N, k, D]
    out = torch.einsum("nkd,nd->nk", rows, normed.float())
    if bias is not None:
        out = out + bias.float()[candidates]
    return out


def candidate_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """From candidate logits [N, k]: max softmax over the candidates, margin top-1 - top-2 (probabilities),
    minus the entropy over the candidates (nats), the largest logit, and the argmax (position in the row)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    top2 = torch.topk(p, 2, dim=-1).values
    return {"max_prob": top2[:, 0], "margin": top2[:, 0] - top2[:, 1], "neg_entropy": (p * logp).sum(-1),
            "top1_logit": logits.max(-1).values, "argmax": logits.argmax(-1)}


def full_head_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same statistics over the whole vocabulary (the expensive signals, for comparison)."""
    return candidate_stats(logits)


@dataclass
class SignalState:
    """Per-row state between the checks of a token. ``candidates`` [N, k] token ids (None: the first
    exit point runs the full head, ``first_full``); ``prev_normed`` [N, D] the previous exit point's
    normed state (or the layer below the first exit point); ``prev_top1`` [N] the previous exit point's
    top candidate (token id); ``prev_exit`` [N] the previous token's exit point (E = the final layer).
    A row checked on the host (:class:`HostCheck`) holds them as NumPy arrays of the same shapes."""

    candidates: Optional[torch.Tensor]
    prev_exit: torch.Tensor
    prev_normed: Optional[torch.Tensor] = None
    prev_top1: Optional[torch.Tensor] = None

    FIELDS = ("candidates", "prev_exit", "prev_normed", "prev_top1")

    @classmethod
    def stack(cls, states: Sequence["SignalState"]) -> Optional["SignalState"]:
        """Several rows' states as one (rows in order), or None when they are not at the same stage
        (a field set for some rows and not others): the caller then checks them one by one."""
        out = {}
        for f in cls.FIELDS:
            vals = [getattr(s, f) for s in states]
            if all(v is None for v in vals):
                out[f] = None
            elif any(v is None for v in vals):
                return None
            else:  # a row checked on the host holds NumPy arrays (HostCheck.advance)
                out[f] = torch.cat([torch.as_tensor(v) for v in vals])
        return cls(**out)

    def row(self, k: int) -> "SignalState":
        """Row ``k``'s state alone (its own tensors, [1, ...])."""
        return SignalState(**{f: None if getattr(self, f) is None else getattr(self, f)[k:k + 1].clone()
                              for f in self.FIELDS})


def signal_step(weight: torch.Tensor, bias: Optional[torch.Tensor], state: SignalState, normed: torch.Tensor,
                exit_index: int, n_exit_points: int, k: int,
                full_logits: Optional[torch.Tensor] = None,
                low_rank: Optional[LowRankShortlist] = None) -> tuple[torch.Tensor, SignalState]:
    """One check for N rows at early exit point ``exit_index``: the features [N, F] (float32, F =
    ``len(feature_names(E))``) and the state for the next exit point. When the candidate set is still open
    (the first exit point), it opens from ``full_logits`` [N, V] (the full head's logits there:
    ``first_full``; the candidates are their top-k) or from ``low_rank`` (:class:`LowRankShortlist`: the
    shortlist's best approximate logits, of which the exact top-k)."""
    n = normed.shape[0]
    normed = normed.float()
    if state.candidates is None and full_logits is not None:
        vals, cands = torch.topk(full_logits.float(), k, dim=-1)
        logits = vals
    elif state.candidates is None:
        if low_rank is None:
            raise ValueError("no candidates yet: pass the full head's logits at the first exit point (first_full) "
                             "or the head's low-rank shortlist (low_rank)")
        cands, logits = low_rank.candidates(weight, bias, normed, k)
    else:
        cands = state.candidates
        logits = candidate_logits(weight, bias, normed, cands)
    st = candidate_stats(logits)
    order = torch.argsort(logits, dim=-1, descending=True)
    cands = torch.gather(cands, 1, order)  # this exit point's top-k, passed on to the next one
    top1 = cands[:, 0]
    zeros = torch.zeros(n, device=normed.device)
    stable = zeros if state.prev_top1 is None else (top1 == state.prev_top1).float()
    sat = zeros if state.prev_normed is None else torch.nn.functional.cosine_similarity(normed, state.prev_normed.float(),
                                                                                        dim=-1)
    onehot = torch.zeros(n, n_exit_points, device=normed.device)
    onehot[:, exit_index] = 1.0
    feats = torch.cat([torch.stack([st["max_prob"], st["margin"], st["neg_entropy"], st["top1_logit"], stable, sat,
                                    state.prev_exit.float().to(normed.device) / n_exit_points], dim=-1), onehot], dim=-1)
    return feats, SignalState(candidates=cands, prev_exit=state.prev_exit, prev_normed=normed, prev_top1=top1)


# --------------------------------------------------------------------------- one row on the host
_HOST: dict[int, tuple] = {}  # id(head weight) -> (weakref to it, key of the tensors it was built from, arrays)


def _forget_host(wid: int, ref) -> None:
    if wid in _HOST and _HOST[wid][0] is ref:
        del _HOST[wid]


def host_norm(kind: str, eps: float, x: np.ndarray) -> tuple[np.ndarray, float]:
    """A final norm without its affine part, on the host: the raw state [D] centred (LayerNorm) and the norm's
    scalar ``r`` (``standardize(x) = r x``), for :class:`HostCheck` and PolicyExit's host MLP."""
    if kind == "layer":
        x = x - x.mean(dtype=np.float32)
    return x, (1.0 if kind == "none" else 1.0 / math.sqrt(float(np.dot(x, x)) / x.shape[0] + eps))


def host_norm_rows(kind: str, eps: float, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`host_norm` of raw states [N, D]: the centred states and each row's scalar [N] (float64)."""
    if kind == "layer":
        x = x - x.mean(axis=1, keepdims=True, dtype=np.float32)
    if kind == "none":
        return x, np.ones(x.shape[0])
    sq = np.einsum("nd,nd->n", x, x).astype(np.float64)
    return x, 1.0 / np.sqrt(sq / x.shape[1] + eps)


def host_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """The cosine of two vectors on the host (``torch.nn.functional.cosine_similarity``'s eps 1e-8)."""
    return float(np.dot(x, y)) / max(float(np.linalg.norm(x)) * float(np.linalg.norm(y)), 1e-8)


class HostCheck:
    """A check computed on the host (NumPy for the products; one row's k-candidate softmax in Python floats,
    several rows' in float64 arrays, :meth:`values_rows`): the same features as :func:`signal_step` up to float
    rounding (tested), for a CPU model with a float32 head.

    Why: at batch 1 a check is a few dozen tiny tensor operations, and inside the decoding loop each
    PyTorch call costs ~10 us of dispatch on this kind of CPU (the layers between two checks evict what
    a tight loop keeps warm), so a check cost ~0.4 ms, about half a decoder layer of the default
    (``results/adhoc/check_host_path.py``). Here a check is a handful of NumPy calls: the final norm's
    scale is folded into the head's rows once (``W diag(g)``; a LayerNorm's bias into a per-token offset
    ``W b``), so a candidate logit is ``r (W_g[c] . x) + offset[c]`` with ``r`` the norm's scalar. The arrays
    are built once per head and its tensors' versions (cached: every controller and row copy of a model shares
    them); the state it leaves is a :class:`SignalState` of NumPy arrays, which the batched path stacks into
    tensors, so a row can move between the two. :meth:`of` returns None where it does not apply (a GPU, a bf16
    head, a norm it does not know): the caller keeps the tensor path."""

    def __init__(self, weight: np.ndarray, offset: Optional[np.ndarray], norm: tuple, low_rank: Optional[tuple],
                 k: int, n_exit_points: int, saturation: bool):
        self.weight, self.offset, self.norm, self.low_rank = weight, offset, norm, low_rank
        self.k, self.e, self.saturation = int(k), int(n_exit_points), bool(saturation)

    @classmethod
    def of(cls, model, weight: torch.Tensor, bias: Optional[torch.Tensor], low_rank: Optional["LowRankShortlist"],
           k: int, n_exit_points: int, saturation: bool) -> Optional["HostCheck"]:
        kind, eps, scale, nbias, proj = model.adapter.final_norm_parts()
        tensors = [t for t in (weight, bias, scale, nbias) if t is not None]
        if low_rank is not None:
            tensors += list(low_rank.factor)
        if (kind not in ("rms", "layer", "none") or proj is not None
                or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)):
            return None
        key = (kind, float(eps), None if low_rank is None else low_rank.shortlist,
               tuple((id(t), -1 if t.is_inference() else t._version) for t in tensors))  # no counter on those
        hit = _HOST.get(id(weight))
        if hit is None or hit[0]() is not weight or hit[1] != key:
            wid = id(weight)
            _HOST[wid] = hit = (weakref.ref(weight, lambda r, wid=wid: _forget_host(wid, r)), key,
                                cls._arrays(kind, eps, weight, bias, scale, nbias, low_rank))
        weight_g, offset, norm, lr = hit[2]
        return cls(weight_g, offset, norm, lr, k, n_exit_points, saturation)

    @staticmethod
    def _arrays(kind, eps, weight, bias, scale, nbias, low_rank) -> tuple:
        """The host arrays of a head: ``W diag(g)``, the per-token offset, the norm's parts, the low-rank factor
        with the scale folded (and its offset)."""
        with torch.no_grad():
            w = weight.detach()
            offset = None if nbias is None else w @ nbias.detach()  # W (g x + b) = (W diag(g)) x + W b
            if bias is not None:
                offset = bias.detach().clone() if offset is None else offset + bias.detach()
            wg = w * scale.detach() if scale is not None else w
            lr = None
            if low_rank is not None:  # A B ~ W: A (B diag(g)) x + A B b (+ the head's bias)
                a, b = low_rank.factor
                lr_offset = None if nbias is None else a @ (b @ nbias.detach())
                if bias is not None:
                    lr_offset = bias.detach().clone() if lr_offset is None else lr_offset + bias.detach()
                lr = (a.numpy(), (b * scale.detach() if scale is not None else b).contiguous().numpy(),
                      low_rank.shortlist, None if lr_offset is None else lr_offset.numpy())
            norm = (kind, float(eps), None if scale is None else scale.detach().numpy(),
                    None if nbias is None else nbias.detach().numpy())
            return wg.contiguous().numpy(), None if offset is None else offset.numpy(), norm, lr

    def normed(self, x: np.ndarray) -> np.ndarray:
        """The final norm of one raw state [D] (float32), as :func:`policy_observation`."""
        _kind, _eps, scale, bias = self.norm
        x, r = host_norm(self.norm[0], self.norm[1], x)
        x = x * np.float32(r)
        if scale is not None:
            x = x * scale
        return x if bias is None else x + bias

    def _logits(self, x: np.ndarray, r: float, ids: np.ndarray) -> list[float]:
        out = (self.weight[ids] @ x).tolist()
        if self.offset is None:
            return [r * v for v in out]
        return [r * v + o for v, o in zip(out, self.offset[ids].tolist())]

    def values(self, state: SignalState, x: np.ndarray, full_logits: Optional[np.ndarray] = None):
        """The check of the raw state ``x`` [D]: (max_prob, margin, neg_entropy, top1_logit, top1_stable,
        saturation) as floats, the ``k`` candidates (ids, largest logit first) and the normed state (only
        when the saturation is kept, else None)."""
        xc, r = host_norm(self.norm[0], self.norm[1], x)  # normed = r xc g + b
        if state.candidates is not None:
            ids = np.asarray(state.candidates)[0]
            pairs = sorted(zip(self._logits(xc, r, ids), ids.tolist()), key=lambda t: -t[0])
        else:
            if full_logits is not None:
                scores = full_logits
            elif self.low_rank is not None:
                a, b, m, lr_offset = self.low_rank
                scores = a @ (b @ xc)
                if lr_offset is not None:  # the head's bias (and a LayerNorm's, folded) shifts the ranking
                    scores = np.float32(r) * scores + lr_offset
                short = np.argpartition(scores, scores.shape[0] - m)[scores.shape[0] - m:]
                scores = None
            else:
                raise ValueError("no candidates yet: pass the full head's logits at the first exit point "
                                 "(first_full) or use the low_rank source")
            if scores is not None:  # first_full: the top-k of the head's logits
                ids = np.argpartition(scores, scores.shape[0] - self.k)[scores.shape[0] - self.k:]
                pairs = sorted(zip(scores[ids].tolist(), ids.tolist()), key=lambda t: -t[0])
            else:  # low_rank: the exact logits of the shortlist, their top-k
                pairs = sorted(zip(self._logits(xc, r, short), short.tolist()), key=lambda t: -t[0])[:self.k]
        top = pairs[0][0]
        z = [math.exp(v - top) for v, _ in pairs]
        total = sum(z)
        log_total = math.log(total)
        p = [v / total for v in z]
        neg_entropy = sum(pi * ((v - top) - log_total) for pi, (v, _) in zip(p, pairs))
        top1 = pairs[0][1]
        stable = float(state.prev_top1 is not None and top1 == int(state.prev_top1[0]))
        normed, sat = None, 0.0
        if self.saturation or state.prev_normed is not None:
            normed = self.normed(x)
            if state.prev_normed is not None:
                sat = host_cosine(normed, np.asarray(state.prev_normed)[0])
        return (p[0], p[0] - p[1], neg_entropy, top, stable, sat), [i for _, i in pairs], normed

    def values_rows(self, states: Sequence[SignalState], x: np.ndarray, full_logits: Optional[np.ndarray] = None):
        """:meth:`values` of N rows at the same stage in one computation (``x`` [N, D] raw states, float32;
        ``full_logits`` [N, V] for ``first_full``'s first check): the values [N, 6] (float64, :meth:`values`'
        order), the candidates [N, k] (int64, largest logit first) and the normed states [N, D] (None unless
        the saturation is kept). None when the rows are not at the same stage (some with candidates, some
        without): the caller checks them one by one. The batched decoding loop's case, where a group's check as
        tensors is ~40 calls of ~10 us each whatever N is (``results/adhoc/step_parts_batch.py``)."""
        have = [st.candidates is not None for st in states]
        if any(have) and not all(have):
            return None
        xc, r = host_norm_rows(self.norm[0], self.norm[1], x)  # normed = r xc g + b
        n = x.shape[0]
        if all(have):
            ids = np.concatenate([np.asarray(st.candidates) for st in states])
        elif full_logits is not None:  # first_full: the top-k of the head's logits
            v = full_logits.shape[1]
            ids = np.argpartition(full_logits, v - self.k, axis=1)[:, v - self.k:]
        elif self.low_rank is not None:  # low_rank: the shortlist's exact logits, their top-k
            a, b, m, lr_offset = self.low_rank
            scores = (xc @ b.T) @ a.T
            if lr_offset is not None:
                scores = r.astype(np.float32)[:, None] * scores + lr_offset
            v = scores.shape[1]
            ids = np.argpartition(scores, v - m, axis=1)[:, v - m:]
        else:
            raise ValueError("no candidates yet: pass the full head's logits at the first exit point "
                             "(first_full) or use the low_rank source")
        if all(have) or full_logits is None:
            logits = np.einsum("nkd,nd->nk", self.weight[ids], xc).astype(np.float64) * r[:, None]
            if self.offset is not None:
                logits = logits + self.offset[ids]
        else:
            logits = np.take_along_axis(full_logits, ids, axis=1).astype(np.float64)
        order = np.argsort(-logits, axis=1, kind="stable")[:, :self.k]  # largest first, ties in the given order
        logits, ids = np.take_along_axis(logits, order, axis=1), np.take_along_axis(ids, order, axis=1)
        top = logits[:, 0]
        z = np.exp(logits - top[:, None])
        total = z.sum(axis=1)
        p = z / total[:, None]
        neg_entropy = (p * ((logits - top[:, None]) - np.log(total)[:, None])).sum(axis=1)
        prev = [st.prev_top1 for st in states]
        stable = np.array([0.0 if t is None else float(int(ids[j, 0]) == int(np.asarray(t)[0]))
                           for j, t in enumerate(prev)])
        normed, sat = None, np.zeros(n)
        if self.saturation or any(st.prev_normed is not None for st in states):
            normed = xc * r.astype(np.float32)[:, None]
            _kind, _eps, scale, bias = self.norm
            if scale is not None:
                normed = normed * scale
            if bias is not None:
                normed = normed + bias
            for j, st in enumerate(states):
                if st.prev_normed is not None:
                    sat[j] = host_cosine(normed[j], np.asarray(st.prev_normed)[0])
        vals = np.stack([p[:, 0], p[:, 0] - p[:, 1], neg_entropy, top, stable, sat], axis=1)
        return vals, ids.astype(np.int64), normed

    def advance(self, state: SignalState, cands: list[int], normed: Optional[np.ndarray]) -> SignalState:
        """The state after a check that ranked ``cands``: :func:`signal_step`'s, held as NumPy arrays (a tensor
        costs ~10 us to make here; :meth:`SignalState.stack` turns them into tensors for the batched path)."""
        return SignalState(candidates=np.array([cands], dtype=np.int64), prev_exit=state.prev_exit,
                           prev_normed=normed[None] if self.saturation else None,
                           prev_top1=np.array([cands[0]], dtype=np.int64))


def first_candidates(source: str, k: int, *, input_ids: Optional[torch.Tensor] = None,
                     prev_logits: Optional[torch.Tensor] = None,
                     bigram: Optional[torch.Tensor] = None,
                     context: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A token's candidate set before its first exit point [N, k] (None for ``first_full`` and ``low_rank``,
    whose sets open at the first exit point, from the state there):
    ``prev_token`` from the logits [N, V] that chose the input token, ``bigram`` from the table [V, >=k]
    at the input token ids [N], ``context`` as given (``[N, k]``, from :class:`ContextBigrams`)."""
    check_candidates(k, source)
    if parse_source(source)[0] in OPEN_AT_FIRST_CHECK:
        return None
    if source == "prev_token":
        if prev_logits is None:
            raise ValueError("the prev_token source needs the logits that chose the input token")
        return torch.topk(prev_logits.float(), k, dim=-1).indices
    if source == "context":
        if context is None:
            raise ValueError("the context source needs the candidates of ContextBigrams for each row")
        return context[:, :k].long()
    if bigram is None or input_ids is None:
        raise ValueError("the bigram source needs the table (bigram_table) and the input token ids")
    if bigram.shape[1] < k:
        raise ValueError(f"the bigram table holds {bigram.shape[1]} candidates per token; k={k} needs more")
    return bigram.to(input_ids.device)[input_ids.long(), :k]


def exit_signals(model, normed: Sequence[torch.Tensor], *, k: int, source: str,
                 prev_exit: torch.Tensor, below: Optional[torch.Tensor] = None,
                 full_logits_first: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                 prev_logits: Optional[torch.Tensor] = None, bigram: Optional[torch.Tensor] = None,
                 context: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Offline: the features [E, N, F] of N positions at every early exit point, from their normed
    states ``normed`` (E tensors [N, D], the early exit points in order), as the online loop computes them
    when every exit point is checked (:func:`signal_step` in turn). ``below`` [N, D]: the normed state of
    the layer under the first exit point (None when that is layer 0); ``full_logits_first`` [N, V]: the
    full head at the first exit point (``first_full``)."""
    weight, bias = head_parts(model)
    name = parse_source(source)[0]
    low_rank = LowRankShortlist.of(weight, source)
    e = len(normed)
    state = SignalState(candidates=first_candidates(source, k, input_ids=input_ids, prev_logits=prev_logits,
                                                    bigram=bigram, context=context),
                        prev_exit=prev_exit, prev_normed=below)
    out = []
    for j in range(e):
        feats, state = signal_step(weight, bias, state, normed[j], j, e, k,
                                   full_logits=full_logits_first if (j == 0 and state.candidates is None
                                                                     and name == "first_full") else None,
                                   low_rank=low_rank)
        out.append(feats)
    return torch.stack(out)


class CheapSignals:
    """Online: the cheap signals of a batch of rows inside the decoding loop. Call :meth:`start` when
    the rows begin a token (their input ids, the logits that chose them, the previous token's exit
    point), :meth:`below` with the raw state of the layer under the first exit point (for saturation),
    then :meth:`check` at each exit point the rows reach (raw hidden states [N, H]; the full head's
    logits at the first exit point for ``first_full``; ``low_rank`` opens from the head's rank-R factor,
    computed once). :meth:`macs_per_check` is what each check costs. Rows on a CPU are checked on the host
    (:class:`HostCheck`) unless ``host=False``.
    ``saturation=False``: the saturation is not computed (its feature is 0, and its MACs are not counted),
    for a user that does not read it."""

    def __init__(self, model, k: int = 4, source: str = "first_full", bigram: Optional[torch.Tensor] = None,
                 saturation: bool = True, host: bool = True):
        check_candidates(k, source)
        if source == "bigram" and bigram is None:
            raise ConfigError("the bigram candidate source needs a table (greencode.decoding.signals.bigram_table)")
        self.model, self.k, self.source, self.bigram = model, int(k), source, bigram
        self.saturation = bool(saturation)
        self.shape = ModelShape.of(model)
        self.weight, self.bias = head_parts(model)
        name, low = parse_source(source)
        if low and low[1] > self.shape.vocab_size:
            raise ConfigError(f"candidate source {source!r}: the shortlist M={low[1]} exceeds the vocabulary "
                              f"({self.shape.vocab_size}); choose a smaller M")
        self.low_rank = LowRankShortlist.of(self.weight, source)
        # first_full and low_rank open a token's candidates at its first check: nothing to look up per token
        self._opens_at_first_check = name in OPEN_AT_FIRST_CHECK
        self._state: Optional[SignalState] = None
        # after a check of several rows together: (their stacked state, this row's index), split off only when
        # this row is checked apart from them (the next batched check of the same rows reuses the stack)
        self._shared: Optional[tuple[SignalState, int]] = None
        self.feature_names = feature_names(self.shape.n_exit_points)
        # rows on a CPU: the NumPy path (None where it does not apply; ``host=False``: the tensor path always,
        # which the tests compare it with)
        self.host = HostCheck.of(model, self.weight, self.bias, self.low_rank, self.k, self.shape.n_exit_points,
                                 self.saturation) if host else None

    @property
    def state(self) -> Optional[SignalState]:
        """This row's state between the checks of a token (rows of one batch: split off their stack when read)."""
        if self._shared is not None:
            stacked, k = self._shared
            self._state, self._shared = stacked.row(k), None
        return self._state

    @state.setter
    def state(self, value: Optional[SignalState]) -> None:
        self._state, self._shared = value, None

    def __deepcopy__(self, memo):
        """A copy for another row (a controller's per-row instance): the model, its head and the bigram table
        are shared, never copied; the per-token state is the copy's own."""
        import copy

        new = copy.copy(self)
        new.state = copy.deepcopy(self.state, memo)
        return new

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return policy_observation(self.model, hidden, "normed")

    def start(self, input_ids: torch.Tensor, prev_exit: torch.Tensor, prev_logits: Optional[torch.Tensor] = None,
              context: Optional[torch.Tensor] = None) -> None:
        """``context`` [N, k]: each row's :meth:`ContextBigrams.candidates` (the ``context`` source)."""
        cands = None if self._opens_at_first_check else first_candidates(
            self.source, self.k, input_ids=input_ids, prev_logits=prev_logits, bigram=self.bigram, context=context)
        self.state = SignalState(candidates=cands, prev_exit=prev_exit)

    def below(self, hidden: torch.Tensor) -> None:
        if self.saturation:
            self.state.prev_normed = self.normed(hidden)

    def check(self, exit_index: int, hidden: torch.Tensor, full_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("call start() at the beginning of each token")
        if self.host is not None and hidden.shape[0] == 1 and hidden.device.type == "cpu":
            return torch.from_numpy(self.check_host(exit_index, hidden.reshape(-1), full_logits))[None]
        feats, self.state = signal_step(self.weight, self.bias, self.state, self.normed(hidden), exit_index,
                                        self.shape.n_exit_points, self.k,
                                        full_logits=(full_logits if self.state.candidates is None
                                                     and self.low_rank is None else None),
                                        low_rank=self.low_rank)
        if not self.saturation:
            self.state.prev_normed = None
        return feats

    def check_host(self, exit_index: int, hidden: torch.Tensor,
                   full_logits: Optional[torch.Tensor] = None) -> np.ndarray:
        """:meth:`check` of one row's raw state ``hidden`` [H] on the host (:class:`HostCheck`): the features [F]
        as a float32 array."""
        vals = self.check_values(hidden, full_logits)
        onehot = [0.0] * self.shape.n_exit_points
        onehot[exit_index] = 1.0
        return np.array(list(vals) + [float(self.state.prev_exit[0]) / self.shape.n_exit_points] + onehot,
                        dtype=np.float32)

    def check_values(self, hidden: torch.Tensor, full_logits: Optional[torch.Tensor] = None) -> tuple:
        """The candidate features of one row's raw state ``hidden`` [H] on the host, as floats in :data:`FEATURES`
        order up to the saturation (``prev_exit`` is the caller's); advances the state as :meth:`check`."""
        if self.state is None:
            raise RuntimeError("call start() at the beginning of each token")
        use_full = full_logits is not None and self.state.candidates is None and self.low_rank is None
        vals, cands, normed = self.host.values(self.state, hidden.detach().float().numpy(),
                                               full_logits.detach().float().reshape(-1).numpy() if use_full else None)
        self.state = self.host.advance(self.state, cands, normed)
        return vals

    def check_rows(self, exit_index: int, signals: Sequence["CheapSignals"], hidden: torch.Tensor,
                   full_logits: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """:meth:`check` for several rows at once, each with its own instance (``signals[k]`` holds row ``k``'s
        state; ``hidden`` [n, H]): one computation, then each instance's state advanced as :meth:`check`
        would. Returns the features [n, F], or None when the rows' states are not at the same stage.
        The rows' new states stay stacked: the next check of the same rows in the same order reuses the stack
        (no per-row split and re-stack, ~10 tensor calls per row), a row read alone splits off its own."""
        if self.host is not None and hidden.device.type == "cpu":
            vals = self.check_values_rows(signals, hidden, full_logits)
            if vals is None:
                return None
            e = self.shape.n_exit_points
            feats = np.zeros((len(signals), len(FEATURES) + e), dtype=np.float32)
            feats[:, :vals.shape[1]] = vals
            feats[:, vals.shape[1]] = [float(np.asarray(s.state.prev_exit)[0]) / e for s in signals]
            feats[:, len(FEATURES) + exit_index] = 1.0
            return torch.from_numpy(feats)
        first = signals[0]._shared
        if (first is not None and first[0].prev_exit.shape[0] == len(signals)
                and all(s._shared is not None and s._shared[0] is first[0] and s._shared[1] == k
                        for k, s in enumerate(signals))):
            stacked = first[0]
        else:
            states = [s.state for s in signals]
            if any(st is None for st in states):
                raise RuntimeError("call start() at the beginning of each token")
            stacked = SignalState.stack(states)
            if stacked is None:
                return None
        saved = (self._state, self._shared)
        self.state = stacked
        try:
            feats = self.check(exit_index, hidden, full_logits)
            new = self._state
        finally:
            self._state, self._shared = saved
        for k, s in enumerate(signals):
            s._state, s._shared = None, (new, k)
        return feats

    def check_values_rows(self, signals: Sequence["CheapSignals"], hidden: torch.Tensor,
                          full_logits: Optional[torch.Tensor] = None) -> Optional[np.ndarray]:
        """:meth:`check_values` of several rows on the host in one computation (:meth:`HostCheck.values_rows`;
        ``signals[k]`` holds row ``k``'s state, ``hidden`` [n, H]): the values [n, 6] (float64), each instance's
        state advanced as :meth:`check` would; None (nothing advanced) when the rows are not at the same stage."""
        states = [s.state for s in signals]
        if any(st is None for st in states):
            raise RuntimeError("call start() at the beginning of each token")
        use_full = full_logits is not None and states[0].candidates is None and self.low_rank is None
        out = self.host.values_rows(states, hidden.detach().float().numpy(),
                                    full_logits.detach().float().numpy() if use_full else None)
        if out is None:
            return None
        vals, ids, normed = out
        keep = self.saturation
        for j, (s, st) in enumerate(zip(signals, states)):
            s.state = SignalState(candidates=ids[j:j + 1], prev_exit=st.prev_exit,
                                  prev_normed=normed[j:j + 1] if keep else None, prev_top1=ids[j:j + 1, 0])
        return vals

    def macs_parts(self, exit_index: int, readout: int = 0) -> dict[str, int]:
        """:func:`signal_macs`' parts of the check at ``exit_index`` (``full_head``: the full LM head of the
        ``first_full`` source at the first exit point)."""
        return signal_macs(self.shape, "cheap", k=self.k, source=self.source, exit_index=exit_index,
                           readout=readout, saturation=self.saturation)["parts"]

    def macs_per_check(self, exit_index: int, readout: int = 0) -> int:
        return int(sum(self.macs_parts(exit_index, readout).values()))


# --------------------------------------------------------------------------- the bigram table
def bigram_table(sequences: Iterable[Sequence[int]], vocab_size: int, k: int = MAX_CANDIDATES) -> torch.Tensor:
    """``[vocab, k]`` int64: for each token id, the ``k`` most frequent next tokens over ``sequences``
    (token id lists; counted within each sequence); rows with fewer than ``k`` seen successors are
    filled with the most frequent tokens overall (ties broken by the lower id)."""
    counts: dict[int, dict[int, int]] = {}
    unigram = torch.zeros(vocab_size, dtype=torch.float64)
    for seq in sequences:
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        if ids.numel() == 0:
            continue
        unigram += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
        if ids.numel() < 2:
            continue
        pairs = ids[:-1] * vocab_size + ids[1:]
        uniq, cnt = torch.unique(pairs, return_counts=True)
        for p, c in zip(uniq.tolist(), cnt.tolist()):
            row = counts.setdefault(p // vocab_size, {})
            row[p % vocab_size] = row.get(p % vocab_size, 0) + c
    # stable orders: by count descending, then id ascending
    fill = sorted(range(vocab_size), key=lambda i: (-float(unigram[i]), i))[:k]
    table = torch.empty(vocab_size, k, dtype=torch.long)
    for t in range(vocab_size):
        row = sorted((counts.get(t) or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        ids = [i for i, _ in row]
        ids += [i for i in fill if i not in ids][:k - len(ids)]
        table[t] = torch.tensor(ids[:k])
    return table


class ContextBigrams:
    """The ``context`` candidate source for one sequence: which tokens followed each token so far.
    :meth:`push` each token as the sequence grows (prompt and generated tokens alike); :meth:`candidates`
    of the current input token gives the distinct tokens that followed its earlier occurrences, most
    recent first, filled from ``fill`` (a ``[vocab, >=k]`` table, e.g. :func:`bigram_table`) up to ``k``.
    Dictionary work per token, no multiply-accumulates."""

    def __init__(self, k: int, fill: torch.Tensor):
        self.k, self.fill = int(k), fill
        self._followers: dict[int, list[int]] = {}
        self._last: Optional[int] = None

    def push(self, token: int) -> None:
        token = int(token)
        if self._last is not None:
            seen = self._followers.setdefault(self._last, [])
            if token in seen:
                seen.remove(token)
            seen.insert(0, token)
            del seen[self.k:]
        self._last = token

    def candidates(self, token: int) -> list[int]:
        out = list(self._followers.get(int(token), ()))
        for t in self.fill[int(token)].tolist():
            if len(out) >= self.k:
                break
            if t not in out:
                out.append(t)
        return out[:self.k]


def context_candidates(ids: Sequence[int], k: int, fill: torch.Tensor) -> torch.Tensor:
    """``[T, k]``: the ``context`` source's candidates at every position of one sequence (position ``t``'s
    input token ``ids[t]``, with ``ids[:t+1]`` seen), as :class:`ContextBigrams` gives them online."""
    ctx = ContextBigrams(k, fill.cpu())
    rows = []
    for t in ids:
        ctx.push(t)
        rows.append(ctx.candidates(t))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), k)
