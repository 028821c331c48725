"""Base pretraining of the embedded default: a small Llama- or OPT-architecture model of the
configured shape, from a random init, on the packed corpus, on the HF Trainer. The result is
a normal HF model directory plus the tokenizer (the paper's "base model"); no exit file, so
the fine-tuning stage takes its exits from the config.

Two recipes: the plain one (``pretrain.early_exit.enabled: false``, the final layer's
causal-LM loss alone) and the early-exit-ready one (LayerSkip-style: an early-exit loss at
every exit point through the shared final norm and LM head, with a curriculum, layer dropout
rising with depth and optional self-distillation; :mod:`greencode.training.early_exit_loss`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from greencode.config import ConfigError
from greencode.data import load_tokenizer
from greencode.models import EarlyExitModel
from greencode.paths import RunPaths
from greencode.runinfo import save_run_info
from greencode.training import common, early_exit_loss as eel
from greencode.training.data import build_datasets
from greencode.training.early_exit_loss import early_exit_loss
from greencode.utils import set_seed

log = logging.getLogger(__name__)


class EarlyExitPretrainer(common.GreenTrainer):
    """``compute_loss`` = :func:`~greencode.training.early_exit_loss.early_exit_loss` with the
    curriculum's exit points at the current step (all of them at evaluation); each layer's
    mean loss since the last log is added as ``loss_exit_<layer>`` / ``eval_loss_exit_<layer>``.
    Layer dropout is installed on the decoder layers for the trainer's lifetime (it acts only
    in training mode)."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, ee_model, ee_cfg, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ee, self.ee_cfg = ee_model, ee_cfg
        n = len(ee_model.exit_layers)
        self.scales = eel.loss_scales(ee_model.exit_layers, ee_cfg.scale)
        self.curriculum = eel.ExitCurriculum(n, ee_cfg.curriculum, ee_cfg.curriculum_period, ee_cfg.gradual_fraction,
                                             max(1, self.args.max_steps))
        probs = eel.layer_dropout_probs(ee_model.num_layers, ee_cfg.layer_dropout, ee_cfg.layer_dropout_scale)
        self.dropout = eel.LayerDropout(probs, seed=seed).install(list(ee_model.layers))
        # float64 sums: the logged means as the earlier per-step host sums gave them
        self.exit_means = common.ExitLossMeans(ee_model.exit_points, dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(seed + 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        c = self.ee_cfg
        split = "train" if model.training else "eval"
        active = self.curriculum.active(self.state.global_step) if split == "train" else list(range(len(self.scales)))
        total, per_layer = early_exit_loss(self.ee, inputs["input_ids"], inputs.get("labels"),
                                           inputs.get("attention_mask"), active=active, scales=self.scales,
                                           e_scale=c.e_scale, distill=c.distill,
                                           distill_temperature=c.distill_temperature,
                                           token_fraction=c.token_fraction if split == "train" else 1.0,
                                           generator=self._gen, forward_module=model)
        self.exit_means.add(split, per_layer, float(inputs["input_ids"].shape[0]))
        return (total, {"loss": total}) if return_outputs else total

    def _add_extra_logs(self, logs: dict) -> None:
        self.exit_means.pop_into(logs, self)

_SHAPE_KEYS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
               "max_position_embeddings", "rope_theta", "tie_word_embeddings", "attn_implementation")


def _last_log(trainer, key: str):
    for rec in reversed(trainer.state.log_history):
        if key in rec:
            return float(rec[key])
    return None


def pretrain_key(cfg) -> tuple[str, dict]:
    model = cfg.section_dict("model")["model"]
    payload = {"stage": "pretrain", "model": {k: model[k] for k in _SHAPE_KEYS},
               "pretrain": common.stage_settings(cfg, "pretrain"), "seed": cfg.seed, "dtype": cfg.hardware.dtype,
               "data": common.data_fingerprint(cfg)}
    return common.make_key(payload), payload


def _trainer(cfg, args, model, tokenizer, train_ds, val_ds, trainer_dir: Path, tokens_per_step: int):
    """The HF Trainer of the stage: the early-exit pretrainer (``pretrain.early_exit.enabled``) or the plain one."""
    from transformers import default_data_collator

    ee_cfg = cfg.pretrain.early_exit
    kw = dict(model=model.hf, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
              data_collator=default_data_collator)
    if not ee_cfg.enabled:
        return common.GreenTrainer(**kw, callbacks=common.log_callbacks(trainer_dir, tokens_per_step))
    log.info("pretrain: early-exit loss at exits %s (scale %s, e_scale %g, curriculum %s, distill %g), "
             "layer dropout up to %g (%s)", model.exit_layers, ee_cfg.scale, ee_cfg.e_scale, ee_cfg.curriculum,
             ee_cfg.distill, ee_cfg.layer_dropout, ee_cfg.layer_dropout_scale)
    return EarlyExitPretrainer(**kw, callbacks=common.log_callbacks(trainer_dir, tokens_per_step, model.exit_points),
                               ee_model=model, ee_cfg=ee_cfg, seed=cfg.seed)


def _summary(cfg, out: Path, model, tokenizer, trainer, n_params: int, run: dict, train_out, metrics: dict,
             started: tuple) -> dict:
    """What the stage records: the model, the run (:func:`common.run_record`), the losses (the final layer's
    own with the early-exit recipe), the eval loss per layer and the times."""
    ee = cfg.pretrain.early_exit.enabled
    last = model.num_layers - 1
    eval_loss = metrics.get(f"eval_loss_exit_{last}", metrics.get("eval_loss"))
    return {
        "stage": "pretrain", "output_dir": str(out), "family": model.family, "num_layers": model.num_layers,
        "hidden_size": model.hidden_size, "vocab_size": len(tokenizer), "num_parameters": n_params, **run,
        # the final layer's own loss (with the early-exit recipe the Trainer's "loss" is the whole objective)
        "final_train_loss": _last_log(trainer, f"loss_exit_{last}") if ee else common.last_train_loss(trainer),
        "final_train_objective": common.last_train_loss(trainer), "train_loss_mean": train_out.training_loss,
        "eval_loss": eval_loss, "eval_perplexity": common.perplexity(eval_loss),
        "recipe": "early_exit" if ee else "plain",
        "eval_loss_per_layer": {k.rsplit("_", 1)[-1]: v for k, v in metrics.items() if "loss_exit_" in k},
        **common.stage_time(started),
    }


def pretrain(cfg, resume: bool = False, force: bool = False) -> Path:
    """Pretrain the embedded default's base model; returns ``runs/<name>/base_model``.

    Reused without training when it is complete and its key (model shape, ``pretrain``
    section, seed, dtype, corpus and tokenizer fingerprints) is unchanged, unless ``force``.
    ``resume`` continues from the last checkpoint of an interrupted run.
    """
    if cfg.model.base is not None:
        raise ConfigError(f"model.base={cfg.model.base!r} is set, so there is no base model to pretrain (the paper "
                          "configs start from pretrained weights); run scripts/finetune.py, or set model.base=null "
                          "to pretrain the embedded default")
    paths = RunPaths.from_config(cfg)
    out, stage = paths.base_model, cfg.pretrain
    started, trainer_dir, args = common.stage_start(cfg, stage, out)
    key, payload = pretrain_key(cfg)
    if not force and common.is_complete(out, key):
        log.info("pretrain: %s is complete and up to date (key %s); reusing it (--force to redo)", out, key)
        return out

    ckpt = common.prepare_trainer_dir(args, trainer_dir, key, resume)
    tokenizer = load_tokenizer(cfg)
    with args.main_process_first(local=False, desc="packing"):
        train_ds, val_ds = build_datasets(cfg, stage, tokenizer)
    set_seed(cfg.seed)
    model = EarlyExitModel.from_config(cfg.model, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    hf = model.hf.train()
    n_params = sum(p.numel() for p in hf.parameters())
    log.info("pretrain: %s %d layers, hidden %d, %.2fM parameters, vocab %d", model.family, model.num_layers,
             model.hidden_size, n_params / 1e6, len(tokenizer))
    tokens_per_step = stage.batch_size * stage.grad_accum * args.world_size * stage.seq_len
    trainer = _trainer(cfg, args, model, tokenizer, train_ds, val_ds, trainer_dir, tokens_per_step)
    train_out, train_s, train_cpu_s, metrics, state_dict = common.train_and_evaluate(trainer, ckpt)
    if stage.early_exit.enabled:
        trainer.dropout.remove()
    if trainer.is_world_process_zero():
        hf.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(out)
        save_run_info(out, cfg, "pretrain")
        run = common.run_record(trainer, args, ckpt, stage.seq_len, tokens_per_step, len(train_ds), len(val_ds),
                                train_s, train_cpu_s)
        summary = _summary(cfg, out, model, tokenizer, trainer, n_params, run, train_out, metrics, started)
        common.record_stage("pretrain", out, paths.results_pretrain, trainer_dir, cfg, summary, key, payload)
        log.info("pretrain: done in %.1f s, %d steps, %d tokens (%.0f tokens/s), eval loss %.4f -> %s", train_s,
                 summary["steps"], summary["train_tokens"], summary["train_tokens_per_s"],
                 summary["eval_loss"] or float("nan"), out)
    trainer.accelerator.wait_for_everyone()
    return out

