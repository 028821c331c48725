"""The pipeline's stage keys: a setting that changes what a stage writes reruns it; the simulated bank's
number of processes (the same bank bit for bit) does not."""

from greencode.config import load_config
from greencode.pipeline import STAGES, stage_key


def _keys(*overrides):
    cfg = load_config("configs/default.yaml", list(overrides))
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.name] = stage_key(cfg, stage, keys)
    return keys


def test_the_simulated_banks_processes_leave_every_key_alone_and_other_settings_do_not():
    base = _keys("rl.bank.workers=1")
    assert _keys("rl.bank.workers=2") == base
    # a setting of the same section that changes the bank reruns it and everything after it
    changed = _keys("rl.bank.workers=1", "rl.bank.decision_tokens=1000")
    assert changed["bank"] != base["bank"] and changed["agent"] != base["agent"]
    assert changed["calibrate"] != base["calibrate"] and changed["finetune"] == base["finetune"]
    # a decoding bank's processes are keyed as before (their threads may change its states' last bits)
    dec = _keys("rl.bank.source=decode", "rl.bank.workers=1")
    assert _keys("rl.bank.source=decode", "rl.bank.workers=2")["bank"] != dec["bank"]
