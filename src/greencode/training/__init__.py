"""Training: base pretraining of the embedded default and LITE fine-tuning, on the HF Trainer.

    base_dir = pretrain(cfg)              # runs/<name>/base_model (embedded default only)
    ft_dir = finetune(cfg, resume=False)  # runs/<name>/finetuned (+ greencode_exits.json)
    report = exit_report(cfg)             # results/<name>/finetune/exit_report.{json,csv}
    total, per_exit = lite_loss(model, input_ids, labels, attention_mask, weights)

Both stages reuse a complete output whose inputs are unchanged (``force=True`` redoes
it) and resume from their last checkpoint with ``resume=True``. Multi-GPU: the same
scripts under ``accelerate launch --config_file configs/accelerate/{ddp,fsdp,deepspeed_zero3}.yaml``.
"""

from greencode.training.lite import exit_token_stats, lite_loss


def pretrain(cfg, resume: bool = False, force: bool = False):
    """See :func:`greencode.training.pretraining.pretrain`."""
    from greencode.training.pretraining import pretrain as _pretrain

    return _pretrain(cfg, resume=resume, force=force)


def finetune(cfg, resume: bool = False, force: bool = False):
    """See :func:`greencode.training.finetuning.finetune`."""
    from greencode.training.finetuning import finetune as _finetune

    return _finetune(cfg, resume=resume, force=force)


def exit_report(cfg, base=None, finetuned=None) -> dict:
    """See :func:`greencode.training.report.exit_report`."""
    from greencode.training.report import exit_report as _exit_report

    return _exit_report(cfg, base=base, finetuned=finetuned)


__all__ = ["pretrain", "finetune", "exit_report", "lite_loss", "exit_token_stats"]
