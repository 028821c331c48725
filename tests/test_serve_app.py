"""The endpoint in-process (app factory with injected objects): API key, queue refusal, timeouts,
a run without a policy, and the engine's prompt handling (FIM, CodeXGLUE text, truncation,
streaming pieces)."""

import asyncio
import dataclasses
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from greencode.config import ConfigError, load_config
from greencode.serve import create_app, load_run, serve
from greencode.serve.demo import build_demo_run
from greencode.serve.engine import Engine, strip_fim
from greencode.utils import REPO_ROOT

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
BODY = {"inputs": "def f(x):\n    return", "options": {"num_predict": 4, "RL_agent_thresh": 0.5}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config(SMOKE, ["hardware.num_threads=1"])
    root = build_demo_run(cfg, tmp_path_factory.mktemp("serve_app_run"), p_exit=0.7)
    return cfg, load_run(cfg, root)


def _cfg(cfg, **serve):
    return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, **serve))


def _app(run, policy=True, **serve):
    cfg, r = run
    return create_app(_cfg(cfg, **serve), model=r.model, tokenizer=r.tokenizer, policy=r.policy if policy else None)


def test_api_key_guards_everything_but_health(run, monkeypatch):
    monkeypatch.delenv("GREENCODE_API_KEY", raising=False)
    with TestClient(_app(run, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200 and c.get("/health").json()["auth_required"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/api/generate", json=BODY, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.json()["error"]
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/models").status_code == 401
        for path in ("/", "/openapi.json", "/docs", "/redoc"):  # docs and schema too (docs are off with a key)
            assert c.get(path).status_code in (401, 404), path
            assert c.get(path).headers["content-type"].startswith("application/json"), path
        assert c.get("/openapi.json").status_code == 401
        schema = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
        assert c.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        ok = c.post("/api/generate", json=BODY, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["generated_text"] is not None
    monkeypatch.setenv("GREENCODE_API_KEY", "from-env")
    with TestClient(_app(run)) as c:
        assert c.post("/api/generate", json=BODY).status_code == 401
        assert c.post("/api/generate", json=BODY, headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_non_loopback_bind_needs_a_key(run, monkeypatch):
    monkeypatch.delenv("GREENCODE_API_KEY", raising=False)
    cfg, _ = run
    with pytest.raises(ConfigError, match="API key"):
        serve(cfg, host="0.0.0.0", port=0)


def _slow(engine, seconds):
    real = engine.generate_fn

    def slow(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)

    return slow


def test_full_queue_answers_503_then_recovers(run):
    app = _app(run, queue_size=1)
    engine = app.state.engine
    engine.generate_fn = _slow(engine, 0.6)

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/api/generate", json=BODY) for _ in range(6)])

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert app.state.scheduler.in_flight == 0
    engine.generate_fn = _slow(engine, 0.0)
    with TestClient(app) as c:
        assert c.post("/api/generate", json=BODY).status_code == 200
        assert 'greencode_rejected_total{reason="busy"}' in c.get("/metrics").text


def test_timeout_is_504_and_frees_the_worker(run):
    app = _app(run, request_timeout_s=0.2)
    engine = app.state.engine
    with TestClient(app) as c:
        engine.generate_fn = _slow(engine, 1.0)
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while app.state.scheduler.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.scheduler.in_flight == 0
        engine.generate_fn = _slow(engine, 0.0)
        app.state.scheduler.timeout_s = 60.0  # a loaded CI machine may need more than 0.2 s for real work
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_health_shows_no_absolute_paths(run):
    cfg, r = run
    engine = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding,
                    run_root=r.root, notes=[f"no exit policy at {r.root}/agent/policy.pt: serving the full model"])
    with TestClient(create_app(cfg, engine=engine)) as c:
        h = c.get("/health").json()
        assert h["run_dir"] == r.root.name and str(r.root) not in str(h)
        assert h["notes"] == ["no exit policy at <run_dir>/agent/policy.pt: serving the full model"]


def test_openai_options_that_are_not_supported_are_refused(run):
    with TestClient(_app(run)) as c:
        body = {"prompt": "def f(x):\n    return", "max_tokens": 3}
        assert c.post("/v1/completions", json=body).status_code == 200
        for extra, word in (({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs")):
            r2 = c.post("/v1/completions", json={**body, **extra})
            assert r2.status_code == 422 and word in r2.json()["error"]["message"], r2.text
        assert c.post("/v1/completions", json={**body, "best_of": 1}).status_code == 200


def test_run_without_policy_serves_the_full_model(run):
    with TestClient(_app(run, policy=False)) as c:
        h = c.get("/health").json()
        assert h["policy_loaded"] is False and "full model" in h["serving"]
        assert c.post("/api/show", json={"model": "greencode"}).json()["model_info"]["greencode.policy_loaded"] is False
        s = c.post("/api/generate", json=BODY).json()["greencode"]
        assert s["controller"] == "full_model_no_policy" and all(e == 3 for e in s["exit_layers"])


def test_fim_prompts_keep_the_code_before_the_cursor():
    assert strip_fim("<fim_prefix>def f():\n    <fim_suffix>\n\nx = 1<fim_middle>") == ("def f():\n    ", "starcoder")
    assert strip_fim("<PRE> a = [<SUF>]\n <MID>") == ("a = [", "codellama")
    assert strip_fim("plain <fim_prefix> text") == ("plain <fim_prefix> text", None)


def test_engine_prompt_text_truncation_and_pieces(run):
    from greencode.data.tokenizer import encode_context

    cfg, r = run
    eng = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding)
    assert eng.prompt_format == "codexglue"
    text, note = eng.to_model_text("def f(x):\n    return 'hi' + 2\n    ")
    assert note is None and text.startswith("def f ( x ) : <EOL> return") and text.endswith("<EOL>")
    assert "<STR_LIT>" in text and "<NUM_LIT>" in text  # data.literal_mode: normalized, as in training
    assert eng.to_editor_text(" x <EOL> return y") == " x\nreturn y"
    assert eng.model_stops(["\n", "\ndef", " "]) == ["<EOL>", "<EOL> def"]

    # left truncation keeps bos and the newest tokens, exactly as the project's encode_context does
    long_prompt = "\n".join(f"value_{i} = compute(value_{i - 1}, {i})" for i in range(1, 400))
    ids, info = eng.encode(long_prompt, max_new_tokens=12)
    model_text, _ = eng.to_model_text(long_prompt)
    assert ids == encode_context(r.tokenizer, model_text, max_tokens=512 - 12)
    assert info["prompt_truncated"] and ids[0] == r.tokenizer.bos_token_id and len(ids) == 500
    huge = "old = stuff(1, 2)\n" * 60000 + long_prompt  # ~1 MB: the cheap tail path must agree with the whole
    h_ids, h_info = eng.encode(huge, max_new_tokens=12)
    assert h_ids == ids and h_info["prompt_truncated"] and h_info["prompt_tokens_dropped"] is None
    assert eng.encode("", max_new_tokens=4)[0] == [r.tokenizer.bos_token_id]

    tokens = r.tokenizer.encode("for é in range(3): <EOL> print ( 'ü' )", add_special_tokens=False)
    full = eng.to_editor_text(r.tokenizer.decode(tokens, skip_special_tokens=True))
    pieces = eng.pieces(tokens, full)
    assert "".join(pieces) == full and "\ufffd" not in "".join(pieces)


def test_deadline_stops_the_decoding_loop(run):
    """A request past its deadline stops between tokens (the model is freed), it does not
    run to max_new_tokens in the background."""
    from greencode.serve.engine import GenRequest

    engine = _app(run).state.engine
    gen = GenRequest(prompt="def f(x):\n    return", max_new_tokens=12, threshold=1.0)
    full = engine.complete(gen)
    assert full.finish_reason in ("length", "eos", "stop")
    late = engine.complete(gen, deadline=time.perf_counter() - 1.0)
    assert late.finish_reason == "cancelled" and len(late.tokens) == 1


CAL = {"targets": [0.02, 0.1], "families": {"gc": {"targets": {
    "0.02": {"target": 0.02, "chosen": "gc@0.9", "chosen_param": 0.9},
    "0.1": {"target": 0.1, "chosen": "gc@0.5", "chosen_param": 0.5}}}}}


def test_max_disagreement_serves_the_calibrated_threshold(run):
    """The demo policy exits at the first exit layer when threshold <= 0.7: a 5% target maps to
    the 2% calibration (threshold 0.9, full depth), a 10% target to threshold 0.5 (exits)."""
    cfg, r = run
    engine = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding, calibration=CAL)
    with TestClient(create_app(cfg, engine=engine)) as c:
        assert c.get("/health").json()["calibrated_targets"] == [0.02, 0.1]

        def ask(options):
            return c.post("/api/generate", json={"inputs": "def f(x):\n    return",
                                                 "parameters": {"max_new_tokens": 4, "details": True, **options}})

        strict = ask({"max_disagreement": 0.05})
        assert strict.status_code == 200, strict.text
        stats = strict.json()["greencode"]
        assert stats["threshold"] == 0.9 and stats["max_disagreement"] == 0.05
        assert set(stats["exit_layers"][1:]) == {r.model.final_layer}
        loose = ask({"max_disagreement": 0.1}).json()["greencode"]
        assert loose["threshold"] == 0.5 and set(loose["exit_layers"][1:]) == {r.model.exit_layers[0]}
        both = ask({"max_disagreement": 0.1, "exit_threshold": 0.5})
        assert both.status_code == 422 and "not both" in both.json()["error"]
        low = ask({"max_disagreement": 0.001})
        assert low.status_code == 422 and "smallest calibrated target" in low.json()["error"]
        assert ask({"max_disagreement": 0}).status_code == 422
    with TestClient(_app(run)) as c:  # no calibration loaded: say what to do
        r2 = c.post("/api/generate", json={"inputs": "x = ", "parameters": {"max_disagreement": 0.05}})
        assert r2.status_code == 422 and "scripts/calibrate.py" in r2.json()["error"]


def test_token_counts_stop_at_the_stop_string(run):
    """A token wholly past a stop string is not a completion token (usage counts what is returned)."""
    cfg, r = run
    engine = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding,
                    literal_mode="source")
    ids = r.tokenizer.encode("abc\ndef ghi", add_special_tokens=False)
    text = engine.to_editor_text(r.tokenizer.decode(ids, skip_special_tokens=True))
    cut = engine._cut_at_stops(text, ["\n"])
    k = engine.kept_tokens(ids, cut)
    assert cut == "abc" and 0 < k < len(ids)
    assert r.tokenizer.decode(ids[:k]).startswith("abc") and not r.tokenizer.decode(ids[:k - 1]).startswith("abc")
    assert engine.kept_tokens(ids, "") == 0 and engine.kept_tokens(ids, text) == len(ids)
