"""Fill in the middle: the training transformation (StarCoder's PSM/SPM), packing with it, the
tokenizer's sentinels, the serving engine's prompt layout (every editor format), and what the
in-process app answers (the model's own greedy continuation of that layout)."""

import random

import pytest
from fastapi.testclient import TestClient

from greencode.config import ConfigError, FimConfig, load_config
from greencode.data.fim import FIM_TOKENS, OVERHEAD, fim_prompt, fim_transform, sentinel_ids
from greencode.data.tokenizer import train_bpe
from greencode.utils import REPO_ROOT

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
TEXTS = ["def add(a, b):\n    return a + b\n\n\nclass Box:\n    def __init__(self, x):\n        self.x = x\n"] * 40
PRE, MID, SUF = 9001, 9002, 9003
EOS = 2


def _split(out, psm_only=False):
    """(prefix, middle, suffix, order) read back from a transformed chunk (a PSM chunk with an empty
    prefix reads as SPM with an empty prefix: the same tokens)."""
    assert out[0] == PRE and out[-1] == EOS
    if out[1] == SUF and not psm_only:  # SPM: <pre> <suf> S <mid> P M <eos>
        m = out.index(MID)
        return None, out[m + 1:-1], out[2:m], "spm"
    s, m = out.index(SUF), out.index(MID)
    return out[1:s], out[m + 1:-1], out[s + 1:m], "psm"


def test_fim_transform_keeps_the_length_and_every_token_in_place():
    rng = random.Random(0)
    orders = set()
    for trial in range(400):
        ids = [10 + i for i in range(rng.randint(OVERHEAD + 2, 60))]  # distinct, none a sentinel
        out = fim_transform(ids, rng, sentinels=(PRE, MID, SUF), eos=EOS, spm_rate=0.5)
        assert len(out) == len(ids)
        body = ids[:len(ids) - OVERHEAD]
        p, m, s, order = _split(out)
        orders.add(order)
        if order == "psm":
            assert p + m + s == body
        else:  # SPM puts prefix and middle together after the suffix
            assert out[out.index(MID) + 1:-1] + s == body
    assert orders == {"psm", "spm"}
    with pytest.raises(ValueError, match="more than"):
        fim_transform([1, 2, 3, 4, 5], rng, sentinels=(PRE, MID, SUF), eos=EOS)


def test_fim_transform_cut_points_are_uniform():
    """Two uniform cuts: the middle's expected share is 1/3, the prefix's 1/3."""
    rng = random.Random(1)
    ids = list(range(10, 110))
    mids, pres = [], []
    for _ in range(3000):
        p, m, s, _ = _split(fim_transform(ids, rng, sentinels=(PRE, MID, SUF), eos=EOS), psm_only=True)
        mids.append(len(m))
        pres.append(len(p))
    n = len(ids) - OVERHEAD
    assert abs(sum(mids) / len(mids) / n - 1 / 3) < 0.02 and abs(sum(pres) / len(pres) / n - 1 / 3) < 0.02


def test_tokenizer_sentinels_are_appended_and_leave_every_other_id_alone():
    with_fim, without = train_bpe(TEXTS, 320, fim_tokens=True), train_bpe(TEXTS, 320)
    assert sentinel_ids(without) is None
    ids = sentinel_ids(with_fim)
    assert ids is not None and sorted(ids) == list(range(len(without), len(without) + 3))
    text = "def add(a, b):\n    return a + b\n"
    assert with_fim(text)["input_ids"] == without(text)["input_ids"]
    marked = with_fim("<fim_prefix>x<fim_suffix>y<fim_middle>")["input_ids"]
    assert [t for t in marked if t in ids] == list(ids[i] for i in (0, 2, 1))  # one token each, prefix-suffix-middle
    assert with_fim.decode(marked, skip_special_tokens=True) == "xy"
    assert all(with_fim.convert_ids_to_tokens(i) in FIM_TOKENS for i in ids)


def test_packing_with_fim_turns_a_seeded_share_of_chunks():
    from datasets import Dataset

    from greencode.training.data import pack_split

    tok = train_bpe(TEXTS, 320, fim_tokens=True)
    pre, mid, suf = sentinel_ids(tok)
    ds = Dataset.from_dict({"code": [t * (1 + i % 3) for i, t in enumerate(TEXTS * 5)]})
    plain = pack_split(ds, tok, 32, seed=3, sep="")
    fim = pack_split(ds, tok, 32, seed=3, sep="", fim=FimConfig(rate=0.5, spm_rate=0.0))
    again = pack_split(ds, tok, 32, seed=3, sep="", fim=FimConfig(rate=0.5, spm_rate=0.0))
    assert len(plain) == len(fim) > 100
    n_fim = 0
    for a, b, c in zip(*(list(d.with_format(None)["input_ids"]) for d in (plain, fim, again))):
        assert len(b) == 32 and b == c
        if b[0] == pre:
            n_fim += 1
            s, m = b.index(suf), b.index(mid)
            assert b[1:s] + b[m + 1:-1] + b[s + 1:m] == a[:32 - OVERHEAD] and b[-1] == tok.eos_token_id
        else:
            assert b == a
    assert 0.35 < n_fim / len(fim) < 0.65
    with pytest.raises(ValueError, match="tokenizer.fim_tokens=true"):
        pack_split(ds, train_bpe(TEXTS, 320), 32, fim=FimConfig(rate=0.5))


def test_fim_config_is_checked():
    cfg = load_config(SMOKE, ["pretrain.fim.rate=0.5", "tokenizer.fim_tokens=true"])
    assert cfg.pretrain.fim.rate == 0.5 and cfg.finetune.fim.rate == 0.0
    with pytest.raises(ConfigError, match="pretrain.fim.rate"):
        load_config(SMOKE, ["pretrain.fim.rate=1.5"])
    with pytest.raises(ConfigError, match="unknown config key 'pretrain.fim.rat'"):
        load_config(SMOKE, ["pretrain.fim.rat=0.5"])


# ----------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def fim_run(tmp_path_factory):
    from greencode.serve import load_run
    from greencode.serve.demo import build_demo_run

    cfg = load_config(SMOKE, ["hardware.num_threads=1"])
    root = build_demo_run(cfg, tmp_path_factory.mktemp("fim_run"), p_exit=0.7, fim=True)
    return cfg, load_run(cfg, root)


def _engine(fim_run):
    from greencode.serve.engine import Engine

    cfg, r = fim_run
    # source-text prompts (the embedded default's format): the layout is plain tokenizer ids
    return Engine(r.model, r.tokenizer, r.policy, serve_cfg=cfg.serve, decoding_cfg=cfg.decoding,
                  literal_mode="source")


PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\n\nclass Box:\n    pass\n"


def test_every_editor_fim_format_becomes_the_models_own_layout(fim_run):
    eng = _engine(fim_run)
    tok = eng.tokenizer
    pre, mid, suf = eng.fim_ids
    # SPM (the default layout): <fim_prefix> <fim_suffix> S <fim_middle> <s> P, the middle continuing the prefix
    want = [pre, suf] + tok(SUFFIX)["input_ids"] + [mid, tok.bos_token_id] + tok(PREFIX)["input_ids"]
    assert fim_prompt(tok, PREFIX, SUFFIX) == want  # the training-side helper agrees
    psm = [pre, tok.bos_token_id] + tok(PREFIX)["input_ids"] + [suf] + tok(SUFFIX)["input_ids"] + [mid]
    assert fim_prompt(tok, PREFIX, SUFFIX, layout="psm") == psm
    for prompt, suffix in ((f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", None),  # StarCoder / llm-vscode
                           (f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>", None),  # CodeLlama
                           (f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>", None),  # Qwen
                           (PREFIX, SUFFIX)):  # Ollama / OpenAI / Mistral suffix field
        ids, info = eng.encode(prompt, 8, suffix=suffix)
        assert ids == want, prompt
        assert info["fim"] is True and "suffix_ignored" not in info
    assert eng.encode(PREFIX, 8)[0] == [tok.bos_token_id] + tok(PREFIX)["input_ids"]  # no suffix: left to right
    eng.fim_layout = "psm"  # serve.fim_layout=psm
    assert eng.encode(PREFIX, 8, suffix=SUFFIX)[0] == psm


def test_fim_prompt_truncation_keeps_the_code_nearest_the_cursor(fim_run):
    eng = _engine(fim_run)
    pre, mid, suf = eng.fim_ids
    prefix = "".join(f"x{i} = {i}\n" for i in range(300))
    suffix = "".join(f"y{i} = {i}\n" for i in range(300))
    ids, info = eng.encode(prefix, 16, num_ctx=128, suffix=suffix)
    assert len(ids) == 128 - 16 and info["prompt_truncated"] is True
    m = ids.index(mid)
    assert ids[:2] == [pre, suf] and ids[m + 1] == eng.tokenizer.bos_token_id
    room = 128 - 16 - 4
    assert info["suffix_tokens"] == m - 2 == room // 4
    assert eng.tokenizer.decode(ids[2:m]).startswith("y0 = 0\ny1 = 1\n")  # the suffix keeps its head
    assert eng.tokenizer.decode(ids[m + 2:]).endswith("x298 = 298\nx299 = 299\n")  # the prefix keeps its tail
    short, info2 = eng.encode("z = ", 16, num_ctx=128, suffix=suffix)  # a short prefix leaves the suffix more room
    assert len(short) == 128 - 16 and info2["suffix_tokens"] > room // 4


def test_fim_routes_answer_with_the_models_continuation_of_the_layout(fim_run):
    import torch

    from greencode.decoding import NeverExit, generate
    from greencode.serve import create_app

    cfg, r = fim_run
    eng = _engine(fim_run)
    ids, _ = eng.encode(PREFIX, 6, suffix=SUFFIX)
    with torch.no_grad():
        res = generate(r.model, ids, NeverExit(), 6, eos_token_id=eng.eos_ids)
    want = r.tokenizer.decode(res.tokens, skip_special_tokens=True)
    knobs = {"RL_agent_thresh": 1.0}
    with TestClient(create_app(cfg, engine=eng)) as c:
        assert c.get("/health").json()["fill_in_the_middle"] is True
        bodies = {
            "/v1/fim/completions": {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6, "temperature": 0, **knobs},
            "/v1/completions": {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6, "temperature": 0, **knobs},
            "/api/generate": {"model": "x", "prompt": PREFIX, "suffix": SUFFIX, "raw": True, "stream": False,
                              "options": {"num_predict": 6, "temperature": 0, **knobs}},
            "/generate": {"inputs": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
                          "parameters": {"max_new_tokens": 6, "do_sample": False, "return_full_text": False, **knobs}},
        }
        for path, body in bodies.items():
            out = c.post(path, json=body)
            assert out.status_code == 200, out.text
            j = out.json()
            text = {"/v1/fim/completions": lambda: j["choices"][0]["message"]["content"],
                    "/v1/completions": lambda: j["choices"][0]["text"], "/api/generate": lambda: j["response"],
                    "/generate": lambda: j["generated_text"]}[path]()
            assert text == want, path
        ol = c.post("/api/generate", json=bodies["/api/generate"]).json()
        assert ol["context"][:len(ids)] == ids and ol["greencode"]["fim"] is True
        with c.stream("POST", "/v1/fim/completions", json={**bodies["/v1/fim/completions"], "stream": True}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            events = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
        import json

        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["object"] == "chat.completion.chunk" and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == want
        bad = c.post("/v1/fim/completions", json={"suffix": SUFFIX})
        assert bad.status_code == 422 and "prompt" in bad.text


# ----------------------------------------------------------------------------- single-line infilling
FILES = [
    "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\nprint(read('x'))\n",
    "class Box:\n    def __init__(self, x):\n        self.x = x\n\n    def get(self):\n        return self.x\n",
    "def add(a, b):\n    total = a + b\n    return total\n\n\nresult = add(1, 2)\nprint(result)\n",
] * 4


def test_infill_samples_hold_out_one_whole_line(fim_run):
    from datasets import Dataset

    from greencode.eval.infill import make_infill_samples

    _, r = fim_run
    tok = r.tokenizer
    pre, mid, suf = sentinel_ids(tok)
    ds = Dataset.from_dict({"code": FILES, "id": [str(i) for i in range(len(FILES))]})
    samples = make_infill_samples(ds, tok, num_samples=8, seed=0, max_context_tokens=256, max_new_tokens=32)
    assert len(samples) == 8 and len({s.id for s in samples}) == 8
    for s in samples:
        text = FILES[int(s.id.split(":")[0])]
        assert s.fim_ids[:2] == [pre, suf] and s.l2r_ids[0] == tok.bos_token_id
        m = s.fim_ids.index(mid)
        assert s.fim_ids[m + 1:] == s.l2r_ids  # the control reads exactly the same prefix tokens
        assert s.psm_ids == [pre] + s.l2r_ids + [suf] + s.fim_ids[2:m] + [mid]
        prefix, suffix = tok.decode(s.l2r_ids[1:]), tok.decode(s.fim_ids[2:m])
        assert prefix + s.reference + suffix == text  # short files: nothing cut
        line = text.split("\n")[s.line_index]
        assert line == s.indent + s.reference and s.reference == s.reference.rstrip() and s.reference.strip()
        # the cut is a token boundary of the whole file: the prefix's and middle's tokens are the file's own
        whole = tok(prefix + s.reference)["input_ids"]
        assert whole == tok(prefix)["input_ids"] + tok(s.reference)["input_ids"]
        assert suffix.startswith("\n")
    again = make_infill_samples(ds, tok, num_samples=8, seed=0, max_context_tokens=256, max_new_tokens=32)
    assert [s.fim_ids for s in again] == [s.fim_ids for s in samples]
    later = make_infill_samples(ds, tok, num_samples=4, seed=0, max_context_tokens=256, max_new_tokens=32, offset=8)
    assert not {s.id for s in later} & {s.id for s in samples}


def test_infill_runs_every_method_and_the_oracle_matches_the_full_model(fim_run):
    import torch
    from datasets import Dataset

    from greencode.decoding import FixedExit, NeverExit, OracleExit, generate
    from greencode.eval.infill import NO_SUFFIX, PSM, make_infill_samples, prediction_text, run_infill, summarize

    _, r = fim_run
    tok, model = r.tokenizer, r.model
    ds = Dataset.from_dict({"code": FILES, "id": [str(i) for i in range(len(FILES))]})
    samples = make_infill_samples(ds, tok, num_samples=6, seed=1, max_context_tokens=256, max_new_tokens=16)
    layer = model.exit_layers[0]
    ctrls = {"full": NeverExit(), NO_SUFFIX: NeverExit(), PSM: NeverExit(), f"fixed@{layer}": FixedExit(layer),
             "oracle": OracleExit()}
    recs = run_infill(model, tok, samples, ctrls, max_new_tokens=16, batch_size=4)
    for k, s in enumerate(samples):
        for mid, prompt in (("full", s.fim_ids), (NO_SUFFIX, s.l2r_ids), (PSM, s.psm_ids)):
            with torch.no_grad():
                alone = generate(model, prompt, NeverExit(), 16, eos_token_id=tok.eos_token_id, stop_strings=["\n"],
                                 tokenizer=tok)
            assert recs[mid][k]["prediction"] == prediction_text(tok, alone.tokens) and "\n" not in recs[mid][k]["prediction"]
        assert recs["oracle"][k]["prediction"] == recs["full"][k]["prediction"]
        assert set(recs[f"fixed@{layer}"][k]["exit_layers"]) <= {layer}
    recs["full"][0]["exact_match"] = 1.0  # a known difference: the summary's paired delta must see it
    summary = summarize(recs, model.num_layers, resamples=200, seed=0)
    m = summary["methods"]
    n = len(samples)
    want = (sum(x["exact_match"] for x in recs[NO_SUFFIX]) - sum(x["exact_match"] for x in recs["full"])) / n
    assert m[NO_SUFFIX]["exact_match_minus_full"]["mean"] == pytest.approx(want)
    assert "exact_match_minus_full" not in m["full"] and m["oracle"]["same_line_as_full"]["mean"] == 1.0
    assert m[f"fixed@{layer}"]["layers_skipped_share"] > 0.4 and m["full"]["layers_skipped_share"] == 0.0


def test_infill_script_end_to_end(fim_run, tmp_path):
    """scripts/eval_infill.py on the tiny FIM run with a source-text corpus of the smoke files."""
    import json
    import subprocess
    import sys

    cfg, r = fim_run
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "eval_infill.py"), "--config", str(SMOKE),
           f"run_dir={r.root}", f"results_dir={tmp_path}", "data.literal_mode=source", "eval.infill_samples=4",
           "eval.infill_max_new_tokens=24", "eval.gc_thresholds=[0.5]", "eval.bootstrap_resamples=100",
           "hardware.num_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "infill" / "infill.json").read_text())
    assert set(got["methods"]) == {"full", "full_no_suffix", "full_psm", "fixed@1", "fixed@2", "gc@0.5", "oracle"}
    assert got["meta"]["num_samples"] == 4 and got["run"]["git_commit"]
    assert (tmp_path / "infill" / "infill.md").read_text().startswith("# Single-line infilling")
    bad = subprocess.run(cmd[:4] + [f"run_dir={r.root}", f"results_dir={tmp_path}"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "eval.infill_samples" in bad.stderr


def test_fim_clients_benchmark_smoke(fim_run, tmp_path):
    """The editors' FIM benchmark (scripts/bench_serve.py --fim) against a real server on the tiny run."""
    from greencode.data import prepare_data
    from greencode.bench.serving import run_fim_clients

    _, r = fim_run
    cfg = load_config(SMOKE, [f"run_dir={r.root}", f"results_dir={tmp_path}", "data.literal_mode=source",
                              "hardware.num_threads=1"])
    prepare_data(cfg)
    res = run_fim_clients(cfg, r.root, samples=3, max_new_tokens=24, out_path=tmp_path / "fim.json")
    s = res["summary"]
    assert set(s) == {"llm_vscode", "continue_ollama", "mistral_fim", "openai_suffix", "openai_no_suffix"}
    assert all(v["all_200"] and v["requests"] == 3 for v in s.values()) and res["health_after"]
    assert s["openai_no_suffix"]["answered_as_fim"] == 0
    assert all(s[k]["answered_as_fim"] == 3 for k in ("llm_vscode", "continue_ollama", "mistral_fim", "openai_suffix"))
    # greedy with the full model: Mistral's route and the openai suffix are the same request
    assert [x["answer"] for x in res["records"]["mistral_fim"]] == [x["answer"] for x in res["records"]["openai_suffix"]]
    assert (tmp_path / "fim.json").is_file()


def test_a_reshipped_tokenizer_directory_is_a_new_tokenizer(tmp_path):
    """tokenizer.path pointing at a local directory (the shipped base): its content is in the fingerprint, so a
    base reshipped with the FIM sentinels is copied into the run again instead of the stale copy being reused."""
    from greencode.data.tokenizer import _fingerprint

    d = tmp_path / "base"
    train_bpe(TEXTS, 320).save_pretrained(str(d))
    cfg = load_config(SMOKE, [f"tokenizer.path={d}"])
    before = _fingerprint(cfg, "corpus")
    assert _fingerprint(cfg, "corpus") == before
    train_bpe(TEXTS, 320, fim_tokens=True).save_pretrained(str(d))
    assert _fingerprint(cfg, "corpus") != before
    assert _fingerprint(load_config(SMOKE, ["tokenizer.path=gpt2"]), "c") == _fingerprint(
        load_config(SMOKE, ["tokenizer.path=gpt2"]), "c")  # a hub id: the name alone


def test_infill_summary_separates_boilerplate_exact_matches():
    """The infilling slice reports exact match with the licence-header lines apart (no model needed)."""
    from greencode.eval.infill import render, summarize

    def r(em, bp, pred="x"):
        return {"id": "s", "prediction": pred, "exact_match": em, "edit_similarity": 100.0 * em, "boilerplate": bp,
                "tokens": 2, "exit_layers": [], "decode_steps": 1, "layers_run": 4, "macs_done": 1, "macs_full": 1}

    recs = {"full": [r(1.0, True), r(1.0, False), r(0.0, False), r(1.0, True)],
            "fixed@1": [r(1.0, True), r(0.0, False), r(0.0, False), r(0.0, True)]}
    s = summarize(recs, 4, resamples=200, seed=0)
    full, fixed = s["methods"]["full"], s["methods"]["fixed@1"]
    assert full["exact_match_boilerplate_share"] == pytest.approx(2 / 3) and full["num_samples_no_boilerplate"] == 2
    assert full["exact_match_no_boilerplate"]["mean"] == pytest.approx(0.5)
    assert fixed["exact_match_boilerplate_share"] == 1.0 and fixed["exact_match_no_boilerplate"]["mean"] == 0.0
    d = fixed["exact_match_no_boilerplate_minus_full"]
    assert d["mean"] == pytest.approx(-0.5) and d["ci_low"] <= d["mean"] <= d["ci_high"]
    md = render(s, {"num_samples": 4, "split": "test"})
    assert "EM w/o boilerplate" in md and "other 2 samples" in md


def test_eval_infill_without_a_model_says_so_before_building_the_corpus(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "eval_infill.py"), "--config", str(SMOKE),
                           f"run_dir={run}", f"results_dir={tmp_path / 'results'}", "eval.infill_samples=4"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "no fine-tuned model in" in proc.stderr and "scripts/finetune.py" in proc.stderr
    assert not (run / "corpus").exists() and "Traceback" not in proc.stderr
