"""The endpoint in-process (app factory with injected objects): API key, queue refusal, timeouts,
a run without a policy, the engine's prompt handling (FIM, CodeXGLUE text, truncation), the
streamed text (pieces join into the final text, never show a stop string), streamed deadlines
in every protocol, and log probabilities checked against the HF model's own forward."""

import asyncio
import dataclasses
import json
import random
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from greencode.config import ConfigError, load_config
from greencode.decoding.steps import cut_at_stops
from greencode.serve import create_app, load_run, serve
from greencode.serve.demo import build_demo_run
from greencode.serve.engine import Engine, split_fim
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


def test_every_route_but_health_needs_the_key(run, monkeypatch):
    """Loops over the app's own routes: a route added later is guarded too, whatever its method."""
    monkeypatch.delenv("GREENCODE_API_KEY", raising=False)
    import re

    def flat(routes, prefix=""):  # included routers (FastAPI >= 0.120 wraps them) are opened up
        for r in routes:
            inner = getattr(r, "original_router", None)
            if inner is not None:
                yield from flat(inner.routes, prefix + (getattr(getattr(r, "include_context", None), "prefix", "") or ""))
            elif hasattr(r, "path"):
                yield prefix + r.path, sorted(getattr(r, "methods", None) or {"GET"})

    app = _app(run, api_key="s3cret")
    routes = list(flat(app.routes))
    assert len(routes) >= 14 and ("/v1/completions", ["POST"]) in routes
    tried = 0
    with TestClient(app) as c:
        for path, methods in routes:
            url = re.sub(r"\{[^}]+\}", "greencode", path)
            for method in methods:
                if method == "HEAD":
                    continue
                r = c.request(method, url, json=BODY if method in ("POST", "PUT", "PATCH") else None)
                if path == "/health":
                    assert r.status_code == 200, (method, path)
                else:
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert r.headers["content-type"].startswith("application/json"), (method, path)
                tried += 1
    assert tried >= len(routes)


def test_non_loopback_bind_needs_a_key(run, monkeypatch):
    monkeypatch.delenv("GREENCODE_API_KEY", raising=False)
    cfg, _ = run
    with pytest.raises(ConfigError, match="API key"):
        serve(cfg, host="0.0.0.0", port=0)


def _slow(engine, seconds):
    """Every decoding step takes ``seconds`` longer (0: back to normal, EOS and all)."""
    engine.before_step = (lambda: time.sleep(seconds)) if seconds else None
    if not seconds:
        engine.__dict__.pop("result", None)
        if hasattr(engine, "_eos_saved"):
            engine.eos_ids = engine._eos_saved


def test_full_queue_answers_503_then_recovers(run):
    app = _app(run, queue_size=1, max_batch_size=1)
    engine = app.state.engine
    _slow(engine, 0.6)

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/api/generate", json=BODY) for _ in range(6)])

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert app.state.scheduler.in_flight == 0
    _slow(engine, 0.0)
    with TestClient(app) as c:
        assert c.post("/api/generate", json=BODY).status_code == 200
        assert 'greencode_rejected_total{reason="busy"}' in c.get("/metrics").text


def test_timeout_is_504_and_frees_the_worker(run):
    app = _app(run, request_timeout_s=0.2)
    engine = app.state.engine
    with TestClient(app) as c:
        _slow(engine, 1.0)
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while app.state.scheduler.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.scheduler.in_flight == 0
        _slow(engine, 0.0)
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


def test_options_that_are_not_supported_are_refused(run):
    with TestClient(_app(run)) as c:
        body = {"prompt": "def f(x):\n    return", "max_tokens": 3}
        assert c.post("/v1/completions", json=body).status_code == 200
        for extra, word in (({"best_of": 3}, "best_of"), ({"logprobs": 6}, "logprobs"),
                            ({"echo": True, "logprobs": 1}, "echo")):
            r2 = c.post("/v1/completions", json={**body, **extra})
            assert r2.status_code == 422 and word in r2.json()["error"]["message"], r2.text
        assert c.post("/v1/completions", json={**body, "best_of": 1, "suffix": ""}).status_code == 200
        tgi = {"inputs": "def f(x):\n    return", "parameters": {"max_new_tokens": 3}}
        for extra, word in (({"best_of": 2}, "best_of"), ({"decoder_input_details": True, "details": True},
                                                          "decoder_input_details"), ({"top_n_tokens": 9}, "top_n")):
            r3 = c.post("/generate", json={**tgi, "parameters": {**tgi["parameters"], **extra}})
            assert r3.status_code == 422 and word in r3.json()["error"], r3.text


def test_run_without_policy_serves_the_full_model(run):
    with TestClient(_app(run, policy=False)) as c:
        h = c.get("/health").json()
        assert h["policy_loaded"] is False and "full model" in h["serving"]
        assert c.post("/api/show", json={"model": "greencode"}).json()["model_info"]["greencode.policy_loaded"] is False
        s = c.post("/api/generate", json=BODY).json()["greencode"]
        assert s["controller"] == "full_model_no_policy" and all(e == 3 for e in s["exit_layers"])


def test_fim_prompts_split_into_prefix_and_suffix():
    assert split_fim("<fim_prefix>def f():\n    <fim_suffix>\n\nx = 1<fim_middle>") == (
        "def f():\n    ", "\n\nx = 1", "starcoder")
    assert split_fim("<PRE> a = [<SUF>]\n <MID>") == ("a = [", "]\n", "codellama")
    assert split_fim("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>") == ("a", "b", "qwen")
    assert split_fim("plain <fim_prefix> text") == ("plain <fim_prefix> text", None, None)
    # markers out of order are not a FIM prompt
    assert split_fim("<fim_prefix>a<fim_middle>b<fim_suffix>") == ("<fim_prefix>a<fim_middle>b<fim_suffix>", None, None)


def test_left_to_right_model_ignores_the_suffix_and_says_so(run):
    cfg, r = run
    eng = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding)
    assert eng.fim_ids is None and eng.describe()["fill_in_the_middle"] is False
    plain, _ = eng.encode("def f(x):\n    return", 4)
    for prompt, suffix in (("def f(x):\n    return", "\n\nprint(f(1))"),
                           ("<fim_prefix>def f(x):\n    return<fim_suffix>\n\nprint(f(1))<fim_middle>", None)):
        ids, info = eng.encode(prompt, 4, suffix=suffix)
        assert ids == plain and info["suffix_ignored"] is True and "not trained to fill in the middle" in info["suffix_note"]
    with TestClient(_app(run)) as c:
        s = c.post("/api/generate", json={"prompt": "x = ", "suffix": "\ny = 2", "stream": False,
                                          "options": {"num_predict": 2}}).json()["greencode"]
        assert s["suffix_ignored"] is True
        o = c.post("/v1/completions", json={"prompt": "x = ", "suffix": "\ny = 2", "max_tokens": 2}).json()
        assert o["greencode"]["suffix_ignored"] is True


def test_engine_prompt_text_truncation_and_pieces(run, monkeypatch):
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

    # a raw-format prompt of a few kilobytes: only a short tail is tokenized (6 characters per kept token),
    # and the ids are those of the whole; where that tail is short of tokens, the wider window or the whole
    raw = Engine(r.model, r.tokenizer, r.policy, serve_cfg=_cfg(cfg, prompt_format="raw").serve,
                 decoding_cfg=cfg.decoding)
    seen: list[int] = []
    real_encode = r.tokenizer.encode

    def counting(text, **kw):
        seen.append(len(text))
        return real_encode(text, **kw)

    dense = "\n".join(f"v{i} = f(v{i - 1}, [{i}, {i + 1}], 'x{i}')" for i in range(1, 300))
    for chars_per_token, tries in ((6, 1), (1, 2)):  # 1: the smoke tokenizer's ~2 per token leave the tail short
        monkeypatch.setattr("greencode.serve.engine.TAIL_CHARS_PER_TOKEN", chars_per_token)
        seen.clear()
        r.tokenizer.encode = counting
        try:
            got, got_info = raw.encode(dense, max_new_tokens=12)
        finally:
            r.tokenizer.encode = real_encode
        assert got == encode_context(r.tokenizer, dense, max_tokens=512 - 12)
        assert len(seen) == tries and seen[0] <= chars_per_token * (512 - 12 - 1)
        assert seen[-1] < len(dense) if tries == 1 else seen[-1] == len(dense)  # the second: the whole (< 16 KB)
        assert got_info["prompt_tokens_dropped"] is None if tries == 1 else got_info["prompt_tokens_dropped"] > 0

    tokens = r.tokenizer.encode("for é in range(3): <EOL> print ( 'ü' )", add_special_tokens=False)
    full = eng.to_editor_text(r.tokenizer.decode(tokens, skip_special_tokens=True))
    pieces = eng.pieces(tokens, full)
    assert "".join(pieces) == full and "\ufffd" not in "".join(pieces)


def test_deadline_stops_the_decoding_loop(run):
    """A request past its deadline stops between tokens (the model is freed), it does not
    run to max_new_tokens in the background."""
    from greencode.serve.requests import GenRequest

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
        both = ask({"max_disagreement": 0.1, "exit_threshold": 0.9})  # the target wins over the threshold
        assert both.status_code == 200 and both.json()["greencode"]["threshold"] == 0.5
        low = ask({"max_disagreement": 0.001}).json()["greencode"]  # stricter than anything certified
        assert low["controller"] == "full_model_target_not_certified" and low["threshold"] is None
        assert set(low["exit_layers"][1:]) == {r.model.final_layer}
        assert ask({"max_disagreement": 0}).status_code == 422  # outside the schema's (0, 1]
    with TestClient(_app(run)) as c:  # no calibration loaded: nothing certified, the full model meets any target
        r2 = c.post("/api/generate", json={"inputs": "x = ", "parameters": {"max_disagreement": 0.05}})
        assert r2.status_code == 200 and r2.json()["greencode"]["controller"] == "full_model_no_calibration"


def test_fidelity_names_the_criterion_of_the_target(run):
    """max_disagreement keeps meaning sequence consistency; fidelity=token / quality reads that
    criterion's calibration; each wire format carries it."""
    cfg, r = run
    tok_fams = {"gc": {"targets": {"0.02": {"target": 0.02, "chosen": "gc@0.5", "chosen_param": 0.5},
                                   "0.1": {"target": 0.1, "chosen": "gc@0.5", "chosen_param": 0.5}}}}
    cal = {**CAL, "criteria": {"sequence": {"families": CAL["families"]}, "token": {"families": tok_fams}}}
    engine = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding, calibration=cal)
    with TestClient(create_app(cfg, engine=engine)) as c:
        def ask(options):
            return c.post("/api/generate", json={"inputs": "def f(x):\n    return",
                                                 "parameters": {"max_new_tokens": 3, "details": True, **options}})

        seq = ask({"max_disagreement": 0.05}).json()["greencode"]
        assert seq["threshold"] == 0.9 and seq["fidelity"] == "sequence"
        tok = ask({"max_disagreement": 0.05, "fidelity": "token"}).json()["greencode"]
        assert tok["threshold"] == 0.5 and tok["fidelity"] == "token"
        q = ask({"max_disagreement": 0.05, "fidelity": "quality"}).json()["greencode"]  # not in this calibration
        assert q["controller"] == "full_model_criterion_not_calibrated"
        alone = ask({"fidelity": "token"}).json()["greencode"]  # a criterion without a target: ignored
        assert alone["threshold"] == 0.9 and alone["controller"] == "policy"
        assert ask({"max_disagreement": 0.05, "fidelity": "vibes"}).status_code == 422
        oa = c.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 3, "max_disagreement": 0.05,
                                             "fidelity": "token"})
        assert oa.status_code == 200 and oa.json()["greencode"]["threshold"] == 0.5
        ol = c.post("/api/generate", json={"model": "greencode", "prompt": "x = ", "stream": False,
                                           "options": {"num_predict": 3, "max_disagreement": 0.05, "fidelity": "token"}})
        assert ol.status_code == 200, ol.text


def test_token_counts_stop_at_the_stop_string(run):
    """A token wholly past a stop string is not a completion token (usage counts what is returned)."""
    cfg, r = run
    engine = Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding,
                    literal_mode="source")
    ids = r.tokenizer.encode("abc\ndef ghi", add_special_tokens=False)
    text = engine.to_editor_text(r.tokenizer.decode(ids, skip_special_tokens=True))
    cut = cut_at_stops(text, ["\n"])
    k = engine.kept_tokens(ids, cut)
    assert cut == "abc" and 0 < k < len(ids)
    assert r.tokenizer.decode(ids[:k]).startswith("abc") and not r.tokenizer.decode(ids[:k - 1]).startswith("abc")
    assert engine.kept_tokens(ids, "") == 0 and engine.kept_tokens(ids, text) == len(ids)


# ----------------------------------------------------------------------------- streaming and logprobs
PROMPT = "import os\n\n\ndef read_file(path):\n    with open(path) as f:\n        return"


def _per_token(engine, seconds, calls=None):
    """Decoding slowed down by ``seconds`` per step, without EOS (so it runs to max_new_tokens);
    every finished row's result goes to ``calls``."""
    engine.before_step = lambda: time.sleep(seconds)
    engine._eos_saved = getattr(engine, "_eos_saved", engine.eos_ids)
    engine.eos_ids = []
    real = type(engine).result

    def result(batch, row):
        res = real(engine, batch, row)
        if calls is not None:
            calls.append(res)
        return res

    engine.result = result


def _check_stream(engine, tokens, stops):
    """Push ``tokens`` through a streamer: what was sent is always a prefix of the final text (so
    nothing past a stop string, nothing taken back), and pieces + flush == the final text."""
    full = engine.to_editor_text(engine.tokenizer.decode(tokens, skip_special_tokens=True))
    final = cut_at_stops(full, stops)
    streamer = engine.streamer(stops)
    sent = ""
    for t in tokens:
        sent += streamer.push(t)
        assert final.startswith(sent), (tokens, stops, sent, final)
    assert not any(s in sent for s in stops)
    assert sent + streamer.finish(final) == final
    return sent, final


def test_streamed_pieces_join_into_the_final_text_and_never_show_a_stop(run):
    cfg, r = run
    tok = r.tokenizer
    codexglue = Engine(r.model, tok, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding)
    raw = Engine(r.model, tok, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding, literal_mode="source")
    assert codexglue.streamer().eol and not raw.streamer().eol
    texts = ["for é in range(3): <EOL> print ( 'ü' ) <EOL> x = 1", "a <EOL>   <EOL> b  <EOL> <EO",
             "def f ( x ) : <EOL> return x + 1 <EOL>", "x = '日本' <EOL> y = 2  ", "if a : <EOL> <EOL> <EOL> pass"]
    stop_sets = [[], ["\n"], ["return"], ["\n\n"], ["+ 1"], ["ü' )"], ["本"], [" ", "x"]]
    streamed_any = False
    for engine in (codexglue, raw):
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            # one token at a time as tokenized, and byte by byte split into smaller tokens where possible
            for stops in stop_sets:
                sent, final = _check_stream(engine, ids, stops)
                streamed_any |= bool(sent) and len(sent) >= len(final) // 2
    assert streamed_any  # the text goes out while tokens come, not all at the end
    # random token sequences with stop strings cut from their own text, so they straddle tokens
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(150):
        engine = rng.choice((codexglue, raw))
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        full = engine.to_editor_text(tok.decode(ids, skip_special_tokens=True))
        stops = []
        if full and rng.random() < 0.8:
            i = rng.randrange(len(full))
            stops.append(full[i:i + rng.randint(1, 4)])
        _check_stream(engine, ids, stops)


def test_streamed_events_equal_the_plain_answer_and_stop_at_a_split_stop(run):
    """The same greedy request streamed (engine events, then over SSE) and not: the pieces join
    into the plain text; a stop string spanning two tokens is never streamed."""
    from greencode.serve.requests import GenRequest

    app = _app(run)
    engine = app.state.engine
    gen = GenRequest(prompt=PROMPT, max_new_tokens=16, threshold=1.0)
    plain = engine.complete(gen)
    events = []
    streamed = engine.complete(GenRequest(prompt=PROMPT, max_new_tokens=16, threshold=1.0), on_event=events.append)
    assert streamed.text == plain.text and streamed.tokens == plain.tokens
    assert [e.token_id for e in events] == plain.tokens and [e.index for e in events] == list(range(len(events)))
    assert [e.exit_layer for e in events] == plain.stats["exit_layers"]
    tokens, text = plain.tokens, plain.text
    # a stop string across a token boundary: the last character of one token's text and the first of the next
    bounds = [len(engine.to_editor_text(r_dec)) for r_dec in
              (engine.tokenizer.decode(tokens[:k], skip_special_tokens=True) for k in range(1, len(tokens)))]
    cands = [b for b in bounds
             if 0 < b < len(text) and text[b - 1:b + 1].strip() and text.find(text[b - 1:b + 1]) == b - 1]
    assert cands, text
    stop = text[cands[len(cands) // 2] - 1:cands[len(cands) // 2] + 1]
    with TestClient(app) as c:
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "RL_agent_thresh": 1.0}
        ref = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert ref == text
        for stops in ([], [stop]):
            want = text[:text.find(stop)] if stops else text
            with c.stream("POST", "/v1/completions", json={**body, "stream": True, "stop": stops}) as resp:
                chunks = [json.loads(e[6:]) for e in resp.read().decode().split("\n\n") if e and e != "data: [DONE]"]
            pieces = [ch["choices"][0]["text"] for ch in chunks]
            assert "".join(pieces) == want == c.post("/v1/completions", json={**body, "stop": stops}).json(
                )["choices"][0]["text"]
            sent = ""
            for p in pieces:
                sent += p
                assert want.startswith(sent) and (not stops or stop not in sent)
            if not stops:
                assert sum(1 for p in pieces if p) >= 3  # token by token, not one lump


def test_logprobs_are_the_full_models_log_softmax(run):
    """OpenAI logprobs and TGI details for the full model (threshold 1.0, greedy) equal the
    log-softmax of the HF model's own final-layer logits, computed here with a plain forward."""
    import torch

    cfg, r = run
    app = _app(run)
    engine = app.state.engine
    with TestClient(app) as c:
        tgi = c.post("/generate", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": 6, "details": True, "top_n_tokens": 3, "RL_agent_thresh": 1.0}}).json()
        oa = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3,
                                             "RL_agent_thresh": 1.0}).json()
        streamed = c.post("/generate", json={"inputs": PROMPT, "stream": True, "parameters": {
            "max_new_tokens": 6, "details": True, "RL_agent_thresh": 1.0}})
    d = tgi["details"]
    toks = [t["id"] for t in d["tokens"]]
    assert len(toks) == d["generated_tokens"] == 6 and tgi["greencode"]["controller"] == "full_model"
    ids, _ = engine.encode(PROMPT, 6)
    with torch.inference_mode():
        for i, t in enumerate(toks):
            logits = r.model.hf(input_ids=torch.tensor([ids + toks[:i]])).logits[0, -1].float()
            ref = torch.log_softmax(logits, -1)
            assert t == int(torch.argmax(ref))  # greedy
            assert d["tokens"][i]["logprob"] == pytest.approx(float(ref[t]), abs=1e-4)
            top = torch.topk(ref, 3)
            assert [x["id"] for x in d["top_tokens"][i]] == top.indices.tolist()
            assert [x["logprob"] for x in d["top_tokens"][i]] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert d["tokens"][i]["text"] == r.tokenizer.decode([t])
    lp = oa["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([t["logprob"] for t in d["tokens"]], abs=1e-6)
    assert lp["tokens"] == [t["text"] for t in d["tokens"]]
    assert all(max(top.values()) == pytest.approx(own, abs=1e-6) for top, own in zip(lp["top_logprobs"],
                                                                                       lp["token_logprobs"]))
    offsets, text = lp["text_offset"], oa["choices"][0]["text"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    # streamed: every token event carries its token's log probability as it is produced; the final event's
    # details have them all (the final event's own token is the held-back text, no model token)
    events = [json.loads(line[5:]) for line in streamed.text.split("\n") if line.startswith("data:")]
    assert [e["token"]["logprob"] for e in events[:6]] == pytest.approx([t["logprob"] for t in d["tokens"]], abs=1e-6)
    assert [t["logprob"] for t in events[-1]["details"]["tokens"]] == pytest.approx(
        [t["logprob"] for t in d["tokens"]], abs=1e-6)


def test_streamed_request_past_its_deadline_ends_with_an_error_event(run):
    """A stream that runs past serve.request_timeout_s stops generating and ends with its
    protocol's error event (the status line was already sent), counted as a timeout."""
    app = _app(run, request_timeout_s=1.0, max_new_tokens_cap=64)
    engine = app.state.engine
    with TestClient(app) as c:
        calls = []
        _per_token(engine, 0.05, calls)
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 64, "stream": True}) as resp:
            events = [e for e in resp.read().decode().split("\n\n") if e]
        assert resp.status_code == 200 and events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert err["code"] == 504 and "request_timeout_s" in err["message"] and len(events) > 3
        tgi = {"inputs": PROMPT, "parameters": {"max_new_tokens": 64}}
        # the scheduler has now measured the slow steps: 64 tokens cannot finish within 1 s, so the next
        # request is refused at once rather than admitted to time out
        refused = c.post("/generate", json=tgi)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "past its deadline" in refused.json()["error"]
        assert 'greencode_rejected_total{reason="deadline"} 1.0' in c.get("/metrics").text
        from greencode.serve.scheduler import DrainModel

        def forget():  # once the earlier rows are gone (their last steps would be measured again), a fresh drain model
            deadline = time.monotonic() + 10
            while app.state.scheduler.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            app.state.scheduler.drain = DrainModel()

        forget()  # forgotten: the next ones are admitted, and time out
        with c.stream("POST", "/generate_stream", json=tgi) as resp:
            last = [line for line in resp.read().decode().split("\n") if line.startswith("data:")][-1]
        assert json.loads(last[5:])["error_type"] == "timeout"
        forget()
        with c.stream("POST", "/api/generate", json={"model": "greencode", "prompt": PROMPT,
                                                     "options": {"num_predict": 64}}) as resp:
            lines = [json.loads(line) for line in resp.read().decode().split("\n") if line]
        assert "request_timeout_s" in lines[-1]["error"] and not any(x.get("done") for x in lines)
        assert all(res.finish_reason == "cancelled" and len(res.tokens) < 64 for res in calls)
        _slow(engine, 0.0)
        deadline = time.monotonic() + 10
        while app.state.scheduler.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 'greencode_rejected_total{reason="timeout"} 3.0' in c.get("/metrics").text


@pytest.mark.parametrize("prefill_budget", [256, 3])
def test_concurrent_requests_batched_equal_each_request_alone(run, prefill_budget):
    """Requests decoded together (continuous batching, each with its own threshold, sampling,
    seed and stop strings) get exactly the answer each gets alone; with a prefill budget of 3
    tokens the prompts join in chunks while the others decode (chunked prefill)."""
    prompts = [PROMPT, "def add(a, b):\n    return", "class Point:\n    def __init__(self", "for i in range("]
    bodies = [
        {"inputs": prompts[0], "parameters": {"max_new_tokens": 12, "RL_agent_thresh": 1.0}},
        {"inputs": prompts[1], "parameters": {"max_new_tokens": 9, "RL_agent_thresh": 0.3}},
        {"inputs": prompts[2], "parameters": {"max_new_tokens": 14, "do_sample": True, "temperature": 0.9,
                                              "seed": 5, "RL_agent_thresh": 0.6}},
        {"inputs": prompts[3], "parameters": {"max_new_tokens": 10, "stop": [")"], "RL_agent_thresh": 0.5}},
    ]
    alone_app = _app(run, max_batch_size=1)
    with TestClient(alone_app) as c:
        alone = [c.post("/generate", json=b).json() for b in bodies]
    app = _app(run, max_batch_size=4, max_prefill_tokens=prefill_budget)
    engine = app.state.engine
    sizes, chunks = [], []
    real_step = type(engine).step
    real_chunk = type(engine).prefill_chunk
    engine.prefill_chunk = lambda job, upto, state=None: chunks.append(upto) or real_chunk(engine, job, upto, state)

    def step(batch):
        sizes.append(len(batch))
        time.sleep(0.01)  # long enough for every request to be queued before the first rows finish
        return real_step(engine, batch)

    engine.step = step

    async def together():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/generate", json=b) for b in bodies])

    with TestClient(app):  # lifespan: the scheduler's worker runs
        got = [r.json() for r in asyncio.run(together())]
    assert max(sizes) >= (3 if prefill_budget > 3 else 2)  # decoded together (chunks join more slowly)
    assert (len(chunks) > 3) == (prefill_budget == 3), chunks  # chunked only when the prompts exceed the budget
    final = engine.model.final_layer
    assert any(e < final for b in got[1:] for e in b["greencode"]["exit_layers"][1:])  # rows did exit
    for a, b in zip(alone, got):
        assert b["generated_text"] == a["generated_text"]
        assert b["greencode"]["exit_layers"] == a["greencode"]["exit_layers"]
        assert b["greencode"]["completion_tokens"] == a["greencode"]["completion_tokens"]


def test_lossless_mode_answers_the_full_models_text_in_every_format(run):
    """mode="lossless" (per request, any format): drafted with the policy's exits and verified, so
    the answer is the full model's (greedy), streamed or not, with the drafter's acceptance rate
    in the statistics, and log probabilities that are the full model's; a bad mode is a 422."""
    with TestClient(_app(run)) as c:
        full = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12,
                                                                          "RL_agent_thresh": 1.0}}).json()
        lossy = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12,
                                                                           "RL_agent_thresh": 0.2}}).json()
        tgi = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "mode": "lossless",
                                                                         "RL_agent_thresh": 0.2}}).json()
        oa = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                             "mode": "lossless", "exit_threshold": 0.2}).json()
        ol = c.post("/api/generate", json={"model": "greencode", "prompt": PROMPT, "stream": False, "mode": "lossless",
                                           "options": {"num_predict": 12, "temperature": 0,
                                                       "RL_agent_thresh": 0.2}}).json()
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                       "stream": True, "mode": "lossless",
                                                       "exit_threshold": 0.2}) as resp:
            chunks = [json.loads(e[6:]) for e in resp.read().decode().split("\n\n") if e and e != "data: [DONE]"]
        bad = c.post("/generate", json={"inputs": PROMPT, "parameters": {"mode": "fast"}})
        both = c.post("/v1/completions", json={"prompt": PROMPT, "mode": "lossless", "logprobs": 1, "max_tokens": 6,
                                               "temperature": 0, "exit_threshold": 0.2}).json()
        plain = c.post("/v1/completions", json={"prompt": PROMPT, "logprobs": 1, "max_tokens": 6, "temperature": 0,
                                                "exit_threshold": 1.0}).json()
    assert lossy["greencode"]["mode"] == "lossy" and any(
        e < lossy["greencode"]["num_layers"] - 1 for e in lossy["greencode"]["exit_layers"][1:])  # the drafter exits
    assert tgi["generated_text"] == full["generated_text"] == oa["choices"][0]["text"] == ol["response"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch.get("choices")) == full["generated_text"]
    s = tgi["greencode"]
    assert s["mode"] == "lossless" and s["drafted_tokens"] >= 1 and 0 <= s["acceptance_rate"] <= 1
    assert s["mean_draft_length"] > 0 and s["verification_rounds"] >= 1
    assert bad.status_code == 422 and "mode" in bad.text
    lp, ref = both["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
    assert both["choices"][0]["text"] == plain["choices"][0]["text"] and lp["tokens"] == ref["tokens"]
    assert all(abs(a - b) < 1e-4 for a, b in zip(lp["token_logprobs"], ref["token_logprobs"]))


def test_a_misspelt_exit_knob_is_named_back_not_silently_dropped(run):
    """Unknown fields are ignored, as the protocols' own servers do; one that looks like an exit knob is
    named in the answer's ``greencode.request_notes`` (and the server's log), with the field it resembles."""
    with TestClient(_app(run)) as c:
        o = c.post("/v1/completions", json={"model": "greencode", "prompt": "x = ", "max_tokens": 2,
                                            "exit_treshold": 0.5, "user": "someone", "frobnicate": 1,
                                            "modes": "x"}).json()["greencode"]
        # "model" is a field the schema reads, not a misspelt "mode"; "modes" is one
        assert o["request_notes"] == ["body.exit_treshold is not a field this server reads and was ignored; "
                                      "did you mean body.exit_threshold?",
                                      "body.modes is not a field this server reads and was ignored; "
                                      "did you mean body.mode?"]
        assert o["threshold"] == run[0].serve.default_threshold  # the default, not 0.5
        g = c.post("/api/generate", json={"model": "greencode", "prompt": "x = ", "stream": False, "keep_alive": "5m",
                                          "options": {"num_predict": 2, "RL_agent_threshold": 0.3}}).json()
        assert g["greencode"]["request_notes"] == ["body.options.RL_agent_threshold is not a field this server "
                                                   "reads and was ignored; did you mean body.options.RL_agent_thresh?"]
        h = c.post("/generate", json={"inputs": "x = ", "parameters": {"max_new_tokens": 2, "max_disagreemnt": 0.1,
                                                                       "exit_threshold": 0.4}}).json()
        assert h["greencode"]["request_notes"] == ["body.parameters.max_disagreemnt is not a field this server reads "
                                                   "and was ignored; did you mean body.parameters.max_disagreement?"]
        assert h["greencode"]["threshold"] == 0.4
        clean = c.post("/v1/completions", json={"model": "greencode", "prompt": "x = ", "max_tokens": 2,
                                                "exit_threshold": 0.5, "user": "someone", "stream": False,
                                                "temperature": 0, "top_p": 1, "n": 1}).json()["greencode"]
        assert "request_notes" not in clean and clean["threshold"] == 0.5
