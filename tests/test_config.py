"""Every shipped YAML validates; bad keys and values give errors naming the key."""

from pathlib import Path

import pytest

from greencode.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
CONFIGS = [p for p in CONFIGS if "accelerate" not in p.parts]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "default.yaml", "opt-2.7b_java.yaml", "opt-2.7b_python.yaml",
            "llama-3.2-3b_java.yaml", "llama-3.2-3b_python.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_and_documents_its_command(path):
    cfg = load_config(path)
    assert cfg.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each YAML starts with a comment giving the command that runs it"
    assert "python scripts/" in path.read_text().split("\nname:")[0] or "make demo" in first + path.read_text()[:400]


def test_paper_exit_points_resolve():
    from greencode.models import resolve_exit_layers

    opt = load_config("configs/paper/opt-2.7b_java.yaml")
    assert resolve_exit_layers(32, opt.model.exit_layers, opt.model.exit_schedule) == [3, 5, 7, 9, 11, 13, 15, 19, 23, 27]
    llama = load_config("configs/paper/llama-3.2-3b_python.yaml")
    assert resolve_exit_layers(28, llama.model.exit_layers, llama.model.exit_schedule) == [3, 5, 7, 9, 11, 13, 17, 21, 25]
    assert llama.rl.reward.beta == 0.5 and opt.rl.reward.beta == 1.0


def test_default_has_at_least_four_exit_points():
    from greencode.models import resolve_exit_layers

    cfg = load_config("configs/default.yaml")
    assert len(resolve_exit_layers(cfg.model.num_layers, cfg.model.exit_layers, cfg.model.exit_schedule)) >= 4


def test_overrides_apply_with_types():
    cfg = load_config("configs/smoke.yaml", ["model.num_layers=6", "eval.gc_thresholds=[0.7,0.8]", "data.max_files=null"])
    assert cfg.model.num_layers == 6 and cfg.eval.gc_thresholds == [0.7, 0.8] and cfg.data.max_files is None


def test_yaml_boolean_words_become_the_choice_they_spell():
    """YAML 1.1 reads off / no as false: a choice field gets its word back instead of a type error."""
    cfg = load_config("configs/smoke.yaml", ["decoding.compile=off", "finetune.mixed_precision=no"])
    assert cfg.decoding.compile == "off" and cfg.finetune.mixed_precision == "no"
    with pytest.raises(ConfigError, match="choose one of"):
        load_config("configs/smoke.yaml", ["decoding.compile=yes"])  # no choice spells true


@pytest.mark.parametrize("override,needle", [
    ("model.hiden_size=3", "did you mean 'hidden_size'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("model.family=gpt2", "choose one of: llama, opt"),
    ("model.num_layers=abc", "model.num_layers='abc' must be an integer"),
    ("eval.gc_thresholds=[0.5,1.5]", "eval.gc_thresholds=1.5 is out of range"),
    ("serve.default_threshold=-0.1", "serve.default_threshold"),
    ("rl.reward.beta=0.1", "must be <= rl.reward.beta"),
    ("model.exit_layers=[1,9]", "outside [0, 2]"),
    ("eval.methods=[full,magic]", "unknown method 'magic'"),
    ("finetune.weights=triangular", "use 'geometric', 'uniform' or a list"),
    ("hardware.device=tpu", "is not a device"),
    ("model", "must look like key.subkey=value"),
    ("figures.formats=[png,jpg]", "figures.formats has 'jpg'; choose from: png, pdf, svg"),
    ("figures.formats=[]", "figures.formats is empty"),
    ("figures.formats=[pdf,pdf]", "names a format twice"),
    ("figures.dpi=0", "figures.dpi=0 is out of range"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/smoke.yaml", [override])
    assert needle in str(e.value)


def test_missing_config_file_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml' is not UTF-8 text \(byte b'\\xe9' at offset 9\); save it as UTF-8"):
        load_config(latin)


def test_derived_directories():
    cfg = config_from_dict({"name": "x"})
    assert (cfg.run_dir, cfg.results_dir, cfg.figures_dir) == ("runs/x", "results/x", "figures/x")
