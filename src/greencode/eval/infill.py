"""Single-line infilling: a held-out line of a test file, given the code before it and after it.

A sample is one line of one file of the evaluation split (seeded choice among the lines with at
least two model tokens and at most ``max_new_tokens - 8``): the **prefix** is the file up to that
line's indentation less its last space, the **middle** (the reference) is the rest of the line without
its newline (one leading space on an indented line), the **suffix** is the newline and everything
after. The cut falls where the byte-level BPE puts a token boundary in the whole file (its
pre-tokenizer gives a line's last indentation space to the line's first word), as FIM training's cut
points do; a prefix ending in the whole indentation would be a token boundary the model never saw. The prompt is the model's own layout,
``serve.fim_layout`` (SPM by default; :func:`greencode.data.fim.fim_parts`: the suffix keeps up to a
quarter of the room, the prefix the rest, each cut away from the cursor); ``full_psm`` runs the same
parts in PSM order. The left-to-right control reads exactly the same
prefix tokens, without the suffix: the paired difference is what the suffix is worth.

Every method decodes greedily until a newline or an end of sequence, at most ``max_new_tokens``;
the prediction is the text before the first newline. Scores per sample: exact match (CodeXGLUE:
``pred.split() == ref.split()``) and edit similarity (``fuzz.ratio``), plus agreement with the full
model's own prediction; 95% paired bootstrap CIs over the samples (the same resamples for every
method). Exact match is also reported with its boilerplate separated (held-out lines of licence
headers: :func:`greencode.eval.metrics.is_boilerplate`): the share of a method's matches on them and
``exact_match_no_boilerplate``, exact match on the other samples with its paired CI. Compute: the decode steps' layers skipped and compute ratio (the prefill, the same for
every method, excluded), as in the main evaluation.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from greencode.eval.metrics import exact_match_breakdown, is_boilerplate, line_scores
from greencode.eval.stats import bootstrap_indices, mean_ci
from greencode.provenance import weights_record
from greencode.runinfo import run_metadata
from greencode.utils import set_seed, setup_torch, write_json, write_text

log = logging.getLogger(__name__)

NO_SUFFIX = "full_no_suffix"  # the left-to-right control: the full model without the suffix
PSM = "full_psm"  # the full model on the same parts in PSM order (which layout the model fills in)


@dataclass
class InfillSample:
    id: str
    path: str
    fim_ids: list[int]  # in the slice's layout (SPM by default)
    psm_ids: list[int]  # the same parts in PSM order (the diagnostic row full_psm)
    l2r_ids: list[int]  # the same prefix tokens without the suffix
    reference: str
    indent: str
    line_index: int
    suffix_tokens: int
    prefix_text: str = ""  # the code before the cursor / after it, as a client would send them (uncut)
    suffix_text: str = ""


def _candidate_lines(text: str) -> list[tuple[int, int, int]]:
    """(line index, start offset of its first non-blank character, end offset before its newline)
    of every non-blank line that has a line after it."""
    out, pos = [], 0
    lines = text.split("\n")
    for i, line in enumerate(lines[:-1]):
        stripped = line.lstrip()
        if stripped.strip():
            start = pos + len(line) - len(stripped)
            if start > pos and line[start - pos - 1] == " ":
                start -= 1  # the last indentation space belongs to the line's first token
            out.append((i, start, pos + len(line.rstrip())))
        pos += len(line) + 1
    return out


def make_infill_samples(split, tokenizer, *, num_samples: int, seed: int, max_context_tokens: int,
                        max_new_tokens: int, sep: str = "", offset: int = 0, layout: str = "spm") -> list[InfillSample]:
    """Up to ``num_samples`` single-line infilling samples, one per file, files in a seeded order
    (``offset`` skips the first samples of that order, so slices share no sample)."""
    from greencode.data.corpus import code_text
    from greencode.data.fim import fim_parts, layout_ids, require_sentinels

    sentinels = require_sentinels(tokenizer, "single-line infilling")
    room = max_context_tokens - max_new_tokens
    if room < 16:
        raise ValueError(f"max_context_tokens={max_context_tokens} leaves no room for a prompt after "
                         f"{max_new_tokens} new tokens")
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    samples: list[InfillSample] = []
    to_skip = offset
    for idx in order:
        if len(samples) >= num_samples:
            break
        rec = split[idx]
        text = code_text(rec["code"], sep)
        rid = str(rec.get("id", idx))
        rng = random.Random(f"infill:{seed}:{rid}")
        lines = _candidate_lines(text)
        rng.shuffle(lines)
        for line_index, start, end in lines[:8]:  # a few tries per file: a line of a usable length
            middle = text[start:end]
            n = len(tokenizer(middle, add_special_tokens=False)["input_ids"])
            if 2 <= n <= max_new_tokens - 8:
                break
        else:
            continue
        if to_skip > 0:
            to_skip -= 1
            continue
        prefix, suffix = text[:start], text[end:]
        p_ids, s_ids = fim_parts(tokenizer, prefix, suffix, max_tokens=room)
        samples.append(InfillSample(id=f"{rid}:infill", path=str(rec.get("path", "")),
                                    fim_ids=layout_ids(sentinels, p_ids, s_ids, layout),
                                    psm_ids=layout_ids(sentinels, p_ids, s_ids, "psm"), l2r_ids=p_ids,
                                    reference=middle, indent=text[text.rfind("\n", 0, start) + 1:start],
                                    line_index=line_index, suffix_tokens=len(s_ids), prefix_text=prefix,
                                    suffix_text=suffix))
    if len(samples) < num_samples:
        log.warning("only %d of the %d requested infilling samples (%d files in the split)", len(samples),
                    num_samples, len(split))
    return samples


def prediction_text(tokenizer, tokens: Sequence[int]) -> str:
    """The generated line: the decoded text (special tokens dropped) before the first newline."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).split("\n", 1)[0]


def run_infill(model, tokenizer, samples: Sequence[InfillSample], controllers: dict[str, Any], *,
               max_new_tokens: int, batch_size: int = 8) -> dict[str, list[dict]]:
    """Decode every sample with every controller (``{method id: controller}``; the id
    :data:`NO_SUFFIX` runs the full model on the left-to-right prompt). Returns per-method records."""
    import torch

    from greencode.decoding import NeverExit, generate
    from greencode.decoding.generate import compute_cost

    eos = tokenizer.eos_token_id
    out: dict[str, list[dict]] = {}
    for mid, ctrl in controllers.items():
        prompts = [s.l2r_ids if mid == NO_SUFFIX else s.psm_ids if mid == PSM else s.fim_ids for s in samples]
        ctrl = NeverExit() if mid in (NO_SUFFIX, PSM) else ctrl
        recs = []
        for i in range(0, len(samples), batch_size):
            rows = prompts[i:i + batch_size]
            with torch.no_grad():
                res = generate(model, rows, [ctrl] * len(rows), max_new_tokens, eos_token_id=eos,
                               stop_strings=["\n"], tokenizer=tokenizer)
            for s, r in zip(samples[i:i + batch_size], res):
                pred = prediction_text(tokenizer, r.tokens)
                em, es = line_scores(pred, s.reference)
                cost = compute_cost(model, [r], ctrl)
                recs.append({"id": s.id, "prediction": pred, "exact_match": em, "edit_similarity": es,
                             "boilerplate": is_boilerplate(s.reference),
                             "tokens": len(r.tokens), "exit_layers": list(r.exit_layers[1:]),
                             "decode_steps": cost["decode_steps"], "layers_run": r.counters.get("layers_run"),
                             "macs_done": cost["macs_done"], "macs_full": cost["macs_full"]})
        out[mid] = recs
        log.info("infill %s: exact match %.3f, edit similarity %.1f", mid,
                 float(np.mean([r["exact_match"] for r in recs])), float(np.mean([r["edit_similarity"] for r in recs])))
    return out


def summarize(records: dict[str, list[dict]], num_layers: int, *, resamples: int = 2000, seed: int = 0,
              reference: str = "full") -> dict[str, Any]:
    """Means with 95% paired bootstrap CIs; differences against ``reference`` (paired, same resamples)."""
    n = len(next(iter(records.values())))
    idx = bootstrap_indices(n, resamples, seed)
    ref = records.get(reference)
    rows = {}
    for mid, recs in records.items():
        row: dict[str, Any] = {"num_samples": len(recs)}
        for key in ("exact_match", "edit_similarity"):
            v = np.array([r[key] for r in recs], dtype=float)
            row[key] = dict(zip(("mean", "ci_low", "ci_high"), mean_ci(v, idx)))
            if ref is not None and mid != reference:
                d = v - np.array([r[key] for r in ref], dtype=float)
                row[f"{key}_minus_{reference}"] = dict(zip(("mean", "ci_low", "ci_high"), mean_ci(d, idx)))
        _exact_match_without_boilerplate(row, recs, ref if mid != reference else None, reference, resamples, seed)
        if ref is not None:
            same = np.array([a["prediction"].split() == b["prediction"].split() for a, b in zip(recs, ref)], dtype=float)
            row[f"same_line_as_{reference}"] = dict(zip(("mean", "ci_low", "ci_high"), mean_ci(same, idx)))
        steps = sum(r["decode_steps"] for r in recs)
        run = sum(r["layers_run"] or 0 for r in recs)
        row["layers_skipped_share"] = (1 - run / (steps * num_layers)) if steps else None
        row["compute_ratio"] = (sum(r["macs_done"] for r in recs) / sum(r["macs_full"] for r in recs)) if steps else None
        exits = [e for r in recs for e in r["exit_layers"]]
        row["mean_exit_layer"] = float(np.mean(exits)) if exits else None
        row["mean_tokens"] = float(np.mean([r["tokens"] for r in recs]))
        rows[mid] = row
    return {"methods": rows, "reference": reference, "bootstrap_resamples": resamples, "bootstrap_seed": seed}


def _exact_match_without_boilerplate(row: dict, recs: list[dict], ref: Optional[list[dict]], reference: str,
                                     resamples: int, seed: int) -> None:
    """``exact_match_boilerplate_share`` (share of the matches on boilerplate references) and
    ``exact_match_no_boilerplate`` (mean and 95% CI on the other samples, and the paired difference to
    ``reference``'s; the same samples for every method, resampled with one seed)."""
    flags = [bool(r.get("boilerplate")) for r in recs]
    b = exact_match_breakdown([r["exact_match"] for r in recs], flags)
    row["exact_match_boilerplate_share"] = b["exact_match_boilerplate_share"]
    row["num_samples_no_boilerplate"] = b["num_samples_no_boilerplate"]
    keep = [k for k, f in enumerate(flags) if not f]
    row["exact_match_no_boilerplate"] = None
    if not keep:
        return
    idx = bootstrap_indices(len(keep), resamples, seed)
    v = np.array([recs[k]["exact_match"] for k in keep], dtype=float)
    row["exact_match_no_boilerplate"] = dict(zip(("mean", "ci_low", "ci_high"), mean_ci(v, idx)))
    if ref is not None:
        d = v - np.array([ref[k]["exact_match"] for k in keep], dtype=float)
        row[f"exact_match_no_boilerplate_minus_{reference}"] = dict(zip(("mean", "ci_low", "ci_high"), mean_ci(d, idx)))


def _cell(d: Optional[dict], scale: float = 1.0, digits: int = 1) -> str:
    if not d:
        return "–"
    return f"{d['mean'] * scale:.{digits}f} [{d['ci_low'] * scale:.{digits}f}, {d['ci_high'] * scale:.{digits}f}]"


def render(summary: dict, meta: dict) -> str:
    ref = summary["reference"]
    lines = [f"# Single-line infilling ({meta['num_samples']} samples, {meta['split']} split)", "",
             f"A held-out line of each file, given its prefix and suffix in the model's FIM layout "
             f"({meta.get('layout', 'spm').upper()}; `{PSM}`: the same parts in PSM order); `{NO_SUFFIX}` "
             "reads the same prefix tokens without the suffix. Greedy, until a newline; 95% paired bootstrap CIs "
             f"({summary['bootstrap_resamples']} resamples). Differences are against `{ref}` (with the suffix).", "",
             "| method | exact match % | Δ exact match (points) | EM: boilerplate share % | EM w/o boilerplate % "
             "| Δ EM w/o boilerplate (points) | edit similarity | Δ edit similarity | same line as full % "
             "| layers skipped % | compute ratio | mean exit layer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mid, r in summary["methods"].items():
        lines.append(" | ".join([
            f"| `{mid}`", _cell(r["exact_match"], 100), _cell(r.get(f"exact_match_minus_{ref}"), 100),
            f"{100 * r['exact_match_boilerplate_share']:.0f}" if r.get("exact_match_boilerplate_share") is not None
            else "–", _cell(r.get("exact_match_no_boilerplate"), 100),
            _cell(r.get(f"exact_match_no_boilerplate_minus_{ref}"), 100),
            _cell(r["edit_similarity"]), _cell(r.get(f"edit_similarity_minus_{ref}")),
            _cell(r.get(f"same_line_as_{ref}"), 100),
            f"{r['layers_skipped_share'] * 100:.1f}" if r["layers_skipped_share"] is not None else "–",
            f"{r['compute_ratio']:.3f}" if r["compute_ratio"] is not None else "–",
            f"{r['mean_exit_layer']:.2f}" if r["mean_exit_layer"] is not None else "–"]) + " |")
    n_rest = next((r.get("num_samples_no_boilerplate") for r in summary["methods"].values()), None)
    lines += ["", f"Exact match on boilerplate: a held-out line of a licence header (or blank) is boilerplate "
              f"(greencode.eval.metrics.is_boilerplate); `EM: boilerplate share` is the share of a method's exact "
              f"matches on such lines, `EM w/o boilerplate` the exact match on the other {n_rest} samples."]
    lines += ["", "Layers are 0-based; the oracle runs every layer to find the first exit agreeing with the final "
              "layer (its skipped share is what an exact exit predictor could skip).", ""]
    return "\n".join(lines)


def samples_meta(samples: Sequence[InfillSample]) -> dict:
    return {"num_samples": len(samples), "mean_reference_chars": float(np.mean([len(s.reference) for s in samples])),
            "mean_prompt_tokens": float(np.mean([len(s.fim_ids) for s in samples])),
            "mean_suffix_tokens": float(np.mean([s.suffix_tokens for s in samples])),
            "examples": [{k: v for k, v in asdict(s).items()
                          if k not in ("fim_ids", "psm_ids", "l2r_ids", "prefix_text", "suffix_text")}
                         for s in samples[:3]]}


def evaluate_infill(cfg) -> Path:
    """The infilling slice of ``cfg.eval.split`` (``eval.infill_samples`` samples) for the full model
    with and without the suffix, the fixed exits (``eval.infill_fixed_layers``, null = every exit), GC
    (``eval.infill_gc_thresholds``, null = ``eval.gc_thresholds``) and the oracle ->
    ``results/<name>/infill/{infill.json, infill.md, records.json}``. A model whose tokenizer has no FIM
    sentinels gets a file that says so (nothing to measure)."""
    from greencode.data.corpus import load_corpus, text_sep
    from greencode.data.fim import sentinel_ids
    from greencode.decoding import FixedExit, NeverExit, OracleExit, PolicyExit
    from greencode.eval.runner import load_inputs
    from greencode.paths import RunPaths
    from greencode.training.shipping import check_split_disjoint

    e = cfg.eval
    paths = RunPaths.from_config(cfg)
    out = paths.results / "infill"
    set_seed(cfg.seed)
    device, dtype = setup_torch(cfg.hardware)
    inputs = load_inputs(cfg, paths, device, dtype, need_base=False, need_policy=True)
    model, tok = inputs.model, inputs.tokenizer

    meta = run_metadata(cfg, stage="infill", weights=weights_record(model))
    skipped = None
    if sentinel_ids(tok) is None:
        skipped = "the model's tokenizer has no fill-in-the-middle sentinels: it was not trained to fill in the middle"
    elif cfg.data.literal_mode != "source":
        skipped = ("the corpus is CodeXGLUE token text (data.literal_mode=normalized), not source lines: the infilling "
                   "slice holds out a line of a file as written")
    if skipped is not None:
        log.warning("infill: skipped: %s", skipped)
        write_json(out / "infill.json", {"skipped": skipped, "run": meta})
        return out
    check_split_disjoint(cfg, e.split)
    split = load_corpus(cfg)[e.split]
    samples = make_infill_samples(split, tok, num_samples=e.infill_samples, seed=e.sample_seed,
                                  max_context_tokens=e.max_context_tokens, max_new_tokens=e.infill_max_new_tokens,
                                  sep=text_sep(cfg), offset=e.sample_offset, layout=cfg.serve.fim_layout)
    if not samples:
        raise ValueError(f"no infilling samples in the {e.split!r} split; check the corpus")
    controllers: dict[str, Any] = {"full": NeverExit(), NO_SUFFIX: NeverExit(), PSM: NeverExit()}
    fixed = model.exit_layers if e.infill_fixed_layers is None else e.infill_fixed_layers
    controllers.update({f"fixed@{layer}": FixedExit(layer) for layer in fixed})
    if inputs.policy is not None:
        thresholds = e.gc_thresholds if e.infill_gc_thresholds is None else e.infill_gc_thresholds
        controllers.update({f"gc@{t:g}": PolicyExit.of(inputs.policy, t, cfg.decoding.policy_temperature)
                            for t in thresholds})
    controllers["oracle"] = OracleExit()
    for c in controllers.values():
        c.check_layers(model)
    records = run_infill(model, tok, samples, controllers, max_new_tokens=e.infill_max_new_tokens)
    summary = summarize(records, model.num_layers, resamples=e.bootstrap_resamples, seed=cfg.seed)
    info = {"layout": cfg.serve.fim_layout, "split": e.split, "sample_seed": e.sample_seed, "max_new_tokens": e.infill_max_new_tokens,
            "max_context_tokens": e.max_context_tokens, "num_layers": model.num_layers,
            "exit_layers": list(model.exit_layers), "policy_loaded": inputs.policy is not None,
            "policy_note": inputs.policy_reason, **samples_meta(samples)}
    write_json(out / "infill.json", {**summary, "meta": info, "run": meta})
    write_json(out / "records.json", {"records": records, "weights": meta.get("weights")})
    write_text(out / "infill.md", render(summary, info))
    return out
