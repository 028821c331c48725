"""The compiled layer step (decoding.compile): the same tokens as the eager loop, on CPU, for
every controller, in a batch with rows joining, across a buffer doubling; one graph for all
layers; a clean fallback to eager where compiling fails."""

import pytest
import torch
from conftest import VOCAB, TinyPolicy, tiny_model
from greencode.config import ConfigError, load_config
from greencode.decoding import ConfidenceExit, FixedExit, NeverExit, PolicyExit, generate, generate_lossless
from greencode.decoding.compiled import CompiledSteps, compile_info, use_compiled_steps
from greencode.decoding.generate import DecodeBatch, Row


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _controllers(model, policy):
    return {"never": NeverExit(), "fixed": FixedExit(model.exit_layers[0]), "confidence": ConfidenceExit(0.02),
            "policy": PolicyExit(policy, 0.45)}


def test_compiled_step_equals_eager_for_every_controller(family):
    """Batch of one: tokens, exits and counted work equal the eager loop's; the generation
    crosses the 64-position buffer boundary (a reallocation and a new shape)."""
    model = tiny_model(family)
    policy = TinyPolicy(model.hidden_size)
    prompt = _prompts(1, (58,))[0]
    eager = {name: generate(model, prompt, c, 12) for name, c in _controllers(model, policy).items()}
    steps = use_compiled_steps(model, "default")
    for name, c in _controllers(model, policy).items():
        got = generate(model, prompt, c, 12)
        assert got.tokens == eager[name].tokens, name
        assert got.exit_layers == eager[name].exit_layers, name
        assert got.counters["layers_run"] == eager[name].counters["layers_run"], name
    assert steps.active and steps.fallback is None and steps.compiled_calls > 0
    assert any(x != model.final_layer for x in eager["policy"].exit_layers[1:])  # the policy exits somewhere


def test_compiled_batch_with_rows_joining_equals_alone(family):
    """Rows of several lengths and controllers, one joining mid-flight, each equal to its eager
    batch-of-one run (rows that exit are carried through the compiled layers, their K/V replaced
    by the propagated ones)."""
    model = tiny_model(family)
    policy = TinyPolicy(model.hidden_size)
    names = ["fixed", "never", "policy", "confidence"]
    prompts = _prompts(7, (9, 17, 5, 12))
    lengths = (7, 5, 8, 6)
    alone = [generate(model, p, _controllers(model, policy)[n], k) for p, n, k in zip(prompts, names, lengths)]
    use_compiled_steps(model, "default")
    batch = DecodeBatch(model)
    rows = [Row(controller=_controllers(model, policy)[n], max_new_tokens=k) for n, k in zip(names, lengths)]
    batch.add(rows[:3], prompts[:3])
    batch.step()
    batch.add(rows[3:], prompts[3:])
    while batch.rows:
        batch.step()
    for a, row in zip(alone, rows):
        res = batch.result(row)
        assert res.tokens == a.tokens and res.exit_layers == a.exit_layers
    assert model.layer_step.compiled_calls > 0 and model.layer_step.fallback is None


def test_layers_between_decision_points_run_as_one_graph():
    """A segment of layers between two points where the controller checks is one compiled call,
    and segments of the same length share one graph (the layers are arguments)."""
    counters = pytest.importorskip("torch._dynamo.utils").counters
    model = tiny_model("llama", num_layers=4, exit_layers=(1,), hidden_size=48)  # a shape no other test compiles
    use_compiled_steps(model, "default")
    before = counters["stats"]["unique_graphs"]
    prompt = _prompts(2, (10,))[0]
    res = generate(model, prompt, ConfidenceExit(1.0), 6)  # checks at layer 1, never exits: layers 0-1, 2-3
    assert set(res.exit_layers) == {model.final_layer}
    assert model.layer_step.compiled_calls == 5 * 2  # 5 decode steps in one 64-position buffer
    assert counters["stats"]["unique_graphs"] - before == 1
    generate(model, prompt, NeverExit(), 6)  # no checks: all four layers in one call (a second graph)
    assert model.layer_step.compiled_calls == 5 * 2 + 5
    assert counters["stats"]["unique_graphs"] - before == 2


def test_sampling_and_lossless_with_compiled_steps():
    model = tiny_model("opt")
    prompt = _prompts(3, (11,))[0]
    kw = dict(do_sample=True, temperature=1.2, top_k=30, seed=5)
    sampled = generate(model, prompt, FixedExit(model.exit_layers[0]), 8, **kw).tokens
    full = generate(model, prompt, NeverExit(), 10).tokens
    use_compiled_steps(model, "default")
    assert generate(model, prompt, FixedExit(model.exit_layers[0]), 8, **kw).tokens == sampled
    lossless = generate_lossless(model, prompt, FixedExit(model.exit_layers[0]), 10, k_max=3)
    assert lossless.tokens == full


def test_compile_failure_falls_back_to_eager(caplog):
    """A backend that cannot compile (no compiler, no Triton): one warning, the reason recorded,
    and the eager step gives the same tokens."""
    model = tiny_model("llama")
    prompt = _prompts(4, (8,))[0]
    eager = generate(model, prompt, FixedExit(model.exit_layers[0]), 6).tokens
    steps = use_compiled_steps(model, "default")

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    steps._fn = broken
    with caplog.at_level("WARNING"):
        got = generate(model, prompt, FixedExit(model.exit_layers[0]), 6).tokens
    assert got == eager
    info = compile_info(model)
    assert info["active"] is False and "No working C++ compiler" in info["fallback"]
    assert sum("decoding eagerly" in r.message for r in caplog.records) == 1


def test_graph_replay_modes_mark_each_call_and_copy_its_output():
    """Under CUDA graphs (reduce-overhead, max-autotune) each compiled call starts a new step and
    its output is copied out of the graph pool; exercised on CPU with the hook stubbed."""
    model = tiny_model("llama")
    prompt = _prompts(6, (9,))[0]
    eager = generate(model, prompt, NeverExit(), 5).tokens
    steps = use_compiled_steps(model, "default")
    marks = []
    steps._step_begin = lambda: marks.append(len(marks))
    assert generate(model, prompt, NeverExit(), 5).tokens == eager
    assert len(marks) == steps.compiled_calls == 4  # 4 decode steps, the whole stack in one call each


def test_compile_modes_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="decoding.compile"):
        load_config("configs/smoke.yaml", ["decoding.compile=fast"])
    with pytest.raises(ConfigError, match="choose one of"):
        CompiledSteps("fast")
    model = tiny_model("llama")
    assert use_compiled_steps(model, "off") is None and compile_info(model) == {"mode": "off", "active": False}


def test_layer_step_is_an_option_of_the_loop():
    """The compiled step passed to the loop (``layer_step=``) runs without touching the model; None
    runs the eager step even where the model's default is compiled. Same tokens either way."""
    model = tiny_model("llama")
    prompt = _prompts(8, (10,))[0]
    ctrl = lambda: FixedExit(model.exit_layers[0])  # noqa: E731
    eager = generate(model, prompt, ctrl(), 6)
    steps = CompiledSteps("default")
    got = generate(model, prompt, ctrl(), 6, layer_step=steps)
    assert got.tokens == eager.tokens and got.exit_layers == eager.exit_layers
    assert steps.compiled_calls > 0 and getattr(model, "layer_step", None) is None
    default = use_compiled_steps(model, "default")
    again = generate(model, prompt, ctrl(), 6, layer_step=None)
    assert again.tokens == eager.tokens and default.compiled_calls == 0
    batch = DecodeBatch(model, layer_step=steps)
    assert batch.compiled is steps and DecodeBatch(model).compiled is default
