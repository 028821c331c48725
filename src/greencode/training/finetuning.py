"""LITE fine-tuning on the HF Trainer.

The Trainer holds the plain HF module (``EarlyExitModel.hf``), so checkpoints, resuming,
DDP / FSDP / DeepSpeed under ``accelerate launch`` and saving work as usual; only
``compute_loss`` is replaced by the LITE loss (:func:`greencode.training.lite.lite_loss`),
which runs the forward pass through the wrapped module and logs each exit's loss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from greencode.config import ConfigError
from greencode.data import load_tokenizer
from greencode.models import EarlyExitModel, lite_weights
from greencode.paths import RunPaths
from greencode.runinfo import save_run_info
from greencode.training import common
from greencode.training.data import build_datasets
from greencode.training.lite import check_weights, lite_loss
from greencode.utils import set_seed

log = logging.getLogger(__name__)


class LiteTrainer(common.GreenTrainer):
    """``compute_loss`` = the LITE loss; each exit's mean loss since the last log is added
    to the logs as ``loss_exit_<layer>`` / ``eval_loss_exit_<layer>`` (averaged over ranks),
    so it reaches TensorBoard, the CSV log and ``trainer_state.json``."""

    # compute_loss returns a per-batch mean; the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, ee_model, lite_weights: Sequence[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.ee = ee_model
        self.lite_weights = check_weights(lite_weights, ee_model.exit_points)
        self.exit_means = common.ExitLossMeans(ee_model.exit_points)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, per_exit = lite_loss(self.ee, inputs["input_ids"], inputs.get("labels"), inputs.get("attention_mask"),
                                    self.lite_weights, forward_module=model)
        self.exit_means.add("train" if model.training else "eval", dict(zip(self.ee.exit_points, per_exit)),
                            float(inputs["input_ids"].shape[0]))
        return (total, {"loss": total}) if return_outputs else total

    def _add_extra_logs(self, logs: dict) -> None:
        self.exit_means.pop_into(logs, self)


def base_source(cfg) -> str:
    """Where fine-tuning starts: ``model.base`` (local directory or hub id), else the
    pretrained embedded default ``runs/<name>/base_model``."""
    if cfg.model.base is None:
        src = RunPaths.from_config(cfg).base_model
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"no base model at {src}; pretrain it first with `python scripts/pretrain.py "
                                    f"--config {cfg.source_path or '<your config>'}` (or set model.base to an HF model "
                                    "directory or hub id)")
        return str(src)
    base = cfg.model.base
    p = Path(base).expanduser()
    looks_local = base.startswith((".", "/", "~")) or base.count("/") != 1 or p.exists()
    if looks_local and not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json (not an HF model directory)"
        raise FileNotFoundError(f"model.base={base!r}: the base model directory {what}; point model.base at an HF "
                                "model directory (with config.json) or a hub id such as meta-llama/Llama-3.2-3B")
    return str(p) if looks_local else base


def finetune_weights(cfg, ee) -> list[float]:
    """The LITE weights for this model's exit points (config scheme; checked)."""
    f = cfg.finetune
    return lite_weights(ee.exit_layers, ee.num_layers, f.weights, f.budgets, f.ratio)


def finetune_key(cfg, base: str) -> tuple[str, dict]:
    model = cfg.section_dict("model")["model"]
    payload = {"stage": "finetune", "base": base, "base_fingerprint": common.model_dir_fingerprint(base),
               "exits": {"exit_layers": model["exit_layers"], "exit_schedule": model["exit_schedule"]},
               "finetune": common.stage_settings(cfg, "finetune"), "seed": cfg.seed, "dtype": cfg.hardware.dtype,
               "data": common.data_fingerprint(cfg)}
    return common.make_key(payload), payload


def _load_base(cfg, base: str):
    """The base model (fp32 master weights) with the run's exits, its LITE weights and the tokenizer; bad exits,
    weights or a tokenizer the base does not match fail here, before anything is written."""
    if cfg.model.base is None:
        common.check_same_tokenizer(base, cfg, f"python scripts/pretrain.py --config {cfg.source_path or '<config>'}")
    set_seed(cfg.seed)
    ee = EarlyExitModel.from_run_config(cfg, base, dtype=torch.float32)
    weights = finetune_weights(cfg, ee)
    tokenizer = load_tokenizer(cfg)
    if len(tokenizer) > ee.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the base model {base} only {ee.vocab_size} "
                          "embeddings; use the base model's own tokenizer (tokenizer.path)")
    log.info("finetune: LITE on %s (%s, %d layers); exit points %s (0-based, final %d); weights %s", base, ee.family,
             ee.num_layers, ee.exit_points, ee.final_layer, [round(w, 5) for w in weights])
    return ee, weights, tokenizer


def finetune(cfg, resume: bool = False, force: bool = False) -> Path:
    """LITE-fine-tune the base model; returns ``runs/<name>/finetuned`` (HF model + tokenizer
    + ``greencode_exits.json``; ``EarlyExitModel.from_pretrained`` loads it with its exits).

    Reused when complete and its key (base model identity, exits, ``finetune`` section,
    seed, dtype, data) is unchanged, unless ``force``. ``resume`` continues from the last
    checkpoint of an interrupted run.
    """
    paths = RunPaths.from_config(cfg)
    out, stage = paths.finetuned, cfg.finetune
    base = base_source(cfg)
    started, trainer_dir, args = common.stage_start(cfg, stage, out)
    key, payload = finetune_key(cfg, base)
    if not force and common.is_complete(out, key):
        log.info("finetune: %s is complete and up to date (key %s); reusing it (--force to redo)", out, key)
        return out

    ee, weights, tokenizer = _load_base(cfg, base)
    ckpt = common.prepare_trainer_dir(args, trainer_dir, key, resume)
    with args.main_process_first(local=False, desc="packing"):
        train_ds, val_ds = build_datasets(cfg, stage, tokenizer)

    hf = ee.hf.train()
    tokens_per_step = stage.batch_size * stage.grad_accum * args.world_size * stage.seq_len
    callbacks = common.log_callbacks(trainer_dir, tokens_per_step, ee.exit_points)
    from transformers import default_data_collator

    trainer = LiteTrainer(model=hf, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                          data_collator=default_data_collator, callbacks=callbacks, ee_model=ee, lite_weights=weights)
    train_out, train_s, train_cpu_s, metrics, state_dict = common.train_and_evaluate(trainer, ckpt)
    if trainer.is_world_process_zero():
        ee.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(out)
        save_run_info(out, cfg, "finetune", base_model=base, lite_weights=weights)
        run = common.run_record(trainer, args, ckpt, stage.seq_len, tokens_per_step, len(train_ds), len(val_ds),
                                train_s, train_cpu_s)
        summary = {
            "stage": "finetune", "output_dir": str(out), "base_model": base, "family": ee.family,
            "num_layers": ee.num_layers, "exit_points": ee.exit_points, "final_layer": ee.final_layer,
            "lite_weights": weights, "weights_scheme": stage.weights, **run,
            "final_train_loss": common.last_train_loss(trainer), "train_loss_mean": train_out.training_loss,
            "eval_loss": metrics.get("eval_loss"),
            "eval_loss_per_exit": {str(e): metrics.get(f"eval_loss_exit_{e}") for e in ee.exit_points},
            **common.stage_time(started),
        }
        common.record_stage("finetune", out, paths.results_finetune, trainer_dir, cfg, summary, key, payload)
        log.info("finetune: done in %.1f s, %d steps, %d tokens (%.0f tokens/s), eval LITE loss %.4f, per exit %s -> %s",
                 train_s, summary["steps"], summary["train_tokens"], summary["train_tokens_per_s"],
                 summary["eval_loss"] or float("nan"), summary["eval_loss_per_exit"], out)
    trainer.accelerator.wait_for_everyone()
    return out
