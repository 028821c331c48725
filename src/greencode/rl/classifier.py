"""CALM's learned exit classifier, the supervised rival of the RL agent.

An MLP of the agent's size (``rl.ppo.net_arch``, tanh) over the same observation, trained
on the same trajectory bank with cross-entropy to predict, for each token and early exit
point, whether that exit point's prediction agrees with the final layer's on that state
(``preds[:, k] == preds[:, E]``). Its output has the policy's shape (logit 1 = "exit, it
agrees"), so it is saved as an :class:`~greencode.rl.policy.ExitPolicy` and decodes through
the same :class:`~greencode.decoding.PolicyExit` fast path, as ``classifier@threshold``:
exit when P(agree) >= threshold.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from greencode.rl.bank import TrajectoryBank
from greencode.rl.policy import ExitPolicy, save_policy
from greencode.utils import torch_threads

log = logging.getLogger(__name__)


def _examples(bank: TrajectoryBank) -> tuple[torch.Tensor, torch.Tensor]:
    e = bank.n_exit_points
    x = torch.from_numpy(bank.obs_float32()).reshape(-1, bank.hidden_size)
    y = torch.from_numpy((bank.preds[:, :e] == bank.preds[:, e:e + 1]).reshape(-1).astype(np.int64))
    return x, y


def _accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 262144) -> dict[str, float]:
    with torch.no_grad():  # in chunks: a 400k-token bank has 2.8M examples
        p = torch.cat([torch.softmax(module(x[i:i + chunk]), -1)[:, 1] for i in range(0, len(x), chunk)])
    pred = (p >= 0.5).long()
    pos = y == 1
    return {"examples": int(len(y)), "positive_share": float(pos.float().mean()),
            "accuracy": float((pred == y).float().mean()),
            "precision_at_0.5": float((y[pred == 1] == 1).float().mean()) if bool((pred == 1).any()) else None,
            "recall_at_0.5": float((pred[pos] == 1).float().mean()) if bool(pos.any()) else None,
            "log_loss": float(nn.functional.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y.float()))}


def train_classifier(bank: TrajectoryBank, net_arch, *, metadata: dict[str, Any], epochs: int = 8,
                     batch_size: int = 512, learning_rate: float = 1e-3, seed: int = 0,
                     path: Optional[Path] = None) -> tuple[ExitPolicy, dict[str, Any]]:
    """Train on the bank's training sequences, report on its held-out ones; save to ``path``."""
    has_heldout = bool(bank.heldout.any()) and not bool(bank.heldout.all())
    train = bank.sequences(heldout=False) if has_heldout else bank
    x, y = _examples(train)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    module = ExitPolicy(bank.hidden_size, list(net_arch), "tanh", dict(metadata, kind="classifier"))
    opt = torch.optim.Adam(module.parameters(), lr=learning_rate)
    t0 = time.perf_counter()
    with torch_threads(1):
        for _ in range(int(epochs)):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(module(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    module.eval()
    report = {"train": _accuracy(module, x, y), "epochs": int(epochs), "batch_size": int(batch_size),
              "learning_rate": float(learning_rate), "net_arch": list(net_arch), "wall_time_s": time.perf_counter() - t0,
              "label": "exit point's prediction == the final layer's on the recorded state"}
    if has_heldout:
        report["heldout"] = _accuracy(module, *_examples(bank.sequences(heldout=True)))
    if path is not None:
        save_policy(module, path)
    log.info("exit classifier: %d examples, %d epochs in %.1f s; held-out accuracy %s", len(y), epochs,
             report["wall_time_s"], f"{report['heldout']['accuracy']:.3f}" if has_heldout else "n/a")
    return module, report
