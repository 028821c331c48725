"""What base pretraining and LITE fine-tuning share: stage keys (reuse of finished
outputs), TrainingArguments from a config section, the loss CSV and TensorBoard callbacks,
the Trainer subclass with per-exit loss logging, checkpoint/resume handling and saving.

Layout of a stage's output directory (``runs/<name>/base_model`` or ``.../finetuned``)::

    config.json, model.safetensors, tokenizer files    the HF model (+ greencode_exits.json)
    config.yaml, run_info.json, command.txt             how it was made
    greencode_stage.json                                written last: the stage key + summary
    trainer/checkpoint-N/                               HF Trainer checkpoints (--resume)
    trainer/tensorboard/, trainer/train_log.csv         logs (total loss and each exit's loss)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from greencode.config import ConfigError
from greencode.data import prepare_data
from greencode.paths import RunPaths
from greencode.provenance import (STAGE_FILE, WEIGHT_SUFFIXES, file_digest, make_key,  # noqa: F401
                                  model_dir_fingerprint, read_stage, weight_files_sha256, weights_bytes_record)
from greencode.runinfo import run_metadata
from greencode.utils import atomic_path, portable_path, read_json, resolve_device, setup_torch, write_json

log = logging.getLogger(__name__)

TRAINER_DIR = "trainer"
CSV_NAME = "train_log.csv"


# --------------------------------------------------------------------------- stage keys
def is_complete(directory: Path, key: str) -> bool:
    rec = read_stage(directory)
    return bool(rec and rec.get("complete") and rec.get("key") == key and (Path(directory) / "config.json").is_file())


def stage_settings(cfg, stage: str) -> dict:
    """A training stage's section as its key sees it: ``fim`` only when on, so the runs made before
    fill-in-the-middle existed keep their keys."""
    d = cfg.section_dict(stage)[stage]
    if not (d.get("fim") or {}).get("rate"):
        d.pop("fim", None)
    return d


def data_fingerprint(cfg) -> dict:
    """The corpus content hash and the tokenizer fingerprint written by greencode.data."""
    paths = RunPaths.from_config(cfg)
    corpus = {}
    tok = {}
    try:
        corpus = read_json(paths.corpus / "manifest.json")
    except (OSError, ValueError):
        pass
    try:
        tok = read_json(paths.tokenizer / "greencode_tokenizer.json")
    except (OSError, ValueError):
        pass
    return {"corpus": corpus.get("content_hash"), "tokenizer": tok.get("fingerprint")}


def check_same_tokenizer(model_dir, cfg, redo: str) -> None:
    """A model this project trained records the tokenizer fingerprint it was trained with;
    refuse to continue with a rebuilt (different) run tokenizer: the token ids no longer
    mean what the model learned."""
    rec = read_stage(Path(model_dir))
    if not rec:
        return  # not trained here (hub model, foreign directory): its own tokenizer is the config's business
    then = ((rec.get("payload") or {}).get("data") or {}).get("tokenizer")
    now = data_fingerprint(cfg).get("tokenizer")
    if then and now and then != now:
        raise ConfigError(f"{model_dir} was trained with tokenizer {then[:12]} but the run's tokenizer is now "
                          f"{now[:12]} (the corpus or tokenizer was rebuilt since); redo it with `{redo}`")


# --------------------------------------------------------------------------- arguments
def _precision(cfg, stage=None) -> dict:
    device = resolve_device(cfg.hardware.device)
    dtype = cfg.hardware.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    mode = getattr(stage, "mixed_precision", "auto") if stage is not None else "auto"
    if mode != "auto":
        dtype = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[mode]
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16", "use_cpu": device.type == "cpu"}


def training_arguments(cfg, stage, output_dir: Path, *, disable_tqdm: Optional[bool] = None):
    """HF ``TrainingArguments`` from a stage section (``cfg.pretrain`` / ``cfg.finetune``)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=stage.learning_rate,
        lr_scheduler_type=stage.lr_scheduler,
        weight_decay=stage.weight_decay,
        per_device_train_batch_size=stage.batch_size,
        per_device_eval_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        eval_strategy="steps",
        eval_steps=stage.eval_steps,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        logging_strategy="steps",
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=stage.dataloader_workers,
        prediction_loss_only=True,
        disable_tqdm=disable_tqdm,
        ddp_find_unused_parameters=False,
        **{ckpt_key: stage.gradient_checkpointing},
        **_precision(cfg, stage),
    )
    if stage.warmup_ratio > 0:
        kwargs["warmup_steps"] = stage.warmup_ratio if stage.warmup_ratio < 1 else max(stage.max_steps, 1)
    return TrainingArguments(**kwargs)


# --------------------------------------------------------------------------- callbacks
def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class CsvLogCallback(_callback_base()):
    """Appends every train/eval log to a CSV with fixed columns (total loss, each exit's
    loss, learning rate, throughput). Written by the main process only. On resume, rows
    logged after the resumed step by the interrupted run are dropped."""

    def __init__(self, path: Path, exit_points: Sequence[int] = (), tokens_per_step: int = 0):
        self.path = Path(path)
        self.exit_points = list(exit_points)
        self.tokens_per_step = tokens_per_step
        self.columns = (["step", "epoch", "split", "loss"] + [f"loss_exit_{e}" for e in self.exit_points]
                        + ["learning_rate", "grad_norm", "tokens", "elapsed_s", "tokens_per_s"])
        self._t0 = time.perf_counter()
        self._last = (self._t0, 0)
        self._elapsed0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._t0 = time.perf_counter()
        self._last = (self._t0, state.global_step)
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= state.global_step]
            if rows and rows[-1].get("elapsed_s"):
                self._elapsed0 = float(rows[-1]["elapsed_s"])
        if state.global_step == 0:
            rows = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or log_split(logs) is None:
            return
        split, prefix = log_split(logs)
        now = time.perf_counter()
        t_last, step_last = self._last
        row = {"step": state.global_step, "epoch": _fmt(logs.get("epoch")), "split": split,
               "loss": _fmt(logs.get(f"{prefix}loss")), "tokens": state.global_step * self.tokens_per_step,
               "elapsed_s": round(self._elapsed0 + now - self._t0, 3)}
        for e in self.exit_points:
            row[f"loss_exit_{e}"] = _fmt(logs.get(f"{prefix}loss_exit_{e}"))
        if split == "train":
            row["learning_rate"] = _fmt(logs.get("learning_rate"))
            row["grad_norm"] = _fmt(logs.get("grad_norm"))
            if now > t_last and state.global_step > step_last:
                row["tokens_per_s"] = round((state.global_step - step_last) * self.tokens_per_step / (now - t_last), 1)
            self._last = (now, state.global_step)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def log_split(logs: dict) -> Optional[tuple[str, str]]:
    """(split, key prefix) of a Trainer log record: ("train", "") or ("eval", "eval_"); None otherwise."""
    if "loss" in logs:
        return "train", ""
    if "eval_loss" in logs:
        return "eval", "eval_"
    return None


class ExitLossMeans:
    """Each exit layer's mean loss between two Trainer logs, per split (train / eval), for the
    ``loss_exit_<layer>`` / ``eval_loss_exit_<layer>`` log keys. The sums stay on the device (no host
    sync per step) and are summed over processes at log time (DDP, FSDP, DeepSpeed). A step may
    report only some layers (a curriculum's): each layer keeps its own count. ``dtype``: of the sums."""

    def __init__(self, layers: Sequence[int], dtype: torch.dtype = torch.float32):
        self.layers, self.dtype = [int(x) for x in layers], dtype
        self._col = {layer: i for i, layer in enumerate(self.layers)}
        self._acc: dict[str, Optional[torch.Tensor]] = {"train": None, "eval": None}  # [2, L]: sums, counts
        self._cols: dict[tuple, torch.Tensor] = {}  # a step's layers -> their columns, on the device (copied once)

    def add(self, split: str, losses: dict[int, torch.Tensor], n: float) -> None:
        """Add one step's per-layer mean losses (``{layer: scalar}``) over ``n`` sequences."""
        if not losses:
            return
        vals = torch.stack([v.detach().to(self.dtype) for v in losses.values()])
        acc = self._acc[split]
        if acc is None:
            acc = self._acc[split] = torch.zeros(2, len(self.layers), dtype=self.dtype, device=vals.device)
        key = (tuple(int(k) for k in losses), vals.device)
        cols = self._cols.get(key)
        if cols is None:
            cols = self._cols[key] = torch.tensor([self._col[k] for k in key[0]], device=vals.device)
        acc[0].index_add_(0, cols, vals * n)
        acc[1].index_add_(0, cols, torch.full_like(vals, n))

    def pop_into(self, logs: dict, trainer) -> None:
        """Write the means since the last log into a Trainer log record (nothing for other records)."""
        got = log_split(logs)
        if got is None:
            return
        split, prefix = got
        acc = self._acc[split]
        if acc is None:
            acc = torch.zeros(2, len(self.layers), dtype=self.dtype)
        acc = acc.to(trainer.args.device)
        if trainer.args.world_size > 1:
            acc = trainer.accelerator.reduce(acc, reduction="sum")
        means = (acc[0] / acc[1].clamp_min(1)).tolist()
        for layer, mean, count in zip(self.layers, means, acc[1].tolist()):
            if count > 0:
                logs[f"{prefix}loss_exit_{layer}"] = round(mean, 6)
        self._acc[split] = None


def _fmt(v):
    if v is None:
        return ""
    return round(float(v), 6) if isinstance(v, (int, float)) else v


def tensorboard_callback(log_dir: Path):
    """HF's TensorBoard callback writing to ``log_dir`` (None if tensorboard is missing)."""
    try:
        from transformers.integrations import TensorBoardCallback

        cb = TensorBoardCallback()
    except (ImportError, RuntimeError) as e:
        log.warning("TensorBoard logging off (%s); install tensorboard to get it", e)
        return None
    cb.logging_dir = str(log_dir)
    return cb


# --------------------------------------------------------------------------- trainer
def _trainer_base():
    from transformers import Trainer

    return Trainer


class GreenTrainer(_trainer_base()):
    """The HF Trainer plus a one-line log per logging step on every rank."""

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        self._add_extra_logs(logs)
        if "loss" in logs or "eval_loss" in logs:
            kind = "train" if "loss" in logs else "eval"
            val = logs.get("loss", logs.get("eval_loss"))
            exits = " ".join(f"{k.split('_')[-1]}:{v:.3f}" for k, v in logs.items() if "loss_exit_" in k)
            rank = f"rank {self.args.process_index}/{self.args.world_size} " if self.args.world_size > 1 else ""
            log.info("%s%s step %d/%d | loss %.4f%s", rank, kind, self.state.global_step, self.state.max_steps, val,
                     f" | exits {exits}" if exits else "")
        super().log(logs, start_time)

    def _add_extra_logs(self, logs: dict) -> None:
        pass


def last_checkpoint(trainer_dir: Path) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(trainer_dir)) if Path(trainer_dir).is_dir() else None


def prepare_trainer_dir(args, trainer_dir: Path, key: str, resume: bool) -> Optional[str]:
    """The checkpoint to resume from (None = start fresh). A fresh start removes old
    checkpoints and logs; resuming checks they were written with the same stage key.
    Either way the previous final model next to ``trainer_dir`` is removed."""
    key_file = trainer_dir / "stage_key.json"
    ckpt = last_checkpoint(trainer_dir) if resume else None
    if resume:
        if ckpt is None:
            log.info("--resume: no checkpoint in %s; starting from scratch", trainer_dir)
        else:
            old = None
            try:
                old = read_json(key_file).get("key")
            except (OSError, ValueError):
                pass
            if old is not None and old != key:
                raise ConfigError(f"the checkpoints in {trainer_dir} were written with different settings (stage key "
                                  f"{old}, now {key}); restore the config to resume, or run without --resume to "
                                  "start over")
            log.info("resuming from %s", ckpt)
    with args.main_process_first(local=False, desc="trainer dir"):
        if args.process_index == 0:
            if ckpt is None and trainer_dir.exists():
                old_ckpt = last_checkpoint(trainer_dir)
                if old_ckpt:
                    log.warning("removing the checkpoints of an earlier run in %s (pass --resume to continue "
                                "from %s instead)", trainer_dir, Path(old_ckpt).name)
                shutil.rmtree(trainer_dir)
            trainer_dir.mkdir(parents=True, exist_ok=True)
            write_json(key_file, {"key": key})
            # the previous model in the output dir is stale from now on: no half-valid model is left behind
            for p in trainer_dir.parent.iterdir():
                if p != trainer_dir:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return ckpt


def final_eval(trainer) -> dict:
    """Evaluation metrics at the last step (reuses the periodic eval when it ran there)."""
    for rec in reversed(trainer.state.log_history):
        if "eval_loss" in rec:
            if rec.get("step") == trainer.state.global_step:
                return {k: v for k, v in rec.items() if k.startswith("eval_")}
            break
    return trainer.evaluate()


def gathered_state_dict(trainer):
    """A full state dict for sharded training (FSDP / DeepSpeed), else None. Collective:
    call on every rank."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def log_callbacks(trainer_dir: Path, tokens_per_step: int, exit_points=None) -> list:
    """The CSV log (total and, with exit points, per-exit losses) plus TensorBoard when installed."""
    callbacks = [CsvLogCallback(trainer_dir / CSV_NAME, exit_points, tokens_per_step) if exit_points is not None
                 else CsvLogCallback(trainer_dir / CSV_NAME, tokens_per_step=tokens_per_step)]
    tb = tensorboard_callback(trainer_dir / "tensorboard")
    if tb is not None:
        callbacks.append(tb)
    return callbacks


def train_and_evaluate(trainer, ckpt: Optional[str]):
    """Train (resuming from ``ckpt``), then evaluate and gather the weights on every rank.
    Returns (train output, wall seconds, CPU seconds, eval metrics, gathered state dict or None)."""
    t0, c0 = time.perf_counter(), time.process_time()
    train_out = trainer.train(resume_from_checkpoint=ckpt)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    metrics = final_eval(trainer)
    return train_out, train_s, train_cpu_s, metrics, gathered_state_dict(trainer)


def last_train_loss(trainer) -> Optional[float]:
    for rec in reversed(trainer.state.log_history):
        if "loss" in rec:
            return float(rec["loss"])
    return None


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def checkpoint_step(ckpt: Optional[str]) -> int:
    """The global step of a ``checkpoint-N`` directory (0 for None)."""
    if not ckpt:
        return 0
    try:
        return int(Path(ckpt).name.rsplit("-", 1)[-1])
    except ValueError:
        return 0


def stage_weights(stage: str, key: str, payload: dict, output_dir: Path) -> dict:
    """The weights record of a training stage's results (:mod:`greencode.provenance`): the fingerprint
    its output directory will have once its stage record is written (``stage:<key>``) with the bytes of the
    weights saved there (``base_bytes`` / ``finetuned_bytes``), and for LITE the base it was trained from."""
    fp = f"stage:{key}"
    saved = weight_files_sha256(output_dir) if Path(output_dir).is_dir() else None
    if stage == "pretrain":
        rec = {"base": fp, "finetuned": None, "dirs": {"base": portable_path(output_dir), "finetuned": None}}
        return {**rec, "base_bytes": saved} if saved else rec
    base = payload.get("base")
    rec = {"base": payload.get("base_fingerprint"), "finetuned": fp,
           "dirs": {"base": portable_path(base) if base and Path(base).is_dir() else base,
                    "finetuned": portable_path(output_dir)}}
    return {**rec, "finetuned_bytes": saved} if saved else rec


def run_record(trainer, args, ckpt: Optional[str], seq_len: int, tokens_per_step: int, n_train: int, n_val: int,
               train_s: float, train_cpu_s: float) -> dict:
    """The part of a training stage's summary every stage shares: steps and tokens (trained, available,
    evaluated), the resumed checkpoint, world size, and the training's wall and CPU time and tokens/s
    (the steps of this run only, when resumed)."""
    steps = trainer.state.global_step
    return {"steps": steps, "resumed_from": ckpt, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
            "train_tokens": steps * tokens_per_step, "train_chunks_available": n_train, "eval_tokens": n_val * seq_len,
            "world_size": args.world_size, "train_runtime_s": round(train_s, 3),
            "train_cpu_time_s": round(train_cpu_s, 3),
            "train_tokens_per_s": round((steps - checkpoint_step(ckpt)) * tokens_per_step / max(train_s, 1e-9), 1)}


def stage_start(cfg, stage, out: Path):
    """What both training stages do first: note the start (for :func:`stage_time`), set up torch, build the
    Trainer's arguments for ``stage`` (``cfg.pretrain`` / ``cfg.finetune``) in ``out``'s trainer folder, and
    prepare the corpus (the main process first). Returns (started, trainer folder, arguments)."""
    started = (time.perf_counter(), time.process_time())
    trainer_dir = out / TRAINER_DIR
    setup_torch(cfg.hardware)
    args = training_arguments(cfg, stage, trainer_dir)
    with args.main_process_first(local=False, desc="data"):
        prepare_data(cfg)
    return started, trainer_dir, args


def stage_time(started: tuple[float, float]) -> dict:
    """The stage's wall and CPU seconds since ``started`` = (``perf_counter``, ``process_time``)."""
    return {"stage_time_s": round(time.perf_counter() - started[0], 3),
            "stage_cpu_time_s": round(time.process_time() - started[1], 3)}


def record_stage(stage: str, out: Path, results_dir: Path, trainer_dir: Path, cfg, summary: dict, key: str,
                 payload: dict) -> None:
    """A finished training stage: its committed results (:func:`write_stage_results`, with the weights record)
    and the stage file in its output directory that marks it complete under ``key``."""
    write_stage_results(results_dir, trainer_dir, cfg, summary, stage_weights(stage, key, payload, out))
    write_json(out / STAGE_FILE, {"stage": stage, "key": key, "complete": True, "payload": payload,
                                  "summary": summary, "weights_bytes": weights_bytes_record(out)})


def write_stage_results(results_dir: Path, trainer_dir: Path, cfg, summary: dict,
                        weights: Optional[dict] = None) -> None:
    """Small committed results of a stage: the loss CSV and ``summary.json`` (with run metadata and
    the ``weights`` record, :func:`stage_weights`)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    src = trainer_dir / CSV_NAME
    if src.is_file():
        with atomic_path(results_dir / CSV_NAME) as tmp:
            shutil.copyfile(src, tmp)
    meta = run_metadata(cfg, **({"weights": weights} if weights is not None else {}))
    write_json(results_dir / "summary.json", {**summary, "meta": meta})
