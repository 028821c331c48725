"""The endpoint started for real (scripts/serve.py in a child process, smoke config, a tiny
random demo run, a free loopback port) and called over HTTP: every route and format, streaming
parsed the way the clients parse it, the official openai, ollama and huggingface_hub clients,
50 and 200 simultaneous requests (every answer JSON, refusals 503 with Retry-After and counted),
and bad input (all 4xx, server alive). A second server (uvicorn in a thread, generation slowed
per token) shows streams are real: the first chunk arrives long before the last, with every
official client, and a client that hangs up stops the generation."""

import asyncio
import json
import threading
import time

import httpx
import pytest

from greencode.config import load_config
from greencode.serve import ServerProcess
from greencode.serve.demo import build_demo_run
from greencode.utils import REPO_ROOT

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
MAX_BYTES = 65536
PROMPT = "import os\n\n\ndef read_file(path):\n    with open(path) as f:\n        return"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = load_config(SMOKE)
    # a tokenizer with the fill-in-the-middle sentinels: editors' FIM bodies get the model's own layout
    run = build_demo_run(cfg, tmp_path_factory.mktemp("serve_run"), p_exit=0.7, fim=True)
    overrides = ["hardware.num_threads=1", "serve.queue_size=4", f"serve.max_request_bytes={MAX_BYTES}",
                 "serve.default_threshold=0.9", "serve.max_new_tokens_cap=64"]
    with ServerProcess(SMOKE, overrides, run_dir=run, env={"GREENCODE_API_KEY": ""}) as srv:
        yield srv
        tail = srv.log_tail(200_000)
    assert "Traceback" not in tail, tail[-4000:]


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


def _gen(http, **options):
    r = http.post("/api/generate", json={"inputs": PROMPT, "options": {"num_predict": 6, **options}})
    assert r.status_code == 200, r.text
    return r.json()


def _served(body: dict) -> bool:
    """A generation really ran: text came back and at least one token was generated for it."""
    return isinstance(body["generated_text"], str) and body["greencode"]["completion_tokens"] >= 1


# ----------------------------------------------------------------------------- routes and formats
def test_health_models_tags_show_metrics(server, http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["policy_loaded"] is True and h["exit_layers"] == [1, 2]
    assert h["num_layers"] == 4 and h["auth_required"] is False and h["max_new_tokens_cap"] == 64

    import ollama
    import openai

    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)
    assert [m.id for m in oa.models.list()] == ["greencode"]
    ol = ollama.Client(host=server.url)
    tags = ol.list()
    assert [m.model for m in tags.models] == ["greencode"] and tags.models[0].details.family == "llama"
    show = ol.show("greencode")
    assert show.modelinfo["llama.context_length"] == 512 and show.modelinfo["greencode.exit_layers"] == [1, 2]
    assert "completion" in show.capabilities

    assert http.get("/").status_code == 200
    assert http.get("/api/version").json()["version"]
    _gen(http, RL_agent_thresh=0.5)
    text = http.get("/metrics").text
    for name in ("greencode_requests_total", "greencode_generated_tokens_total", "greencode_mean_exit_layer",
                 "greencode_layers_skipped_share", "greencode_energy_joules_total", "greencode_requests_in_flight"):
        assert name in text, name
    assert 'route="/api/generate",status="200"' in text


def test_seed_format_threshold_semantics(http):
    early = _gen(http, RL_agent_thresh=0.5)  # demo policy: P(exit)=0.7 everywhere -> exits at layer 1
    s = early["greencode"]
    assert isinstance(early["generated_text"], str)
    assert s["controller"] == "policy" and s["threshold"] == 0.5
    assert len(s["exit_layers"]) == s["completion_tokens"] >= 1
    assert s["exit_layers"][0] == 3 and all(e == 1 for e in s["exit_layers"][1:])  # first token: the prefill
    if s["decode_steps"]:
        assert s["layers_skipped_share"] == pytest.approx(0.5) and s["mean_exit_layer"] == 1.0
    assert s["energy_j"] is None and s["energy_source"] == "time-only"
    assert s["latency_s"] >= s["generation_s"] > 0

    late = _gen(http, RL_agent_thresh=0.9)  # 0.7 < 0.9: never exits
    full = _gen(http, RL_agent_thresh=1.0)  # the exact full model, no exit checks
    default = _gen(http)  # missing threshold: the server default (0.9), no crash
    alias = _gen(http, exit_threshold=0.5)
    assert all(e == 3 for e in late["greencode"]["exit_layers"])
    assert full["greencode"]["controller"] == "full_model" and all(e == 3 for e in full["greencode"]["exit_layers"])
    assert default["greencode"]["threshold"] == 0.9
    assert late["generated_text"] == full["generated_text"] == default["generated_text"]  # greedy, same depth
    assert alias["generated_text"] == early["generated_text"] and alias["greencode"]["threshold"] == 0.5
    slash = http.post("/api/generate/", json={"inputs": PROMPT, "options": {"num_predict": 6, "RL_agent_thresh": 0.5}})
    assert slash.status_code == 200 and slash.json()["generated_text"] == early["generated_text"]


def test_hf_tgi_formats_and_stop_strings(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "return_full_text": False}}
    hf = http.post("/api/generate", json=body).json()
    tgi = http.post("/generate", json=body).json()
    llm_ls = http.post("/models/greencode", json=body).json()  # llm-ls' huggingface backend URL
    assert hf["generated_text"] == tgi["generated_text"] == llm_ls["generated_text"]
    full = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "return_full_text": True,
                                                                         "details": True}}).json()
    assert full["generated_text"] == PROMPT + hf["generated_text"]
    assert full["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert full["details"]["generated_tokens"] == full["greencode"]["completion_tokens"]

    text = hf["generated_text"]
    candidates = [i for i in range(1, len(text) - 1) if not text[i:i + 2].isspace() and " " not in text[i:i + 2]
                  and "\n" not in text[i:i + 2]]
    if candidates:  # a stop string from inside the greedy output: the answer ends right before it
        stop = text[candidates[len(candidates) // 2]:][:2]
        r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "stop": [stop]}}).json()
        assert r["generated_text"] == text[:text.find(stop)]
        assert stop not in r["generated_text"]


def test_huggingface_hub_inference_client_with_and_without_stream(server, http):
    """The official TGI client against the base URL (it posts to /), plain and streamed, and the
    TGI /generate_stream route: the streamed pieces join into the plain answer."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    plain = client.text_generation(PROMPT, max_new_tokens=8)
    ref = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}).json()
    assert plain == ref["generated_text"]
    pieces = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert "".join(pieces) == plain
    detailed = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))
    assert detailed[-1].generated_text == plain and detailed[-1].details.finish_reason in (
        "length", "eos_token", "stop_sequence")
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == plain and events[-1]["generated_text"] == plain
    # "stream": true on /generate streams too (it was silently ignored)
    with http.stream("POST", "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8},
                                                "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")


def test_long_prompt_truncated_from_the_left(http):
    prompt = "x = 1\n" * 2000  # ~12 kB, far beyond the 512-token context
    r = http.post("/api/generate", json={"inputs": prompt, "options": {"num_predict": 4}})
    assert r.status_code == 200, r.text
    s = r.json()["greencode"]
    assert s["prompt_truncated"] is True and s["prompt_tokens"] == 512 - 4


def test_ollama_client_and_stream(server, http):
    import ollama

    ol = ollama.Client(host=server.url)
    opts = {"num_predict": 6, "temperature": 0, "RL_agent_thresh": 0.5}
    res = ol.generate(model="greencode", prompt=PROMPT, options=opts, stream=False)
    assert res.done is True and res.done_reason in ("stop", "length") and isinstance(res.response, str)
    assert 1 <= res.eval_count <= 6 and res.prompt_eval_count >= 1
    parts = list(ol.generate(model="greencode", prompt=PROMPT, options=opts, stream=True))
    assert parts[-1].done is True and all(p.done is False for p in parts[:-1])
    assert "".join(p.response for p in parts) == res.response
    assert ol.generate(model="greencode", prompt="").done_reason == "load"  # Ollama's preload call

    # as Continue reads it: newline-terminated JSON lines, the last with done and the stats
    with http.stream("POST", "/api/generate", json={"model": "greencode", "prompt": PROMPT, "options": opts}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        raw = r.read().decode()
    assert raw.endswith("\n")
    lines = [json.loads(line) for line in raw.split("\n") if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1 and "greencode" in lines[-1]
    assert "".join(x["response"] for x in lines) == res.response
    # llm-ls' ollama backend: stream false, reads "response"
    llm_ls = http.post("/api/generate", json={"model": "greencode", "prompt": PROMPT, "stream": False,
                                              "options": opts}).json()
    assert llm_ls["response"] == res.response and llm_ls["greencode"]["exit_layers"][1:] == [1] * (
        llm_ls["eval_count"] - 1)
    # Continue's extraBodyProperties put the threshold at the top level
    top = http.post("/api/generate", json={"model": "greencode", "prompt": PROMPT, "stream": False,
                                           "RL_agent_thresh": 0.5, "options": {"num_predict": 6, "temperature": 0}})
    assert top.json()["response"] == res.response and top.json()["greencode"]["threshold"] == 0.5


def test_openai_client_and_sse(server, http):
    import openai

    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)
    res = oa.completions.create(model="greencode", prompt=PROMPT, max_tokens=6, temperature=0,
                                extra_body={"RL_agent_thresh": 0.5})
    assert res.object == "text_completion" and res.choices[0].finish_reason in ("stop", "length")
    assert res.usage.completion_tokens == len(res.model_extra["greencode"]["exit_layers"])
    assert res.model_extra["greencode"]["threshold"] == 0.5
    stream = oa.completions.create(model="greencode", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                   extra_body={"RL_agent_thresh": 0.5})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == res.choices[0].text
    assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason
    echo = oa.completions.create(model="greencode", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                 extra_body={"RL_agent_thresh": 0.5})
    assert echo.choices[0].text == PROMPT + res.choices[0].text

    # raw SSE as the clients parse it: "data: {json}" events, the last "data: [DONE]"
    with http.stream("POST", "/v1/completions", json={"model": "greencode", "prompt": PROMPT, "max_tokens": 6,
                                                      "temperature": 0, "stream": True,
                                                      "stream_options": {"include_usage": True},
                                                      "RL_agent_thresh": 0.5}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == res.usage.completion_tokens
    assert "".join(o["choices"][0]["text"] for o in objs if o["choices"]) == res.choices[0].text


FIM_PREFIX, FIM_SUFFIX = "def area(r):\n    return ", "\n\n\ndef main():\n    print(area(2))\n"


def test_editors_fim_bodies_are_filled_in_the_middle(server, http):
    """llm-vscode's default (StarCoder markers in ``inputs``, its default requestBody), Continue's
    Ollama autocomplete (``prompt`` + ``suffix``, raw, streamed NDJSON), Continue's Mistral provider
    (``/v1/fim/completions``, streamed) and the openai client's ``suffix``: each reaches the model as
    its own FIM layout, and greedy answers agree across the formats."""
    import openai

    knob = {"RL_agent_thresh": 0.5}
    starcoder = f"<fim_prefix>{FIM_PREFIX}<fim_suffix>{FIM_SUFFIX}<fim_middle>"
    # llm-vscode 0.2 defaults: llm.fillInTheMiddle.enabled with StarCoder's tokens; requestBody
    # {"parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95}}; llm-ls adds return_full_text
    vscode = http.post("/models/greencode", json={"inputs": starcoder, "parameters": {
        "max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95, "return_full_text": False}})
    assert vscode.status_code == 200, vscode.text
    v = vscode.json()
    v = v[0] if isinstance(v, list) else v
    assert isinstance(v["generated_text"], str) and "<fim_" not in v["generated_text"]

    # Continue's Ollama provider (autocomplete): prompt = prefix, suffix, raw, streamed lines
    continue_body = {"model": "greencode", "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "raw": True, "stream": True,
                     "keep_alive": 1800, "options": {"temperature": 0, "num_predict": 12, "num_ctx": 512,
                                                     "stop": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>",
                                                              "<|endoftext|>", "\n\n", "```"], **knob}}
    with http.stream("POST", "/api/generate", json=continue_body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.read().decode().split("\n") if line]
    last = lines[-1]
    assert last["done"] is True and last["greencode"]["fim"] is True and "suffix_ignored" not in last["greencode"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(server.run_dir / "finetuned"))
    pre, mid, suf = (tok.convert_tokens_to_ids(t) for t in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>"))
    prompt_ids = last["context"][:last["prompt_eval_count"]]
    # the smoke model reads CodeXGLUE text (the layout with plain source text: tests/test_fim.py)
    # SPM, the default layout: <fim_prefix> <fim_suffix> suffix <fim_middle> <s> prefix
    assert prompt_ids[:2] == [pre, suf] and prompt_ids.count(mid) == 1
    m_at = prompt_ids.index(mid)
    assert prompt_ids[m_at + 1] == tok.bos_token_id and tok.decode(prompt_ids[m_at + 2:]).startswith("def area ( r )")
    assert tok.decode(prompt_ids[2:m_at]).strip().startswith("def main ( )")
    middle = "".join(x["response"] for x in lines)

    # Continue's Mistral provider / Codestral: /v1/fim/completions, streamed chat.completion.chunk events
    mistral = {"model": "greencode", "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "max_tokens": 12, "temperature": 0,
               "stream": True, "stop": ["\n\n", "```"], **knob}
    with http.stream("POST", "/v1/fim/completions", json=mistral) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e[6:] for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == middle
    plain = http.post("/v1/fim/completions", json={**mistral, "stream": False}).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["content"] == middle

    # the official openai client's suffix, and the StarCoder prompt sent greedily to TGI's /generate
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)
    res = oa.completions.create(model="greencode", prompt=FIM_PREFIX, suffix=FIM_SUFFIX, max_tokens=12,
                                temperature=0, stop=["\n\n", "```"], extra_body=knob)
    assert res.choices[0].text == middle and res.model_extra["greencode"]["fim"] is True
    tgi = http.post("/generate", json={"inputs": starcoder, "parameters": {"max_new_tokens": 12, "do_sample": False,
                                                                          "stop": ["\n\n", "```"], **knob}})
    assert tgi.json()["generated_text"] == middle


# ----------------------------------------------------------------------------- load and abuse
def test_fifty_simultaneous_requests(server, http):
    async def burst():
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=120.0, limits=limits) as c:
            body = {"inputs": PROMPT, "options": {"num_predict": 16, "RL_agent_thresh": 0.5}}
            return await asyncio.gather(*[c.post("/api/generate", json=body) for _ in range(50)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1
    texts = {r.json()["generated_text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # greedy: every answered request got the same completion
    for r in responses:
        if r.status_code == 503:
            assert r.headers.get("retry-after") and "busy" in r.json()["error"]
    assert http.get("/health").json()["queue"]["in_flight"] == 0
    assert _gen(http, RL_agent_thresh=0.5)["generated_text"]


BAD_BODIES = [
    # (path, raw body, expected status)
    ("/api/generate", b'{"inputs": "def f(", ', 400),  # malformed JSON
    ("/api/generate", b'{"inputs": "\xff\xfe\xfa"}', 400),  # not UTF-8
    ("/api/generate", b"", 400),
    ("/api/generate", b"[1, 2, 3]", 422),
    ("/api/generate", b'{"inputs": "x", "options": {"RL_agent_thresh": NaN}}', 400),
    ("/api/generate", b'{"inputs": "x", "options": {"RL_agent_thresh": 1e999}}', 422),  # infinity
    ("/api/generate", b'{"inputs": "\\ud800 unpaired"}', 422),
    ("/v1/completions", b'{"prompt": "\\udfff"}', 422),
]
BAD_JSON = [
    ("/api/generate", {"inputs": 5}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": "10"}}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2.5}}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": True}}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": -5}}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**9}}),
    ("/api/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**30}}),
    ("/api/generate", {"inputs": "x", "options": {"num_predict": -3}}),
    ("/api/generate", {"inputs": "x", "options": {"temperature": "hot"}}),
    ("/api/generate", {"inputs": "x", "options": {"RL_agent_thresh": -0.1}}),
    ("/api/generate", {"inputs": "x", "options": {"RL_agent_thresh": 1.5}}),
    ("/api/generate", {"inputs": "x", "options": {"RL_agent_thresh": "0.5"}}),
    ("/api/generate", {"inputs": "x", "parameters": {"top_p": 0}}),
    ("/api/generate", {"inputs": "x", "parameters": {"stop": [f"s{i}" for i in range(100)]}}),
    ("/api/generate", {"inputs": "x", "parameters": {"stop": 7}}),
    ("/api/generate", {"model": "greencode", "prompt": "x", "options": {"num_predict": -7}}),
    ("/api/generate", {"model": "greencode", "prompt": "x", "options": "fast"}),
    ("/api/generate", {"model": "greencode", "prompt": "x", "options": {"RL_agent_thresh": 2}}),
    ("/generate", {"prompt": "x"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": [1, 2, 3]}),
    ("/v1/completions", {"prompt": "x", "n": 2}),
    ("/v1/completions", {"prompt": "x", "RL_agent_thresh": 7}),
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/api/show", {"model": 3}),
]


def test_bad_input_is_4xx_and_server_survives(server, http):
    for path, raw, status in BAD_BODIES:
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, raw, r.status_code, r.text)
        assert r.json()["error"], r.text
    for path, body in BAD_JSON:
        r = http.post(path, json=body)
        assert r.status_code == 422, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        msg = err["message"] if isinstance(err, dict) else err
        assert msg and r.json()["detail"][0]["loc"].startswith("body"), r.text
    big = http.post("/api/generate", json={"inputs": "x" * (MAX_BYTES + 10)})
    assert big.status_code == 413 and "max_request_bytes" in big.json()["error"]
    assert http.post("/api/generate", content=b"x" * (MAX_BYTES * 2)).status_code == 413
    nf = http.get("/nowhere")
    assert nf.status_code == 404 and "/api/generate" in nf.json()["error"]
    assert http.get("/api/generate").status_code == 405 and http.get("/api/generate").json()["error"]
    # OpenAI-style error objects for OpenAI clients, with llm-ls' "detail" list
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert r.json()["error"]["param"] == "max_tokens" and r.json()["detail"][0]["loc"] == "body.max_tokens"

    assert http.get("/health").status_code == 200
    assert _served(_gen(http))
    assert 'status="500"' not in http.get("/metrics").text


def _counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_hundred_simultaneous_requests_all_get_json(server, http):
    """A burst far past the queue: every answer is JSON, served (200) or refused (503 with
    Retry-After, from the generation queue or the app's connection bound); some are served, every
    refusal is counted in /metrics, and the server keeps serving."""
    before = http.get("/metrics").text

    async def burst():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120.0, limits=limits) as c:
            body = {"inputs": PROMPT, "options": {"num_predict": 16, "RL_agent_thresh": 0.5}}
            return await asyncio.gather(*[c.post("/api/generate", json=body) for _ in range(200)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert all(r.headers["content-type"].startswith("application/json") for r in responses)
    assert codes.count(200) >= 1
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"], r.text
        else:
            assert _served(r.json()), r.text
    after = http.get("/metrics").text
    refused = sum(_counter(after, "greencode_rejected_total", reason=k) - _counter(before, "greencode_rejected_total",
                                                                                    reason=k)
                  for k in ("busy", "overload"))
    assert refused == codes.count(503)
    assert (_counter(after, "greencode_requests_total", route="/api/generate", status="503")
            - _counter(before, "greencode_requests_total", route="/api/generate", status="503")) == codes.count(503)
    assert http.get("/health").json()["queue"]["in_flight"] == 0
    assert _served(_gen(http, RL_agent_thresh=0.5))


# ----------------------------------------------------------------------------- real streaming
STEP_S = 0.015  # the slowed generation: 15 ms a token, 64 tokens ~ 1 s


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """The app in-process under uvicorn (a thread, a free loopback port) with generation slowed
    per token and EOS ignored, so every request runs its full length."""
    import dataclasses

    import uvicorn

    from greencode.serve import create_app, load_run
    from greencode.serve.server import free_port

    cfg = load_config(SMOKE, ["hardware.num_threads=1", "serve.max_new_tokens_cap=64", "serve.queue_size=4"])
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, api_key=None))
    run = load_run(cfg, build_demo_run(cfg, tmp_path_factory.mktemp("slow_run"), p_exit=0.7))
    app = create_app(cfg, model=run.model, tokenizer=run.tokenizer, policy=run.policy)
    engine = app.state.engine
    calls = []
    engine.before_step = lambda: time.sleep(STEP_S)  # every decoding step slowed down
    engine.eos_ids = []  # and no EOS: every request runs its full length
    real = type(engine).result

    def result(batch, row):
        res = real(engine, batch, row)
        calls.append(res)
        return res

    engine.result = result
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", app, calls
    srv.should_exit = True
    thread.join(timeout=30)


def _timed(chunks):
    t0, out = time.perf_counter(), []
    for chunk in chunks:
        out.append((time.perf_counter() - t0, chunk))
    return out


def _assert_streamed(timed, n_tokens=64):
    first, last = timed[0][0], timed[-1][0]
    assert last > n_tokens * STEP_S * 0.8  # the generation really took a while
    assert first < 0.5 * last, (first, last)  # and the first piece came long before the end


def test_openai_stream_is_real(slow_server):
    import openai

    url, _, _ = slow_server
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    kw = dict(model="greencode", prompt=PROMPT, max_tokens=64, temperature=0)
    timed = _timed(oa.completions.create(stream=True, **kw))
    _assert_streamed(timed)
    text_chunks = [c for _, c in timed if c.choices and c.choices[0].text]
    assert len(text_chunks) >= 16
    assert "".join(c.choices[0].text for _, c in timed if c.choices) == oa.completions.create(**kw).choices[0].text


def test_ollama_stream_is_real(slow_server):
    import ollama

    url, _, _ = slow_server
    ol = ollama.Client(host=url)
    opts = {"num_predict": 64, "temperature": 0}
    timed = _timed(ol.generate(model="greencode", prompt=PROMPT, options=opts, stream=True))
    _assert_streamed(timed)
    assert timed[-1][1].done and sum(1 for _, p in timed if p.response) >= 16
    plain = ol.generate(model="greencode", prompt=PROMPT, options=opts, stream=False)
    assert "".join(p.response for _, p in timed) == plain.response and plain.eval_count == 64


def test_tgi_stream_is_real_with_the_inference_client(slow_server):
    from huggingface_hub import InferenceClient

    url, _, _ = slow_server
    client = InferenceClient(base_url=url)
    timed = _timed(client.text_generation(PROMPT, max_new_tokens=64, stream=True))
    _assert_streamed(timed)
    assert len(timed) == 64 + 1  # one event per token, then the last with generated_text
    assert "".join(t for _, t in timed) == client.text_generation(PROMPT, max_new_tokens=64)


def test_client_hanging_up_stops_the_generation(slow_server):
    url, app, calls = slow_server
    n = len(calls)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 64, "stream": True,
                                                       "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while (len(calls) == n or app.state.scheduler.in_flight) and time.monotonic() < deadline:
        time.sleep(0.02)
    res = calls[-1]
    assert res.finish_reason == "cancelled" and len(res.tokens) < 48, (res.finish_reason, len(res.tokens))
    assert app.state.scheduler.in_flight == 0


def test_api_contract_schemathesis_finds_nothing(server, tmp_path):
    """``schemathesis run --checks all`` against the live server (its fuzzing phase, fixed seed, 20
    examples per operation; the coverage and stateful phases, 35 s more, were run by hand: README):
    every schema-valid body is served, every invalid one refused, every answer as documented (status,
    content type, SSE events, Allow on 405)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    proc = subprocess.run([exe, "run", f"{server.url}/openapi.json", "--checks", "all", "--max-examples", "20", "--phases", "examples,fuzzing",
                           "--seed", "1", "--no-color", "--workers", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout or "passed" in proc.stdout, proc.stdout[-2000:]
