"""The learned decisions' AUC against the oracle label on a bank (greencode.rl.policy.decision_auc), on a
synthetic bank whose observations carry the label in a known coordinate."""

import numpy as np
import pytest
import torch
from torch import nn

from greencode.rl.bank import synthetic_bank
from greencode.rl.policy import decision_auc, decision_auc_report


class Coordinate(nn.Module):
    """logit(exit) = sign * obs[:, 0]; logit(continue) = 0."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = nn.Parameter(torch.tensor(float(sign)), requires_grad=False)

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), self.sign * x[:, 0]], dim=-1)


def test_decision_auc_sees_the_coordinate_that_carries_the_label():
    # synthetic_bank adds signal * (+1 if the exit point agrees with the final layer else -1) to obs[..., 0]
    bank = synthetic_bank(num_sequences=60, tokens_per_sequence=20, n_exit_points=4, hidden_size=8, signal=1.0,
                          seed=2)
    e = bank.n_exit_points
    agree = bank.preds[:, :e] == bank.preds[:, e:e + 1]
    right = decision_auc(Coordinate(1.0), bank, resamples=50)
    wrong = decision_auc(Coordinate(-1.0), bank, resamples=50)
    # two unit normals 2 x 1 apart: AUC = Phi(2 / sqrt 2) = 0.921 (1,200 tokens: a standard error near 0.008);
    # the flipped sign gives 1 minus that
    for k in range(e):
        if 0 < agree[:, k].mean() < 1:
            assert 0.89 < right["auc_per_exit"][k] < 0.95
            assert wrong["auc_per_exit"][k] == pytest.approx(1 - right["auc_per_exit"][k])
            lo, hi = right["auc_per_exit_ci"][k]
            assert lo <= right["auc_per_exit"][k] <= hi
    assert right["positive_share_per_exit"] == pytest.approx(list(agree.mean(axis=0)))
    report = decision_auc_report({"a": right, "b": wrong}, reference="b")
    assert "mean_draws" not in report["a"] and report["a"]["auc_mean_minus_b"]["excludes_zero"]
    assert report["a"]["auc_mean_minus_b"]["diff"] == pytest.approx(right["auc_mean"] - wrong["auc_mean"])


def test_a_constant_policy_ranks_nothing():
    bank = synthetic_bank(num_sequences=20, tokens_per_sequence=10, n_exit_points=3, hidden_size=4, seed=0)
    flat = decision_auc(Coordinate(0.0), bank, resamples=20)
    assert all(a == 0.5 for a in flat["auc_per_exit"] if a is not None)
    assert np.isclose(flat["auc_mean"], 0.5)
