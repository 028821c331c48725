"""Choosing candidate grids that span compute (greencode.eval.grids): the level picking, the dense grids
and the placement against the fixed exits' hull, on hand-made points."""

import pytest

from greencode.eval.grids import LEVELS, PROB_DENSE, against_hull, dense_grid, pick_levels


def test_each_level_gets_the_nearest_unused_candidate_and_unreachable_levels_say_so():
    points = {0.9: 0.97, 0.8: 0.88, 0.7: 0.79, 0.6: 0.71, 0.5: 0.64}  # compute never goes below 0.64
    got = pick_levels(points, LEVELS, tolerance=0.05)
    assert got["0.95"] == {"level": 0.95, "param": 0.9, "compute": 0.97, "reachable": True}
    assert got["0.9"]["param"] == 0.8 and got["0.8"]["param"] == 0.7 and got["0.7"]["param"] == 0.6
    assert got["0.6"]["param"] == 0.5
    assert got["0.5"]["reachable"] is False and got["0.5"]["param"] is None  # all candidates are used or too far


def test_a_candidate_is_used_once():
    got = pick_levels({0.5: 0.75}, (0.7, 0.8), tolerance=0.1)
    assert [v["param"] for v in got.values()] == [0.5, None]


def test_dense_grids():
    assert dense_grid("confidence") == list(PROB_DENSE) and dense_grid("gc") == list(PROB_DENSE)
    ent = dense_grid("entropy")
    assert 0.05 in ent and 2.5 in ent and 0.075 in ent and ent == sorted(ent)  # a midpoint between 0.05 and 0.1


def test_risk_against_the_fixed_hull():
    rows = {"fixed@1": {"compute": 0.3, "token_risk": 0.4}, "fixed@5": {"compute": 0.6, "token_risk": 0.1},
            "fixed@3": {"compute": 0.45, "token_risk": 0.35},  # above the segment fixed@1 - fixed@5: not a vertex
            "gc@0.9": {"compute": 0.8, "token_risk": 0.02}, "gc@0.5": {"compute": 0.2, "token_risk": 0.5}}
    d = against_hull(rows, ["fixed@1", "fixed@3", "fixed@5"])
    # the hull runs fixed@1 (0.3, 0.4) -> fixed@5 (0.6, 0.1) -> the full model (1.0, 0.0): at 0.8 it is 0.05
    assert d["gc@0.9"] == pytest.approx(0.02 - 0.05)
    assert d["fixed@3"] == pytest.approx(0.35 - 0.25)  # halfway between fixed@1 and fixed@5
    assert d["fixed@5"] == pytest.approx(0.0) and d["gc@0.5"] is None  # cheaper than any static point


def test_yaml_lines_name_keys_the_config_accepts():
    """A family with its own calibration key gets it; another registered controller goes under
    ``thresholds``; a family that reaches no level gets a comment, never an empty grid; the lines load."""
    import yaml

    from greencode.config import config_from_dict
    from greencode.eval.grids import _yaml_lines

    chosen = {"gc": {"0.5": {"level": 0.5, "param": 0.3}, "0.9": {"level": 0.9, "param": 0.99}},
              "entropy": {"0.5": {"level": 0.5, "param": None}},
              "cheap_confidence": {"0.5": {"level": 0.5, "param": 0.4}, "0.8": {"level": 0.8, "param": 0.7}}}
    lines = _yaml_lines(chosen)
    assert lines[0] == "  gc_thresholds: [0.99, 0.3]"
    assert lines[1].startswith("  # entropy: no candidate")
    assert lines[2] == "  thresholds: {cheap_confidence: [0.7, 0.4]}"
    section = yaml.safe_load("\n".join(["calibration:"] + lines))["calibration"]
    cfg = config_from_dict({"calibration": section})
    assert cfg.calibration.gc_thresholds == [0.99, 0.3]
    assert cfg.calibration.thresholds == {"cheap_confidence": [0.7, 0.4]}
