"""The model side of the endpoint: loading a run, turning a request into a row of the decoding
loop (:class:`greencode.decoding.generate.DecodeBatch`, the same loop the evaluator uses), and the
per-response statistics (exit layers, share of layers skipped, latency, energy when measured).

A request goes through these steps, so the scheduler can place each where it belongs:

* :meth:`Engine.prepare` (``GenRequest`` -> :class:`Job`): encode the prompt, choose the exit
  controller, convert the stop strings; raises :class:`RequestError` for a request that cannot
  run. Safe to call from another thread than the one running the model (tokenizer only).
* :meth:`Engine.row` (``Job`` -> a decoding row): its controller, sampling, stop strings and
  deadline, with ``on_token`` feeding a :class:`TextStreamer` that turns each token into a safe
  editor-text increment, pushed as a :class:`~greencode.serve.requests.TokenEvent` (with its log
  probability when asked) as the step that chose it ends. The scheduler adds rows to one
  :meth:`Engine.new_batch` and steps it (:meth:`Engine.step`); :meth:`Engine.result` takes a
  finished row's result.
* :meth:`Engine.finish` (``Job``, result -> :class:`Completion`): the final text (cut at stop
  strings), the counts and statistics (cut there too), log probabilities when asked.

:meth:`Engine.run` is one request alone (a batch of one row) and :meth:`Engine.complete` runs
prepare, run and finish in a row. The batch is not thread-safe on purpose: the scheduler steps it
from a single worker thread (see :mod:`greencode.serve.scheduler`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

# the calibrated results only (no model, no decoding): serving never imports the calibration stage or the evaluator
from greencode.calibrated import file_sha256, threshold_for
from greencode.config import Config, ConfigError, DecodingConfig
from greencode.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, layout_ids, sentinel_ids
from greencode.data.lexers import source_to_text
from greencode.decoding import compute_cost, generate, prefill_chunk
from greencode.decoding.compiled import compile_info, use_compiled_steps
from greencode.decoding.controllers import NeverExit, recorded_candidates
from greencode.decoding.generate import DecodeBatch, Row
from greencode.decoding.registry import Resources, get_controller
from greencode.decoding.steps import cut_at_stops
from greencode.energy import TimeOnlyMeter
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.rl.policy import load_policy
from greencode.serve.errors import RequestError
from greencode.serve.requests import Completion, GenRequest, TokenEvent, TokenInfo
from greencode.utils import REPO_ROOT, read_json, setup_torch

log = logging.getLogger(__name__)

EOL = "<EOL>"
_EOL_RE = re.compile(r"[ \t]*<EOL>[ \t]*")
# the end of an editor text that the <EOL> -> newline conversion may still rewrite once more tokens
# come: trailing spaces/tabs (eaten around an <EOL>) and a partial "<EOL" marker
_EOL_TAIL_RE = re.compile(r"[ \t]*(?:<(?:E(?:O(?:L)?)?)?)?\Z")
MAX_LOGPROBS = 5  # the most alternatives per token a request may ask for (OpenAI's own limit)
# a raw prompt's tail tried first: this many characters per kept token (code: ~4 per token on the default's
# tokenizer, so ~1.5x the tokens kept; tokenizing costs ~0.25 us per character on 2 CPU cores)
TAIL_CHARS_PER_TOKEN = 6
FULL_MODEL_THRESHOLD = 1.0  # RL_agent_thresh >= 1.0 serves the exact full model (no exit checks at all)

# fill-in-the-middle prompts from editors: (prefix, suffix, middle) markers, in the order the prompt
# holds them (prefix-suffix-middle). A model that knows FIM gets its own format (greencode.data.fim);
# a left-to-right model gets the code before the cursor, and the answer says the suffix was ignored.
FIM_STYLES = {
    "starcoder": (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE),  # StarCoder's sentinels: the embedded default's own
    "codellama": ("<PRE>", "<SUF>", "<MID>"),
    "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
}
SUFFIX_IGNORED_NOTE = ("this model was not trained to fill in the middle: the code after the cursor was ignored and the "
                       "completion continues the code before it")


@dataclass
class Job:
    """A prepared request (:meth:`Engine.prepare`): what the decoding loop needs, and the
    timings and streaming state the run adds."""

    gen: GenRequest
    ids: list[int]
    enc: dict
    controller: Any
    threshold: Optional[float]
    mode: str
    stops: list[str]  # the stop strings in model text (the loop stops on them)
    submitted_at: float
    tokenize_s: float
    prepared_at: float
    deadline: Optional[float] = None  # time.perf_counter() seconds; the loop stops between tokens past it
    started_at: Optional[float] = None
    measurement: Any = None
    streamer: Optional["TextStreamer"] = None
    window: Optional[str] = None  # the open energy-meter window while the row decodes
    lossless: bool = False  # drafted with early exits, verified by the full model (a lossless row of the batch)

    def flush(self, text: str) -> str:
        """The part of the final ``text`` no token event carried yet."""
        return self.streamer.finish(text) if self.streamer is not None else text


class TextStreamer:
    """Tokens in, safe editor-text increments out: each :meth:`push` returns the text that can
    be sent now, and :meth:`finish` the rest, so that every increment joined equals the final text.

    Held back until certain: text that could still be the start of a stop string, a trailing
    partial UTF-8 character (decoded as U+FFFD), and (with the ``<EOL>`` conversion) trailing
    whitespace or a partial ``<EOL`` the conversion may still consume. Text from the first stop
    string on is never sent. Relies on the tokenizer decoding a longer token list to a text that
    extends the shorter one's (true of byte-level BPE and SentencePiece without clean-up)."""

    def __init__(self, tokenizer, to_editor_text: Callable[[str], str] = lambda t: t, stops: Sequence[str] = (),
                 eol: bool = False):
        self.tokenizer = tokenizer
        self.to_editor_text = to_editor_text
        self.stops = [s for s in stops if s]
        self.eol = eol
        self.tokens: list[int] = []
        self.emitted = ""
        self._stopped = False

    def _safe(self, full: str) -> str:
        """The part of ``full`` (the editor text of the tokens so far) that no later token can change."""
        end = len(full)
        while end and full[end - 1] == "\ufffd":
            end -= 1
        if self.eol:
            end = _EOL_TAIL_RE.search(full[:end]).start()
        stable = full[:end]
        cut = min((stable.find(s) for s in self.stops if s in stable), default=-1)
        if cut >= 0:  # a stop string wholly in the stable text: the answer ends there
            self._stopped = True
            return stable[:cut]
        for i in range(max(0, end - max((len(s) for s in self.stops), default=0) + 1), end):
            tail = stable[i:]
            if any(s.startswith(tail) for s in self.stops):  # the earliest suffix that may begin a stop
                return stable[:i]
        return stable

    def push(self, token_id: int) -> str:
        self.tokens.append(int(token_id))
        if self._stopped:
            return ""
        full = self.to_editor_text(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        safe = self._safe(full)
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            return ""
        piece = safe[len(self.emitted):]
        self.emitted = safe
        return piece

    def finish(self, text: str) -> str:
        """The rest of the final ``text`` after what was already sent."""
        if not text.startswith(self.emitted):  # cannot happen with a prefix-stable tokenizer; say so if it does
            log.warning("streamed text %r is not a prefix of the final text %r", self.emitted[-40:], text[-40:])
        tail = text[len(self.emitted):]
        self.emitted = text
        return tail


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    policy: Any  # ExitPolicy or None
    root: Optional[Path]
    notes: list[str] = field(default_factory=list)
    calibration: Optional[dict] = None  # results/<name>/calibration/calibration.json, when it belongs to this policy
    classifier: Any = None  # the supervised exit classifier, loaded when the served controller needs it


def split_fim(prompt: str) -> tuple[str, Optional[str], Optional[str]]:
    """(prefix, suffix, style) of a fill-in-the-middle prompt; ``(prompt, None, None)`` for any other.

    A prompt is FIM when it starts (after whitespace) with a style's prefix marker and holds its
    suffix and middle markers in that order. CodeLlama's spaces (``<PRE> {prefix} <SUF>{suffix} <MID>``)
    are its format's, not the code's, and are dropped."""
    s = prompt.lstrip()
    for style, (pre, suf, mid) in FIM_STYLES.items():
        if not s.startswith(pre):
            continue
        body = s[len(pre):]
        i = body.find(suf)
        j = body.find(mid, i + len(suf)) if i >= 0 else -1
        if j < 0:
            continue
        prefix, suffix = body[:i], body[i + len(suf):j]
        if style == "codellama":
            prefix, suffix = prefix.removeprefix(" ").removesuffix(" "), suffix.removesuffix(" ")
        return prefix, suffix, style
    return prompt, None, None


# --------------------------------------------------------------------------- loading
def run_root(cfg: Config, run_dir: Optional[Union[str, Path]] = None) -> Path:
    """The run directory to serve: ``run_dir`` (relative to the working directory), else
    ``cfg.serve.run_dir``, else this config's run directory (both relative to the repo)."""
    if run_dir is not None:
        return Path(run_dir).expanduser().resolve()
    if cfg.serve.run_dir:
        p = Path(cfg.serve.run_dir).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p
    return RunPaths.from_config(cfg).root


def load_run(cfg: Config, run_dir: Optional[Union[str, Path]] = None) -> LoadedRun:
    """Load the fine-tuned early-exit model, its tokenizer and the exported policy of a run (and the
    exit classifier when ``serve.controller`` needs it).

    A run without what the served controller needs (``agent/policy.pt`` for gc) serves the full model
    (and says so in /health)."""
    from transformers import AutoTokenizer

    root = run_root(cfg, run_dir)
    paths = dataclasses.replace(RunPaths.from_config(cfg), root=root)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist; train a run first "
                                f"(python scripts/reproduce.py --config {cfg.source_path or '<cfg>'}) or pass "
                                "--run-dir / serve.run_dir=<dir>")
    model_dir = paths.finetuned
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no fine-tuned model in {str(model_dir)!r}; run scripts/finetune.py for this "
                                "config or pass --run-dir pointing at a run that has finetuned/")
    device, dtype = setup_torch(cfg.hardware)
    model = EarlyExitModel.from_pretrained(model_dir, device=device, dtype=dtype)
    use_compiled_steps(model, cfg.decoding.compile)
    tok_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else paths.tokenizer
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {str(model_dir)!r} or {str(paths.tokenizer)!r}; the training "
                                "stage saves it next to the model")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    notes: list[str] = []
    served = get_controller(cfg.serve.controller, "serve.controller")
    loaded: dict[str, Any] = {"policy": None, "classifier": None}
    for need in ("policy", "classifier"):
        if paths_file(paths, need).is_file() and (need == "policy" or need in served.needs):
            loaded[need] = load_policy(paths_file(paths, need), model)
        elif need in served.needs:
            notes.append(f"no exit {need} at {paths_file(paths, need)}: serving the full model for every request "
                         "(train one with scripts/train_agent.py)")
            log.warning(notes[-1])
    calibration = None
    cal_file = RunPaths.from_config(cfg).calibration
    if all(loaded[n] is not None for n in served.inputs) and cal_file.is_file():
        cal = read_json(cal_file)
        stale = [n for n in served.inputs if cal.get(f"{n}_sha256") != file_sha256(paths_file(paths, n))]
        if not stale:
            calibration = cal
        else:
            notes.append(f"{cal_file} was calibrated for another exit {stale[0]}: max_disagreement is unavailable "
                         "(rerun scripts/calibrate.py for this run)")
            log.warning(notes[-1])
    log.info("loaded %s (%s, %d layers, exits %s) from %s on %s", model.family, type(model.hf).__name__,
             model.num_layers, model.exit_layers, model_dir, model.device)
    return LoadedRun(model, tokenizer, loaded["policy"], root, notes, calibration, loaded["classifier"])


def paths_file(paths: RunPaths, need: str) -> Path:
    """Where a run keeps a trained part a controller needs (``policy``, ``classifier``)."""
    return Path(getattr(paths, need))


# --------------------------------------------------------------------------- engine
class Engine:
    """One model, its tokenizer and (optionally) its exit policy, answering :class:`GenRequest`s.
    A request's threshold is the parameter of the served controller (``serve.controller``, a name in
    :mod:`greencode.decoding.registry`; gc = the RL policy)."""

    def __init__(self, model, tokenizer, policy=None, *, serve_cfg, decoding_cfg=None, meter=None,
                 run_root: Optional[Path] = None, notes: Optional[list[str]] = None, language: str = "python",
                 literal_mode: str = "normalized", calibration: Optional[dict] = None, classifier=None):
        if tokenizer is None:
            raise ValueError("the endpoint needs the model's tokenizer; pass tokenizer=... or serve a run directory")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.policy = policy
        self.serve_cfg = serve_cfg
        self.decoding_cfg = decoding_cfg or DecodingConfig()
        self.meter = meter or TimeOnlyMeter(model.device, reason="no energy meter configured")
        self.run_root = run_root
        self.notes = list(notes or [])
        self.calibration = calibration
        self.prompt_format = getattr(serve_cfg, "prompt_format", "raw")
        if literal_mode == "source":  # the model reads and writes source as written: nothing to convert
            self.prompt_format = "raw"
        self.language = language
        self.literal_mode = literal_mode
        # called before every decoding step (tests slow the model down with it)
        self.before_step: Optional[Callable[[], None]] = None
        self.context_window = int(getattr(model.hf.config, "max_position_embeddings", 0) or 2048)
        self._ids = itertools.count()
        self.cost = model.cost_model()
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.bos_prefix = self._bos_prefix()
        self.fim_ids = sentinel_ids(tokenizer)  # None: a left-to-right model (a suffix is ignored, and said so)
        self.fim_layout = getattr(serve_cfg, "fim_layout", "spm")  # the order the model fills in best (data/fim.py)
        eos = set()
        for v in (tokenizer.eos_token_id, getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)):
            if isinstance(v, int):
                eos.add(v)
            elif isinstance(v, (list, tuple)):
                eos.update(int(x) for x in v)
        self.eos_ids = sorted(eos)
        self.served = get_controller(getattr(serve_cfg, "controller", "gc"), "serve.controller")
        self.resources = Resources(policy=policy, classifier=classifier,
                                   policy_temperature=self.decoding_cfg.policy_temperature,
                                   # cheap confidence observes what the run's learned controllers were trained on
                                   candidates=recorded_candidates(policy) or recorded_candidates(classifier))
        if not self.served.missing(self.resources):  # fail at start-up, not on the first request, when it does not fit
            self._build(self.served.grid[0] if self.served.grid else 0.5).check_layers(model)

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict[str, Any]:
        m = self.model
        return {
            "family": m.family, "num_layers": m.num_layers, "final_layer": m.final_layer,
            "exit_layers": list(m.exit_layers), "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
            "context_window": self.context_window, "num_parameters": self.num_parameters,
            "device": str(m.device), "dtype": str(m.dtype).removeprefix("torch."),
            "policy_loaded": self.policy is not None,
            "controller": self.served.name,
            "serving": self._serving(),
            "default_threshold": self.serve_cfg.default_threshold,
            "full_model_threshold": FULL_MODEL_THRESHOLD,
            "policy_temperature": self.decoding_cfg.policy_temperature,
            "calibrated_targets": (sorted(self.calibration.get("targets", [])) if self.calibration else None),
            "policy_observation": getattr(self.policy, "observation", None),
            "kv_strategy": self.decoding_cfg.kv_strategy,
            "decode_compile": compile_info(self.model),
            "default_mode": getattr(self.serve_cfg, "default_mode", "lossy"),
            "max_batch_size": getattr(self.serve_cfg, "max_batch_size", 1),
            "prompt_format": self.prompt_format,
            "fill_in_the_middle": self.fim_ids is not None,
            "language": self.language if self.prompt_format == "codexglue" else None,
            "energy_source": self.meter.source,
            "run_dir": str(self.run_root) if self.run_root else None,
            "notes": self.notes,
        }

    def _bos_prefix(self) -> list[int]:
        # how a model sees a prompt, everywhere in the project: bos (when the tokenizer has one) + text,
        # left-truncated with the bos kept (greencode.data.tokenizer.encode_context)
        bos = self.tokenizer.bos_token_id
        return [int(bos)] if bos is not None else []

    # ------------------------------------------------------------------ editor text <-> model text
    def to_model_text(self, text: str) -> tuple[str, Optional[str]]:
        """Editor code -> the text the model was trained on (``serve.prompt_format``)."""
        if self.prompt_format == "raw" or not text.strip():
            return text, None

        note = None
        try:
            out = source_to_text(text, self.language, self.literal_mode, lenient=True)
        except Exception as e:  # noqa: BLE001 - any lexer failure on half-typed code: fall back to whitespace split
            out = " ".join(text.split())
            note = f"the {self.language} lexer failed ({type(e).__name__}); whitespace-split text was used"
        if self.language == "python" and out and "\n" in text and not text.rsplit("\n", 1)[1].strip():
            out += " " + EOL  # the cursor is on a fresh line
        return out, note

    def to_editor_text(self, text: str) -> str:
        """Model text -> editor text: ``<EOL>`` becomes a newline (Python); the rest as generated."""
        if self.prompt_format == "raw" or self.language != "python":
            return text
        return _EOL_RE.sub("\n", text)

    def model_stops(self, stops: list[str]) -> list[str]:
        if self.prompt_format == "raw":
            return stops
        eol = f" {EOL} " if self.language == "python" else " "
        out = [" ".join(s.replace("\n", eol).split()) for s in stops]
        return [s for s in dict.fromkeys(out) if s]

    def _serving(self) -> str:
        missing = self.served.missing(self.resources)
        if missing:
            return f"full model (no exit {missing[0]} in this run)"
        return "early-exit (RL policy)" if self.served.name == "gc" else f"early-exit ({self.served.name})"

    def _build(self, threshold: float):
        """The served controller at ``threshold`` (ignored by a controller without a parameter)."""
        try:
            return self.served.build(threshold if self.served.param else None, self.resources)
        except ConfigError as e:
            raise RequestError(422, f"exit threshold: {e}", loc="body.exit_threshold") from None

    # ------------------------------------------------------------------ request -> generate
    def controller_for(self, threshold: Optional[float], max_disagreement: Optional[float] = None,
                       fidelity: Optional[str] = None):
        """(controller, threshold used, mode). ``threshold >= 1.0`` (for a controller whose thresholds
        end at 1) or a run without what the served controller needs (the policy, for gc) -> the full
        model. ``max_disagreement`` (it wins over a threshold sent with it): the threshold calibrated for
        the served controller at the largest target at or below it (results/<name>/calibration), under
        the criterion ``fidelity`` (sequence when None); none certified there, or no calibration loaded ->
        the full model, which meets any target. ``fidelity`` without a target is ignored."""
        missing = self.served.missing(self.resources)
        # a fidelity without a target names nothing and is ignored; a target sent with a threshold wins over it
        if max_disagreement is not None:
            if missing:
                return NeverExit(), None, f"full_model_no_{missing[0]}"
            if self.calibration is None:  # nothing certified: the full model meets any target
                return NeverExit(), None, "full_model_no_calibration"
            try:
                calibrated = threshold_for(self.calibration, self.served.name, float(max_disagreement),
                                           fidelity or "sequence")
            except ConfigError as e:  # stricter than anything certified, or a criterion not calibrated
                return NeverExit(), None, ("full_model_target_not_certified" if "smallest calibrated target" in str(e)
                                           else "full_model_criterion_not_calibrated")
            if calibrated is None:
                return NeverExit(), None, "full_model_target_not_certified"
            threshold = calibrated
        thr = self.serve_cfg.default_threshold if threshold is None else float(threshold)
        if missing:
            return NeverExit(), None, f"full_model_no_{missing[0]}"
        if thr >= FULL_MODEL_THRESHOLD and self.served.bounds[1] == FULL_MODEL_THRESHOLD:
            return NeverExit(), thr, "full_model"
        return self._build(thr), thr, self.served.label

    def encode(self, prompt: str, max_new_tokens: int, num_ctx: Optional[int] = None,
               suffix: Optional[str] = None) -> tuple[list[int], dict]:
        """Token ids that fit ``context - max_new_tokens`` by dropping the oldest tokens (as
        llm-ls does: the code nearest the cursor is kept). BOS, when the tokenizer has one, leads and stays.

        Fill in the middle: a ``suffix`` (Ollama, OpenAI) or a FIM-formatted prompt (StarCoder, CodeLlama,
        DeepSeek, Qwen markers) gives the code after the cursor. A model that knows FIM gets its own layout
        (:func:`greencode.data.fim.layout_ids`, ``serve.fim_layout``: SPM by default; the suffix keeps up to a
        quarter of the room, cut at its far end); a left-to-right model gets the prefix, and
        ``suffix_ignored`` says so."""
        prefix, fim_suffix, fim = split_fim(prompt)
        if suffix:  # an explicit suffix wins over markers in the prompt (Ollama's own template would nest them)
            fim_suffix = suffix
        ctx = min(self.context_window, num_ctx or self.context_window)
        budget = ctx - max_new_tokens - len(self.bos_prefix)
        if budget < 1 and ctx < self.context_window:  # the client's num_ctx is smaller than its tokens: as Ollama,
            budget = 1  # generate anyway, from the code right before the cursor
        if budget < 1:
            raise RequestError(422, f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context "
                                    f"of {ctx} tokens; ask for fewer new tokens", loc="body.max_new_tokens")
        info: dict[str, Any] = {"fim_style": fim, "prompt_format": self.prompt_format}
        as_fim = bool(fim_suffix) and self.fim_ids is not None and budget > 8
        if fim_suffix and not as_fim:
            info.update(suffix_ignored=True, suffix_note=SUFFIX_IGNORED_NOTE if self.fim_ids is None else
                        "no room for the code after the cursor in this context: it was ignored")
        if as_fim:
            budget -= 3  # the three sentinels
        ids, total, fmt_note = self._encode_prefix(prefix, budget)
        s_ids: list[int] = []
        if as_fim:
            s_text, _ = self.to_model_text(fim_suffix[:max(8192, 32 * budget)])
            s_ids = self.tokenizer.encode(s_text, add_special_tokens=False) if s_text else []
            s_ids = s_ids[:max(budget // 4, budget - len(ids))]  # a quarter of the room, more when the prefix is short
            budget -= len(s_ids)
            info.update(fim=True, fim_layout=self.fim_layout, suffix_tokens=len(s_ids))
        kept = min(len(ids), budget)
        dropped = len(ids) - kept
        ids = self.bos_prefix + ids[len(ids) - kept:]
        if as_fim:
            ids = layout_ids(self.fim_ids, ids, s_ids, self.fim_layout)
        if not ids:
            fallback = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else (
                self.eos_ids[0] if self.eos_ids else None)
            if fallback is None:
                raise RequestError(422, "the prompt is empty and the tokenizer has no BOS/EOS token to start from; "
                                        "send some text", loc="body.prompt")
            ids = [int(fallback)]
        info.update({"prompt_tokens_dropped": dropped if total is not None else None,
                     "prompt_truncated": dropped > 0 or total is None})
        if fmt_note:
            info["prompt_format_note"] = fmt_note
        return ids, info

    def _encode_prefix(self, body: str, budget: int) -> tuple[list[int], Optional[int], Optional[str]]:
        """(ids, total or None when only the tail was tokenized, format note) of the code before the cursor.

        A stranger's 1 MB prompt must stay cheap (lexing + tokenizing it whole takes seconds), and so must
        an editor's usual few kilobytes, of which only the last ``budget`` tokens are kept (tokenizing costs
        about 0.25 µs per character on a 2-core CPU: 2 ms for 8 KB). So the last lines are tried first,
        starting at a line boundary: raw text from ``TAIL_CHARS_PER_TOKEN`` characters per kept token (code
        runs at about 4 on the default's tokenizer), then from the wider ``max(8192, 32 x budget)``; a lexed
        format (``serve.prompt_format``) from the wider window only, since a cut inside a multi-line string
        changes what the lexer makes of the tail. When a tail already gives more than budget (+ a margin for
        the cut) tokens, the kept newest tokens are the same as from the whole prompt. Otherwise the whole
        prompt is used."""
        wide = max(8192, 32 * budget)
        windows = (TAIL_CHARS_PER_TOKEN * budget, wide) if self.prompt_format == "raw" else (wide,)
        for window in windows:
            if len(body) <= window:
                break
            nl = body.find("\n", len(body) - window)
            tail_text, fmt_note = self.to_model_text(body[nl + 1:] if nl >= 0 else body[-window:])
            tail = self.tokenizer.encode(tail_text, add_special_tokens=False)
            if len(tail) > budget + 16:
                return tail, None, fmt_note
        text, fmt_note = self.to_model_text(body)
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        return ids, len(ids), fmt_note

    def prepare(self, gen: GenRequest, submitted_at: Optional[float] = None,
                deadline: Optional[float] = None) -> Job:
        """Encode the prompt, choose the controller and convert the stop strings (no model call).
        Raises :class:`RequestError` (422) for a request that cannot run."""
        t0 = time.perf_counter()
        if gen.logprobs is not None and not 0 <= gen.logprobs <= MAX_LOGPROBS:
            raise RequestError(422, f"logprobs={gen.logprobs}: this server returns at most {MAX_LOGPROBS} "
                                    "alternatives per token", loc="body.logprobs")
        lossless = (gen.mode or getattr(self.serve_cfg, "default_mode", "lossy")) == "lossless"
        ids, enc = self.encode(gen.prompt, gen.max_new_tokens, gen.num_ctx, gen.suffix)
        controller, thr, mode = self.controller_for(gen.threshold, gen.max_disagreement, gen.fidelity)
        t1 = time.perf_counter()
        return Job(gen=gen, ids=[int(i) for i in ids], enc=enc, controller=controller, threshold=thr, mode=mode,
                   stops=self.model_stops(gen.stop), submitted_at=t0 if submitted_at is None else submitted_at,
                   tokenize_s=t1 - t0, prepared_at=t1, deadline=deadline, lossless=lossless)

    def streamer(self, stops: Sequence[str] = ()) -> TextStreamer:
        """A :class:`TextStreamer` for this engine's editor text and the request's stop strings."""
        return TextStreamer(self.tokenizer, self.to_editor_text, stops,
                            eol=self.prompt_format != "raw" and self.language == "python")

    def new_batch(self):
        """An empty :class:`~greencode.decoding.generate.DecodeBatch` for this model (the one
        decoding loop: rows join it, step together and leave it as they finish)."""
        return DecodeBatch(self.model, kv_strategy=self.decoding_cfg.kv_strategy, tokenizer=self.tokenizer)

    def _start(self, job: Job, on_event: Optional[Callable[[TokenEvent], None]],
               should_stop: Optional[Callable[[], bool]], row=None):
        """What a run of ``job`` needs from the serving side: the stop test (``should_stop()`` or
        ``job.deadline`` passed) and the token callback that pushes a :class:`TokenEvent` (with the
        log probability ``row`` recorded for it, when asked); opens the job's energy window."""
        job.started_at = time.perf_counter()
        deadline = job.deadline
        stop = None
        if deadline is not None or should_stop is not None:
            def stop() -> bool:
                return (deadline is not None and time.perf_counter() > deadline) or (
                    should_stop is not None and bool(should_stop()))
        on_token = None
        if on_event is not None:
            streamer = job.streamer = self.streamer(job.gen.stop)
            count = itertools.count()

            def on_token(token_id: int, exit_layer: int) -> None:
                lp = top = None
                if row is not None and row.token_logprobs:  # recorded just before this call, for this token
                    lp = row.token_logprobs[-1]
                    top = row.top_logprobs[-1] if row.top_logprobs else None
                on_event(TokenEvent(next(count), int(token_id), streamer.push(token_id), int(exit_layer), lp, top))
        job.window = f"gen-{next(self._ids)}"
        self.meter.begin(job.window)
        return stop, on_token

    def _close_window(self, job: Job, cancel: bool = False) -> None:
        if getattr(job, "window", None) is not None:
            if cancel:
                self.meter.cancel(job.window)
            else:
                job.measurement = self.meter.end(job.window)
            job.window = None

    def prefill_chunk(self, job: Job, upto: int, state=None):
        """The first ``upto`` prompt tokens of ``job`` prefilled, continuing ``state`` (chunked prefill:
        :func:`greencode.decoding.prefill_chunk`)."""
        import torch

        return prefill_chunk(self.model, torch.tensor([job.ids], dtype=torch.long, device=self.model.device), upto,
                             state)

    def row(self, job: Job, on_event: Optional[Callable[[TokenEvent], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None):
        """The decoding row of ``job``: its controller, sampling, stop strings, and (``on_event``)
        a :class:`TokenEvent` for every token as it is chosen, with its log probability when asked.
        ``should_stop()`` and ``job.deadline`` end it between tokens (``finish_reason="cancelled"``).
        Opens the job's energy window (closed by :meth:`result`)."""
        gen = job.gen
        row = Row(controller=job.controller, max_new_tokens=gen.max_new_tokens,
                  do_sample=gen.do_sample and gen.temperature > 0, temperature=gen.temperature, top_p=gen.top_p,
                  top_k=gen.top_k, seed=gen.seed, eos=frozenset(self.eos_ids), stop_strings=job.stops or None,
                  return_logits=gen.logprobs is not None, logprobs=gen.logprobs, handle=job,
                  lossless=job.lossless, k_max=int(getattr(self.serve_cfg, "lossless_k_max", 4)))
        row.should_stop, row.on_token = self._start(job, on_event, should_stop, row)
        return row

    def step(self, batch) -> list:
        """One decoding step of ``batch``; returns the rows it finished."""
        if self.before_step is not None:
            self.before_step()
        return batch.step()

    def result(self, batch, row):
        """A finished row's :class:`~greencode.decoding.generate.GenerationResult`; closes its
        energy window (shared with the rows decoded beside it: a batch's energy is not split)."""
        self._close_window(row.handle)
        return batch.result(row)

    def abandon(self, row) -> None:
        """Close the energy window of a row that will not finish (its batch failed)."""
        self._close_window(row.handle, cancel=True)

    def run(self, job: Job, on_event: Optional[Callable[[TokenEvent], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None):
        """``job`` alone: a batch of one row (the same loop the scheduler steps many rows in,
        lossless rows included)."""
        batch = self.new_batch()
        row = self.row(job, on_event, should_stop)
        try:
            batch.add([row], [job.ids])
            while batch.rows:
                self.step(batch)
        except (ValueError, ConfigError) as e:  # the loop's own argument checks: the request's fault
            self.abandon(row)
            raise RequestError(422, f"cannot generate: {e}") from None
        except BaseException:
            self.abandon(row)
            raise
        return self.result(batch, row)

    def finish(self, job: Job, res) -> Completion:
        """The completion of a finished run: text cut at the first stop string, the tokens and
        statistics of what is returned, log probabilities when asked."""
        t2 = time.perf_counter()
        req, m = job.gen, job.measurement
        model_text = res.text if res.text is not None else self.tokenizer.decode(res.tokens, skip_special_tokens=True)
        full_text = self.to_editor_text(model_text)
        text = cut_at_stops(full_text, req.stop)
        # the tokens whose text is returned: a token wholly past a stop string is not counted as completion
        kept = len(res.tokens) if text == full_text else self.kept_tokens(res.tokens, text)
        cost = compute_cost(self.model, [res], job.controller)
        decode_exits = res.exit_layers[1:kept]
        started = job.started_at if job.started_at is not None else job.prepared_at
        stats = {
            "request_id": req.request_id,
            "controller": job.mode,
            "threshold": job.threshold,
            "max_disagreement": req.max_disagreement,
            "fidelity": (req.fidelity or "sequence") if req.max_disagreement is not None else None,
            "policy_temperature": self.decoding_cfg.policy_temperature if job.mode == "policy" else None,
            "exit_layers": list(res.exit_layers[:kept]),
            "num_layers": self.model.num_layers,
            "exit_points": list(self.model.exit_points),
            "mean_exit_layer": (sum(decode_exits) / len(decode_exits)) if decode_exits else None,
            "layers_skipped_share": cost["layers_skipped_share"],
            "compute_ratio": cost["compute_ratio"],
            "layers_run": res.counters.get("layers_run"),
            "decode_steps": res.counters.get("decode_steps", len(decode_exits)),
            "prompt_tokens": len(job.ids),
            **job.enc,
            "completion_tokens": kept,
            # what the model generated (the compute stats above count all of it, stop string included)
            "generated_tokens": len(res.tokens),
            "finish_reason": res.finish_reason,
            # from submission to the start of the run, less the preparation itself (thread hand-offs, waiting)
            "queue_s": max(0.0, started - job.submitted_at - job.tokenize_s),
            "tokenize_s": job.tokenize_s,
            "generation_s": m.latency_s if m is not None else None,
            "prefill_s": res.counters.get("prefill_time_s"),
            "decode_s": res.counters.get("decode_time_s"),
            "energy_j": m.energy_j if m is not None else None,
            "energy_source": m.source if m is not None else self.meter.source,
            "energy_note": m.note if m is not None else None,
        }
        stats["mode"] = "lossless" if job.lossless else "lossy"
        stats.update(self._optional_stats(job, res, model_text))
        tokens = [int(t) for t in res.tokens[:kept]]
        info = None
        if req.logprobs is not None:
            info = self.token_info(tokens, res.logits, text, req.logprobs)
        stats["postprocess_s"] = time.perf_counter() - t2
        stats["done_at"] = time.perf_counter()  # the app turns it into worker_to_loop_s
        return Completion(text=text, prompt_ids=list(job.ids), tokens=tokens, finish_reason=res.finish_reason,
                          stats=stats, token_info=info)

    def _optional_stats(self, job: Job, res, model_text: str) -> dict[str, Any]:
        """The statistics only some requests carry: the drafter's work in lossless mode (how much of it
        the full model accepted), the model's own text when it differs from the editor's, the notes on
        the request itself."""
        out: dict[str, Any] = {}
        if job.lossless:
            c = res.counters
            out.update(acceptance_rate=c.get("acceptance_rate"), mean_draft_length=c.get("mean_draft_length"),
                       drafted_tokens=c.get("drafted"), accepted_tokens=c.get("accepted"),
                       verification_rounds=c.get("rounds"))
        if self.prompt_format != "raw":
            out["model_text"] = model_text
        if job.gen.notes:
            out["request_notes"] = list(job.gen.notes)
        return out

    def complete(self, req: GenRequest, submitted_at: Optional[float] = None, deadline: Optional[float] = None,
                 on_event: Optional[Callable[[TokenEvent], None]] = None) -> Completion:
        """Run one request: :meth:`prepare`, :meth:`run`, :meth:`finish`. ``deadline``
        (``time.perf_counter`` seconds) stops the decoding loop between tokens once passed, so a
        request answered 504 frees the model at once."""
        job = self.prepare(req, submitted_at, deadline)
        return self.finish(job, self.run(job, on_event))

    def token_info(self, tokens: list[int], logits: Optional[list], text: str, top_n: int) -> list[TokenInfo]:
        """Each returned token's log-softmax under the logits that chose it, the ``top_n`` most
        likely alternatives, and where its text starts in ``text``."""
        import torch

        if not tokens:
            return []
        if logits is None or len(logits) < len(tokens):
            raise RuntimeError("the decoding loop returned no logits for log probabilities (return_logits=True)")
        lp = torch.log_softmax(torch.stack([lg.reshape(-1).float() for lg in logits[:len(tokens)]]), dim=-1)
        chosen = lp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = (torch.topk(lp, min(top_n, lp.shape[1]), dim=-1) if top_n else (None, None))
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        out, offset = [], 0
        for i, tok in enumerate(tokens):
            top = []
            if top_ids is not None:
                top = [(int(t), self.tokenizer.decode([int(t)]), float(v))
                       for t, v in zip(top_ids[i].tolist(), top_vals[i].tolist())]
            out.append(TokenInfo(id=tok, text=self.tokenizer.decode([tok]), logprob=float(chosen[i]), offset=offset,
                                 special=tok in special, top=top))
            # the next token's text starts where the editor text of the tokens so far ends (within text)
            upto = len(self.to_editor_text(self.tokenizer.decode(tokens[:i + 1], skip_special_tokens=True)))
            offset = max(offset, min(upto, len(text)))
        return out

    def kept_tokens(self, tokens: list[int], text: str) -> int:
        """How many leading ``tokens`` it takes to produce ``text`` (a prefix of their editor text):
        the completion's token count when a stop string cut the text."""
        if not text:
            return 0
        for k in range(1, len(tokens) + 1):
            if len(self.to_editor_text(self.tokenizer.decode(tokens[:k], skip_special_tokens=True))) >= len(text):
                return k
        return len(tokens)

    def warmup(self) -> None:
        t0 = time.perf_counter()
        ids = self.bos_prefix + self.tokenizer.encode("x", add_special_tokens=False)
        generate(self.model, ids, None, 2, tokenizer=self.tokenizer, kv_strategy=self.decoding_cfg.kv_strategy)
        log.info("warm-up generation: %.2f s", time.perf_counter() - t0)

    def pieces(self, tokens: list[int], text: str, stops: Sequence[str] = ()) -> list[str]:
        """The editor-text increments a stream of ``tokens`` sends (one per token, then the final
        flush), whose concatenation is exactly ``text`` (see :class:`TextStreamer`)."""
        streamer = self.streamer(stops)
        out = [streamer.push(t) for t in tokens]
        out.append(streamer.finish(text))
        return out
