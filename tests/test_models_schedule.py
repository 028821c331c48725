"""Exit schedules and LITE weights: the paper's exact numbers, and bad input."""

import pytest

from greencode.config import ConfigError
from greencode.models import exit_schedule, lite_weights, validate_exit_layers

OPT_EXITS = [3, 5, 7, 9, 11, 13, 15, 19, 23, 27]
LLAMA_EXITS = [3, 5, 7, 9, 11, 13, 17, 21, 25]


def test_paper_exit_lists():
    assert exit_schedule(32) == OPT_EXITS
    assert exit_schedule(28) == LLAMA_EXITS


def test_small_model_schedules():
    assert exit_schedule(8, first=1, stride_first_half=1, stride_second_half=2) == [1, 2, 3, 5]
    assert exit_schedule(4, first=1, stride_first_half=1, stride_second_half=1) == [1, 2]
    assert all(e < 11 for e in exit_schedule(12, 1, 2, 4))


def test_opt_geometric_weights_match_paper():
    w = lite_weights(OPT_EXITS, 32)
    expected = [0.13418, 0.12076, 0.10868, 0.09781, 0.08803, 0.07923, 0.07131, 0.07380, 0.06642, 0.05978, 0.1]
    assert [round(x, 5) for x in w] == expected
    assert sum(w) == pytest.approx(1.0)


def test_llama_geometric_weights_match_paper():
    w = lite_weights(LLAMA_EXITS, 28)
    expected = [0.14939, 0.13445, 0.12101, 0.10891, 0.09802, 0.08822, 0.07380, 0.06642, 0.05978, 0.1]
    assert [round(x, 5) for x in w] == expected


def test_uniform_and_explicit_weights():
    assert lite_weights([1, 2], 4, "uniform") == pytest.approx([1 / 3] * 3)
    assert lite_weights([1, 2], 4, [0.5, 0.3, 0.2]) == [0.5, 0.3, 0.2]
    with pytest.raises(ConfigError, match="give exactly 3 weights"):
        lite_weights([1, 2], 4, [0.5, 0.5])
    with pytest.raises(ConfigError, match="non-negative"):
        lite_weights([1, 2], 4, [0.5, -0.5, 1.0])


def test_one_sided_halves_keep_the_budget():
    w = lite_weights([0, 1], 8)  # no second-half exit: its budget moves to the first half
    assert sum(w) == pytest.approx(1.0) and w[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("exits,msg", [([], "empty"), ([5, 40], "outside"), ([31], "outside"), ([2, 2], "duplicates"),
                                       ([-1], "outside")])
def test_bad_exit_layers(exits, msg):
    with pytest.raises(ConfigError, match=msg):
        validate_exit_layers(exits, 32)


def test_schedule_bad_input():
    with pytest.raises(ConfigError):
        exit_schedule(1)
    with pytest.raises(ConfigError):
        exit_schedule(8, first=9)
