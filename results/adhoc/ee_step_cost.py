"""Ad-hoc: seconds per training step of the base shape (configs/base.yaml: 12 layers, hidden 256, vocab 8192,
batch 16 x 256, bf16 autocast, forward + backward + AdamW) for the plain loss and early-exit loss variants.
Feeds results/LOG.md 2026-12-06. Run from the repository root: python results/adhoc/ee_step_cost.py"""
import time, torch, sys
from greencode.config import load_config
from greencode.models import EarlyExitModel
from greencode.training import early_exit_loss as eel
torch.set_num_threads(2)
cfg = load_config("configs/base.yaml")
m = EarlyExitModel.from_config(cfg.model, vocab_size=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2)
m.hf.train()
opt = torch.optim.AdamW(m.hf.parameters(), lr=1e-4)
x = torch.randint(0, 8192, (16, 256))
def run(name, fn, n=3):
    ts=[]
    for i in range(n+1):
        t=time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn()
        loss.backward(); opt.step(); opt.zero_grad()
        ts.append(time.perf_counter()-t)
    print(name, [round(t,2) for t in ts[1:]], flush=True)
scales = eel.loss_scales(m.exit_layers, "one")
run("plain", lambda: m.hf(input_ids=x, labels=x).loss)
run("ee_all", lambda: eel.early_exit_loss(m, x, active=range(7), scales=scales)[0])
run("ee_rot", lambda: eel.early_exit_loss(m, x, active=[0,2,4,6], scales=scales)[0])
run("ee_all_kd", lambda: eel.early_exit_loss(m, x, active=range(7), scales=scales, distill=0.5)[0])
d = eel.LayerDropout(eel.layer_dropout_probs(12, 0.1), 0).install(list(m.layers))
run("ee_all_drop", lambda: eel.early_exit_loss(m, x, active=range(7), scales=scales)[0])
d.remove()
g=torch.Generator().manual_seed(0)
run("ee_all_f25", lambda: eel.early_exit_loss(m, x, active=range(7), scales=scales, token_fraction=0.25, generator=g)[0])
run("ee_all_f25_kd", lambda: eel.early_exit_loss(m, x, active=range(7), scales=scales, token_fraction=0.25, distill=0.5, generator=g)[0])
run("ee_rot_f25_kd", lambda: eel.early_exit_loss(m, x, active=[0,2,4,6], scales=scales, token_fraction=0.25, distill=0.5, generator=g)[0])
d = eel.LayerDropout(eel.layer_dropout_probs(12, 0.1), 0).install(list(m.layers))
run("ee_all_f25_kd_drop", lambda: eel.early_exit_loss(m, x, active=range(7), scales=scales, token_fraction=0.25, distill=0.5, generator=g)[0])
