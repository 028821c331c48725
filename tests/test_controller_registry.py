"""One registry of controllers: a toy controller registered here, in the test only, is evaluated,
calibrated and served with no other edit to the library; the built-in entries keep the methods,
grids, candidate orders and errors they had."""

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import greencode.data
from greencode.config import ConfigError, load_config
from greencode.decoding import ExitController, register_controller
from greencode.decoding import registry
from greencode.eval.methods import expand_methods, families, parse_method_name
from greencode.utils import read_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_eval_evaluator import SMOKE, fake_samples, make_run  # noqa: E402  (the smoke run on disk)


class DepthCap(ExitController):
    """Exit at the first exit point at or past this share of the model's depth."""

    name = "depth_cap"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self._layers = 1

    def check_layers(self, model):
        self._layers = model.num_layers
        return frozenset(model.exit_layers)

    def should_exit(self, layer, hidden, normed, logits) -> bool:
        return (layer + 1) / self._layers >= self.threshold


@pytest.fixture
def depth_cap():
    info = register_controller("depth_cap", DepthCap, param="threshold", grid=(0.5, 0.75),
                               calibration_grid=(0.5, 1.0, 0.75), cost="none: compares the layer index")
    yield info
    registry.unregister_controller("depth_cap")
    assert "depth_cap" not in families()


@pytest.fixture
def samples(monkeypatch):
    monkeypatch.setattr(greencode.data, "samples_for_config",
                        lambda cfg, tok: fake_samples(tok, cfg.eval.num_samples), raising=False)


def test_a_registered_toy_controller_is_evaluated_calibrated_and_served(tmp_path, depth_cap, samples):
    from greencode.eval import evaluate
    from greencode.eval.calibration import calibrate
    from greencode.serve import create_app

    # the config knows it: a method family, its grid (registry default), its calibration and serving
    cfg, paths, _ = make_run(tmp_path, "eval.methods=[full,depth_cap]", "calibration.families=[depth_cap]",
                             "calibration.criteria=[sequence,token]", "calibration.num_samples=4",
                             "serve.controller=depth_cap", policy=False)
    assert families().index("depth_cap") == families().index("gc") + 1  # after the built-ins, before lossless
    assert [s.id for s in expand_methods(["depth_cap"], cfg.eval, [1, 2], 3)] == ["depth_cap@0.5", "depth_cap@0.75"]

    # evaluated: exits where it says (4 layers, exit points 1 and 2: 0.5 -> layer 1, 0.75 -> layer 2)
    out = evaluate(cfg)
    for mid, layer in (("depth_cap@0.5", 1), ("depth_cap@0.75", 2)):
        records = read_json(out / "methods" / f"{mid}.json")["records"]
        assert len(records) == 3 and all(r["new_tokens"] > 1 for r in records)
        assert all(e == layer for r in records for e in r["exit_layers"][1:]), mid  # [0]: the prefill's token
        assert all(r["cost"]["macs_done"] < r["cost"]["macs_full"] for r in records)
    assert read_json(out / "methods" / "depth_cap@0.5.json")["method"]["description"] == DepthCap.__doc__

    # calibrated: candidates from its calibration grid, most conservative (highest) first; at n = 4 and a 50%
    # target, the candidate that never exits (1.0: no exit point reaches the final layer) is certified
    # ((1 - 0.5)^4 = 0.0625 <= delta 0.1)
    cal = read_json(calibrate(cfg))
    fam = cal["criteria"]["sequence"]["families"]["depth_cap"]
    assert fam["order"] == ["depth_cap@1.0", "depth_cap@0.75", "depth_cap@0.5"]
    assert "depth_cap@1.0" in fam["targets"]["0.5"]["certified"]
    assert set(cal["criteria"]["token"]["families"]["depth_cap"]["order"]) == set(fam["order"])
    chosen = fam["targets"]["0.5"]["chosen_param"]

    # served: the run's endpoint builds it for a request's threshold and for a calibrated target
    with TestClient(create_app(cfg)) as c:
        health = c.get("/health").json()
        assert health["controller"] == "depth_cap" and health["serving"] == "early-exit (depth_cap)"
        s = c.post("/api/generate", json={"inputs": "def f(x):\n    return",
                                          "options": {"num_predict": 4, "RL_agent_thresh": 0.5}}).json()["greencode"]
        assert s["controller"] == "depth_cap" and s["threshold"] == 0.5
        assert s["exit_layers"][1:] and all(e == 1 for e in s["exit_layers"][1:])
        t = c.post("/v1/completions", json={"prompt": "def f(x):\n    return", "max_tokens": 3,
                                            "max_disagreement": 0.5}).json()["greencode"]
        assert t["threshold"] == chosen and t["max_disagreement"] == 0.5


def test_config_validates_names_and_grids_through_the_registry(tmp_path, depth_cap):
    ok = load_config(SMOKE, ["eval.methods=[full,depth_cap]", "eval.thresholds.depth_cap=[0.25,1.0]",
                             "calibration.thresholds.gc=[0.99,0.5]"])
    assert ok.eval.thresholds == {"depth_cap": [0.25, 1.0]}
    assert [s.id for s in expand_methods(["depth_cap"], ok.eval, [1, 2], 3)] == ["depth_cap@0.25", "depth_cap@1.0"]
    assert registry.threshold_grid(ok.calibration, "gc", calibration=True) == ("thresholds.gc", [0.99, 0.5])
    for override, needle in (("eval.thresholds.depth_cap=[1.5]", "eval.thresholds.depth_cap=1.5 is out of range"),
                             ("eval.thresholds.magic=[0.5]", "not a registered threshold controller"),
                             ("eval.thresholds.fixed=[1]", "not a registered threshold controller"),
                             ("calibration.families=[full]", "calibration.families has 'full'"),
                             ("calibration.saturation_thresholds=[2.0]", "calibration.saturation_thresholds=2.0"),
                             ("serve.controller=magic", "unknown controller 'magic'"),
                             ("serve.controller=fixed", "takes a layer")):
        with pytest.raises(ConfigError, match=needle):
            load_config(SMOKE, [override])
    with pytest.raises(ValueError, match="registered already"):
        register_controller("depth_cap", DepthCap, param="threshold")
    registry.unregister_controller("depth_cap")
    with pytest.raises(ConfigError, match="unknown method 'depth_cap@0.5'"):
        parse_method_name("depth_cap@0.5")
    with pytest.raises(ConfigError, match="unknown method 'depth_cap'"):
        load_config(SMOKE, ["eval.methods=[depth_cap]"])


def test_builtin_entries_keep_their_methods_grids_and_order():
    assert families() == ("base", "full_hf", "full", "fixed", "confidence", "entropy", "saturation",
                          "cheap_confidence", "classifier", "oracle", "gc", "gc_lossless", "layerskip", "hf_early_exit")
    assert registry.lossless_methods() == {"gc_lossless": "gc", "layerskip": "fixed"}
    cfg = load_config(SMOKE)
    from greencode.config import CalibrationConfig, EvalConfig

    # the named config keys' defaults are the registry's defaults
    for name in ("confidence", "entropy", "saturation", "classifier", "gc"):
        info = registry.get_controller(name)
        assert list(info.grid) == getattr(EvalConfig(), f"{name}_thresholds"), name
        assert list(info.calibration_grid) == getattr(CalibrationConfig(), f"{name}_thresholds"), name
    needs = {c.name: set(c.needs) for c in registry.controllers()}
    assert needs["confidence"] == needs["entropy"] == {"logits"} and needs["gc"] == {"policy"}
    assert needs["classifier"] == {"classifier"} and needs["saturation"] == needs["fixed"] == set()
    assert needs["cheap_confidence"] == set()  # the first exit point's head: ExitController.logits_at, not needs
    assert all(c.cost for c in registry.controllers())
    # a controller without what it needs is not built
    with pytest.raises(ConfigError, match="needs the run's policy"):
        registry.build_controller("gc", 0.9)
    assert registry.build_controller("fixed", 2).describe() == {"controller": "fixed", "layer": 2}
    assert registry.threshold_grid(cfg.eval, "gc") == ("gc_thresholds", [0.5, 0.9])
