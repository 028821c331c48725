"""The byte-level BPE (special tokens single ids, exact round trip, reuse, tokenizer.path)
and completion samples (paper token protocol and CodeXGLUE line-level), seeded."""

import shutil
import sysconfig
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from greencode.config import config_from_dict
from greencode.data import (
    code_text, encode_context, encode_record, load_corpus, load_tokenizer, make_samples, prepare_data,
    samples_for_config, tokenize_java_source, tokenize_python_source,
)
from greencode.data.tokenizer import TOKENIZER_MANIFEST, prepare_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "colorsys.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py", "numbers.py",
           "queue.py", "sched.py", "stat.py", "tty.py", "getopt.py", "netrc.py", "calendar.py", "cmd.py"]
MARKERS = ["<s>", "</s>", "<pad>", "<EOL>", "<STR_LIT>", "<NUM_LIT>", "<CHAR_LIT>"]


def small_cfg(root: Path, **over):
    src = root / "src"
    if not src.exists():
        src.mkdir(parents=True)
        for m in MODULES:
            shutil.copy(STDLIB / m, src / m)
    d = {"name": "t", "seed": 7, "run_dir": str(root / "run"),
         "data": {"local_path": str(src), "validation_fraction": 0.15, "test_fraction": 0.25},
         "tokenizer": {"vocab_size": 400}}
    for k, v in over.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = small_cfg(root)
    corpus_dir, tok_dir = prepare_data(cfg, progress=False)
    return cfg, corpus_dir, tok_dir


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_loads_with_auto_and_markers_are_single_tokens(prepared):
    cfg, _, tok_dir = prepared
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = {}
    for m in MARKERS:
        enc = tok(m, add_special_tokens=False)["input_ids"]
        assert len(enc) == 1, (m, enc)
        ids[m] = enc[0]
        assert tok.decode(enc) == m
    assert len(set(ids.values())) == len(MARKERS)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["<s>"], ids["</s>"], ids["<pad>"])
    assert len(tok) == 400
    # the markers survive skip_special_tokens (content, not control tokens); <s> / </s> do not
    text = "<s> x = '<STR_LIT>' <EOL> y = <NUM_LIT> </s>"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == " x = '<STR_LIT>' <EOL> y = <NUM_LIT> "


def test_tokenizer_round_trips_every_record_exactly(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    dsd = load_corpus(cfg)
    for split in ("train", "validation", "test"):
        for rec in dsd[split]:
            text = code_text(rec)
            ids = tok(text)["input_ids"]
            assert tok.decode(ids) == text
            assert ids.count(tok.convert_tokens_to_ids("<EOL>")) == rec["code"].count("<EOL>")
    odd = "s = 'é中😀' <EOL> <STR_LIT:aU+0020b> \t x"
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_encode_context_and_record(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    text = "def f ( x ) : <EOL> return x + <NUM_LIT>"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert encode_context(tok, text) == [tok.bos_token_id] + plain
    cut = encode_context(tok, text, max_tokens=4)
    assert cut == [tok.bos_token_id] + plain[-3:]
    with pytest.raises(ValueError):
        encode_context(tok, text, max_tokens=1)
    rec = {"code": ["<s>", *text.split(" "), "</s>"]}
    assert encode_record(tok, rec) == [tok.bos_token_id] + plain + [tok.eos_token_id]


def test_prepare_reuses_and_retrains_on_change(prepared, tmp_path):
    cfg, corpus_dir, tok_dir = prepared
    manifest = tok_dir / TOKENIZER_MANIFEST
    stamp = manifest.stat().st_mtime_ns
    assert prepare_data(cfg, progress=False) == (corpus_dir, tok_dir)
    assert manifest.stat().st_mtime_ns == stamp
    # same corpus, other vocabulary size, other run dir -> a new tokenizer of that size
    cfg2 = small_cfg(Path(cfg.run_dir).parent, run_dir=str(tmp_path / "run2"), tokenizer={"vocab_size": 320})
    _, tok_dir2 = prepare_data(cfg2, progress=False)
    assert len(load_tokenizer(cfg2)) == 320 and tok_dir2 != tok_dir


def test_tokenizer_path_is_loaded_not_trained(prepared, tmp_path):
    cfg, _, tok_dir = prepared
    own = tmp_path / "own_tokenizer"
    shutil.copytree(tok_dir, own)
    cfg2 = small_cfg(Path(cfg.run_dir).parent, run_dir=str(tmp_path / "run3"), tokenizer={"path": str(own)})
    out = prepare_tokenizer(cfg2, {"content_hash": "irrelevant"})
    info = (out / TOKENIZER_MANIFEST).read_text()
    assert '"kind": "pretrained"' in info and str(own) in info
    t1, t2 = load_tokenizer(cfg2), AutoTokenizer.from_pretrained(str(own))
    assert t1.get_vocab() == t2.get_vocab()
    # unloadable path: a clear error naming the setting
    (tmp_path / "empty").mkdir()
    cfg3 = small_cfg(Path(cfg.run_dir).parent, run_dir=str(tmp_path / "run4"),
                     tokenizer={"path": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        prepare_tokenizer(cfg3, {})


def test_load_tokenizer_missing_says_how_to_build(tmp_path):
    cfg = config_from_dict({"name": "t", "run_dir": str(tmp_path / "run")})
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        load_tokenizer(cfg)


# --------------------------------------------------------------------------- samples
def test_token_samples_follow_the_paper_protocol(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    split = load_corpus(cfg)["test"]
    samples = make_samples(split, tok, num_samples=5, seed=3, context_fraction=0.2, max_context_tokens=10_000,
                           max_new_tokens=15)
    assert 1 <= len(samples) <= 5
    for s in samples:
        rec = split[s.record_index]
        body = rec["code"][1:-1]
        n = int(len(body) * 0.2)
        assert s.context_text == " ".join(body[:n])
        assert s.context_ids == encode_context(tok, s.context_text)
        assert len(s.reference_ids) == 15 and s.context_tokens_dropped == 0
        # the reference continues the context exactly in the ground truth
        assert code_text(rec).startswith(s.context_text + s.reference_text)
        assert s.reference_text == tok.decode(s.reference_ids) and s.reference_text.startswith(" ")
        assert s.language == "python" and s.mode == "token" and s.path == rec["path"]


def test_samples_are_seeded(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    split = load_corpus(cfg)["test"]
    a = [s.to_dict() for s in make_samples(split, tok, num_samples=4, seed=11)]
    b = [s.to_dict() for s in make_samples(split, tok, num_samples=4, seed=11)]
    c = [s.to_dict() for s in make_samples(split, tok, num_samples=4, seed=12)]
    assert a == b
    assert [x["id"] for x in a] != [x["id"] for x in c]


def test_context_is_left_truncated_keeping_bos(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    split = load_corpus(cfg)["test"]
    full = make_samples(split, tok, num_samples=3, seed=0, max_context_tokens=10_000)
    cut = make_samples(split, tok, num_samples=3, seed=0, max_context_tokens=16)
    assert [s.id for s in full] == [s.id for s in cut]
    for f, c in zip(full, cut):
        assert len(c.context_ids) == 16 and c.context_ids[0] == tok.bos_token_id
        assert c.context_ids[1:] == f.context_ids[-15:]
        assert c.context_tokens_dropped == len(f.context_ids) - 16
        assert f.context_text.endswith(c.context_text)
        assert c.reference_ids == f.reference_ids


def _dataset(records):
    return datasets.Dataset.from_dict({k: [r[k] for r in records] for k in ("id", "path", "code", "language")})


def test_line_samples_python_and_java(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    py = tokenize_python_source("import os\nx = 1\ndef f(a, b):\n    return os.path.join(a, b)\ny = f('a', 'b')\n")
    java = tokenize_java_source("class A { int x = 1; void f() { g(x, 2); } }")
    ds = _dataset([{"id": "p", "path": "p.py", "code": ["<s>", *py, "</s>"], "language": "python"},
                   {"id": "j", "path": "J.java", "code": ["<s>", *java, "</s>"], "language": "java"}])
    got = {s.language: s for s in make_samples(ds, tok, num_samples=2, seed=0, mode="line", context_fraction=0.3)}
    p, j = got["python"], got["java"]
    ref = p.extra["reference_code_tokens"]
    assert "<EOL>" not in ref and p.reference_text.strip() == " ".join(ref)
    start, k = p.extra["line_start"], p.extra["typed_tokens"]
    body = py
    assert start == 0 or body[start - 1] == "<EOL>"
    assert start >= int(len(body) * 0.3) and k >= 1
    end = start + k + len(ref)
    assert end == len(body) or body[end] == "<EOL>"  # the reference runs to the end of the line
    assert p.context_text == " ".join(body[:start + k])
    jref = j.extra["reference_code_tokens"]
    assert jref[-1] in (";", "{", "}") and not any(t in (";", "{", "}") for t in jref[:-1])
    assert j.reference_text == tok.decode(j.reference_ids)


def test_short_records_are_skipped_and_shortfall_logged(prepared, caplog):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    ds = _dataset([{"id": "a", "path": "a.py", "code": ["<s>", "x", "</s>"], "language": "python"},
                   {"id": "b", "path": "b.py", "code": ["<s>", "x", "=", "<NUM_LIT>", "</s>"], "language": "python"}])
    with caplog.at_level("WARNING"):
        assert make_samples(ds, tok, num_samples=3, seed=0) == []
    assert "only 0 of the 3" in caplog.text
    with pytest.raises(ValueError, match="mode"):
        make_samples(ds, tok, num_samples=1, seed=0, mode="block")


def test_samples_for_config_uses_eval_section(prepared):
    cfg, _, _ = prepared
    tok = load_tokenizer(cfg)
    cfg2 = small_cfg(Path(cfg.run_dir).parent, eval={"num_samples": 2, "sample_seed": 5, "max_new_tokens": 6,
                                                     "split": "validation"})
    got = samples_for_config(cfg2, tok)
    want = make_samples(load_corpus(cfg)["validation"], tok, num_samples=2, seed=5, max_new_tokens=6)
    assert [s.to_dict() for s in got] == [s.to_dict() for s in want] and len(got) >= 1
    assert all(len(s.reference_ids) == 6 for s in got)


def test_source_mode_samples_are_the_file_text_cut_at_a_token_boundary():
    import sysconfig
    from pathlib import Path

    from greencode.data import lexers
    from greencode.data.samples import make_samples
    from greencode.data.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [lexers.universal_newlines((stdlib / n).read_text(encoding="utf-8"))
             for n in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py")]
    tok = train_bpe(texts, 600, content_tokens=())
    assert "<EOL>" not in tok.get_vocab() and tok.decode(tok("a <EOL> b")["input_ids"]) == "a <EOL> b"
    split = [{"id": str(i), "path": f"f{i}.py", "language": "python", "code": lexers.wrap(lexers.source_pieces(t, "python"))}
             for i, t in enumerate(texts)]
    samples = make_samples(split, tok, num_samples=5, seed=0, max_new_tokens=12, max_context_tokens=100000, sep="")
    assert len(samples) == 5
    for s in samples:
        original = texts[s.record_index]
        # context + reference is the file's own text from its start (no separating space is added)
        assert original.startswith(s.context_text + s.reference_text)
        assert not s.context_text[-1:].isspace() or s.context_text.endswith("\n")
        assert len(s.reference_ids) == 12 and s.reference_ids == tok(s.reference_text)["input_ids"][:12]
    lines = make_samples(split, tok, num_samples=3, seed=0, mode="line", max_context_tokens=100000, sep="")
    for s in lines:
        original = texts[s.record_index]
        assert original.startswith(s.context_text + s.reference_text)
        assert "\n" not in s.reference_text and original[len(s.context_text + s.reference_text)] == "\n"
