"""Base pretraining of the embedded default: a small Llama- or OPT-architecture model of the
configured shape, from a random init, standard causal-LM loss on the packed corpus, on the
HF Trainer. The result is a normal HF model directory plus the tokenizer (the paper's
"base model"); no exit file, so the fine-tuning stage takes its exits from the config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from greencode.config import ConfigError
from greencode.paths import RunPaths
from greencode.training import common
from greencode.utils import set_seed, setup_torch, write_json

log = logging.getLogger(__name__)

_SHAPE_KEYS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
               "max_position_embeddings", "rope_theta", "tie_word_embeddings", "attn_implementation")


def pretrain_key(cfg) -> tuple[str, dict]:
    model = cfg.section_dict("model")["model"]
    payload = {"stage": "pretrain", "model": {k: model[k] for k in _SHAPE_KEYS},
               "pretrain": cfg.section_dict("pretrain")["pretrain"], "seed": cfg.seed, "dtype": cfg.hardware.dtype,
               "data": common.data_fingerprint(cfg)}
    return common.make_key(payload), payload


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
    from greencode.data import load_tokenizer, prepare_data
    from greencode.models import EarlyExitModel
    from greencode.training.data import build_datasets

    t_start, c_start = time.perf_counter(), time.process_time()
    paths = RunPaths.from_config(cfg)
    out = paths.base_model
    stage = cfg.pretrain
    trainer_dir = out / common.TRAINER_DIR
    setup_torch(cfg.hardware)
    args = common.training_arguments(cfg, stage, trainer_dir)
    with args.main_process_first(local=False, desc="data"):
        prepare_data(cfg)
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
    callbacks = common.log_callbacks(trainer_dir, tokens_per_step)
    from transformers import default_data_collator

    trainer = common.GreenTrainer(model=hf, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                  processing_class=tokenizer, data_collator=default_data_collator, callbacks=callbacks)
    train_out, train_s, train_cpu_s, metrics, state_dict = common.train_and_evaluate(trainer, ckpt)
    if trainer.is_world_process_zero():
        from greencode.cli import save_run_info

        hf.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(out)
        save_run_info(out, cfg, "pretrain")
        steps = trainer.state.global_step
        summary = {
            "stage": "pretrain", "output_dir": str(out), "family": model.family, "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "vocab_size": len(tokenizer), "num_parameters": n_params,
            "steps": steps, "resumed_from": ckpt, "seq_len": stage.seq_len, "tokens_per_step": tokens_per_step,
            "train_tokens": steps * tokens_per_step, "train_chunks_available": len(train_ds),
            "eval_tokens": len(val_ds) * stage.seq_len, "world_size": args.world_size,
            "train_runtime_s": round(train_s, 3), "train_cpu_time_s": round(train_cpu_s, 3),
            "train_tokens_per_s": round((steps - common.checkpoint_step(ckpt)) * tokens_per_step / max(train_s, 1e-9), 1),
            "final_train_loss": common.last_train_loss(trainer), "train_loss_mean": train_out.training_loss,
            "eval_loss": metrics.get("eval_loss"), "eval_perplexity": common.perplexity(metrics.get("eval_loss")),
            "stage_time_s": round(time.perf_counter() - t_start, 3),
            "stage_cpu_time_s": round(time.process_time() - c_start, 3),
        }
        common.write_stage_results(paths.results_pretrain, trainer_dir, cfg, summary)
        write_json(out / common.STAGE_FILE, {"stage": "pretrain", "key": key, "complete": True,
                                             "payload": payload, "summary": summary})
        log.info("pretrain: done in %.1f s, %d steps, %d tokens (%.0f tokens/s), eval loss %.4f -> %s", train_s, steps,
                 summary["train_tokens"], summary["train_tokens_per_s"],
                 summary["eval_loss"] or float("nan"), out)
    trainer.accelerator.wait_for_everyone()
    return out

