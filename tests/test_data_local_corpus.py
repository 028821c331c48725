"""Local corpus building: skips counted by reason, dedup, deterministic hash splits, zip ==
directory, kept literals, worker pool, manifest and reuse."""

import zipfile
from pathlib import Path

import pytest

from greencode.config import config_from_dict
from greencode.data import build_local_corpus, code_text, load_corpus, prepare_corpus, read_manifest
from greencode.data import local as local_mod
from greencode.data.local import find_jdk_src_zip, list_source_files, resolve_source, split_of

GOOD = {
    "pkg/alpha.py": "import os\n\n\ndef alpha(x, y=2):\n    return os.path.join(x, 'a') * y\n",
    "pkg/beta.py": "class Beta:\n    def run(self):\n        return [i ** 2 for i in range(10)]\n",
    "gamma.py": "@decorator\ndef g(a, *args, **kw):\n    s = f'{a}' + 'x'\n    return s, 3.5, 'x'\n",
    "delta.py": "def delta(items):\n    total = 0\n    for it in items:\n        total += it\n    return total\n",
}
BAD = {
    "copy_of_alpha.py": GOOD["pkg/alpha.py"].encode(),  # duplicate
    "latin1.py": "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\nprint(name, name, name)\n".encode("latin-1"),
    "unclosed.py": b"def f(a, b:\n    return a + b + a + b\n",  # does not tokenize
    "nosyntax.py": b"x = = 1 + 2 + 3 + 4 + 5 + 6\n",  # tokenizes, does not parse
    "empty.py": b"",
    "only_comment.py": b"# nothing here\n",
    "short.py": b"x = 1\n",  # 3 tokens < min_file_tokens
    "site-packages/vendored.py": GOOD["delta.py"].encode() + b"# vendored\n",  # always excluded
    "notes.txt": b"not python",
}


def make_tree(root: Path, files=None) -> Path:
    files = files or {**{k: v.encode() for k, v in GOOD.items()}, **BAD}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def build(src, **kw):
    args = dict(min_file_tokens=5, validation_fraction=0.0, test_fraction=0.0, progress=False)
    args.update(kw)
    return build_local_corpus(src, "python", **args)


def test_counts_by_reason_and_records(tmp_path):
    src = make_tree(tmp_path / "src")
    b = build(src)
    assert b.files_found == 11  # 4 good + 7 bad .py files; site-packages and .txt not listed
    assert b.files_examined == 11 and b.files_used == 4
    assert b.skipped == {"not_utf8": 1, "empty": 2, "tokenize_error": 1, "syntax_error": 1, "too_short": 1,
                         "duplicate": 1}
    recs = b.splits["train"]
    assert [r["path"] for r in recs] == sorted(["pkg/alpha.py", "pkg/beta.py", "gamma.py", "delta.py"])
    for r in recs:
        assert r["code"][0] == "<s>" and r["code"][-1] == "</s>"
        assert r["num_tokens"] == len(r["code"]) - 2 and r["language"] == "python"
    gamma = next(r for r in recs if r["path"] == "gamma.py")
    assert code_text(gamma) == ("@ decorator <EOL> def g ( a , * args , ** kw ) : <EOL> s = f'<STR_LIT>' + "
                                "'<STR_LIT>' <EOL> return s , <NUM_LIT> , '<STR_LIT>'")


def test_duplicate_keeps_one_copy_and_no_syntax_check_keeps_parse_failures(tmp_path):
    src = make_tree(tmp_path / "src")
    b = build(src, syntax_check=False)
    paths = {r["path"] for r in b.splits["train"]}
    assert "nosyntax.py" in paths
    assert len({"pkg/alpha.py", "copy_of_alpha.py"} & paths) == 1


def test_size_filters(tmp_path):
    src = make_tree(tmp_path / "src")
    # token counts: alpha 27, beta 24, gamma 28, delta 23 (short.py 3)
    b = build(src, min_file_tokens=24, max_file_tokens=27)
    assert {r["path"]: r["num_tokens"] for r in b.splits["train"]} == {"pkg/alpha.py": 27, "pkg/beta.py": 24}
    assert b.skipped["too_short"] == 2 and b.skipped["too_long"] == 1


def test_exclude_patterns(tmp_path):
    src = make_tree(tmp_path / "src")
    b = build(src, exclude=["pkg/*"])
    assert b.files_found == 9
    assert not any(r["path"].startswith("pkg/") for r in b.splits["train"])


def test_hash_split_is_deterministic_and_path_based(tmp_path):
    files = {f"m{i:03d}.py": f"def f{i}(a):\n    return a + {i} * a - a / 2\n".encode() for i in range(120)}
    src = make_tree(tmp_path / "src", files)
    b1 = build(src, validation_fraction=0.1, test_fraction=0.2)
    b2 = build(src, validation_fraction=0.1, test_fraction=0.2)
    for s in ("train", "validation", "test"):
        assert [r["path"] for r in b1.splits[s]] == [r["path"] for r in b2.splits[s]]
        for r in b1.splits[s]:
            assert split_of(r["path"], 0.1, 0.2) == s
    n_test, n_val = len(b1.splits["test"]), len(b1.splits["validation"])
    assert 10 <= n_test <= 40 and 3 <= n_val <= 25  # ~24 and ~12 expected
    # a file's split does not depend on the other files
    (src / "m000.py").unlink()
    b3 = build(src, validation_fraction=0.1, test_fraction=0.2)
    for s in ("train", "validation", "test"):
        assert [r["path"] for r in b3.splits[s]] == [r["path"] for r in b1.splits[s] if r["path"] != "m000.py"]


def test_tiny_corpus_fills_empty_splits(tmp_path):
    src = make_tree(tmp_path / "src")
    b = build(src, validation_fraction=0.05, test_fraction=0.05)
    assert all(len(b.splits[s]) >= 1 for s in ("train", "validation", "test"))
    assert sum(len(v) for v in b.splits.values()) == 4
    assert len(b.moved_to_fill_splits) >= 1


def test_zip_equals_directory(tmp_path):
    src = make_tree(tmp_path / "src")
    zpath = tmp_path / "src.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    bd, bz = build(src), build(zpath)
    assert bd.splits == bz.splits
    assert bd.skipped == bz.skipped
    assert list_source_files(zpath, "python")[0].checksum.startswith("crc32:")


def test_max_files_takes_a_fixed_spread_sample(tmp_path):
    files = {f"d{i % 5}/m{i:03d}.py": f"def f{i}(a):\n    return a + {i} * a - a / 2\n".encode() for i in range(60)}
    src = make_tree(tmp_path / "src", files)
    b1, b2 = build(src, max_files=10), build(src, max_files=10)
    assert b1.files_used == 10 and b1.files_examined == 10 and b1.counts()["not_seen"] == 50
    assert b1.splits == b2.splits
    dirs = {r["path"].split("/")[0] for r in b1.splits["train"]}
    assert len(dirs) >= 3  # not the first 10 files in path order (all from d0 .. d1)


def test_keep_frequent_literals_counted_on_train(tmp_path):
    files = {
        "a.py": b"x = 'red'\ny = 'red'\nz = 'blue'\nw = 7\nv = 7\nu = 8\n",
        "b.py": b"p = 'red'\nq = 'green'\nr = 7\ns = 9\nt = 'blue'\n",
    }
    src = make_tree(tmp_path / "src", files)
    b = build(src, keep_frequent_literals=1)
    assert b.kept_literals["str"] == ["red"] and b.kept_literals["num"] == ["7"]
    toks = [t for r in b.splits["train"] for t in r["code"]]
    assert toks.count("'<STR_LIT:red>'") == 3 and toks.count("<NUM_LIT:7>") == 3
    assert "'<STR_LIT>'" in toks and "<NUM_LIT>" in toks
    assert not any(":blue" in t or ":green" in t or ":9" in t for t in toks)


def test_worker_pool_gives_the_same_records(tmp_path, monkeypatch):
    files = {f"m{i:03d}.py": f"def f{i}(a):\n    return a + {i} * a - a / 2\n".encode() for i in range(40)}
    files.update({k: v for k, v in BAD.items()})
    src = make_tree(tmp_path / "src", files)
    serial = build(src, num_workers=1)
    monkeypatch.setattr(local_mod, "MIN_FILES_FOR_POOL", 0)
    pooled = build(src, num_workers=2)
    assert pooled.workers == 2
    assert pooled.splits == serial.splits and pooled.skipped == serial.skipped


def test_java_corpus_from_directory(tmp_path):
    files = {
        "a/A.java": b"package a;\nimport java.util.*;\npublic class A<T> {\n  @Override public String toString() "
                    b"{ return \"A\" + 'c' + 1; }\n}\n",
        "a/Broken.java": b"class B { void f( { }\n",
        "a/Latin.java": "class L { String s = \"caf\xe9\"; int a, b, c, d, e; }\n".encode("latin-1"),
        "a/package-info.java": b"/** docs */\npackage a;\n",
    }
    src = make_tree(tmp_path / "src", files)
    b = build_local_corpus(src, "java", min_file_tokens=5, validation_fraction=0, test_fraction=0, progress=False)
    assert b.files_used == 1
    assert b.skipped == {"not_utf8": 1, "syntax_error": 1, "too_short": 1}
    assert code_text(b.splits["train"][0]) == (
        "package a ; import java . util . * ; public class A < T > { @ Override public String toString ( ) "
        "{ return \"<STR_LIT>\" + '<CHAR_LIT>' + <NUM_LIT> ; } }")


def test_resolve_source_defaults_and_errors(tmp_path, monkeypatch):
    std = resolve_source("python", None)
    assert (std / "os.py").is_file()
    with pytest.raises(FileNotFoundError, match="data.local_path"):
        resolve_source("python", str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not a zip"):
        resolve_source("python", str(tmp_path / "f.txt"))
    # no JDK anywhere: a clear message naming the fix
    monkeypatch.setattr(local_mod, "jdk_src_zip_candidates", lambda: [tmp_path / "jdk" / "lib" / "src.zip"])
    with pytest.raises(FileNotFoundError, match="openjdk-17-source"):
        find_jdk_src_zip()


def test_jdk_candidates_follow_java_home(tmp_path, monkeypatch):
    home = tmp_path / "jdk"
    (home / "lib").mkdir(parents=True)
    with zipfile.ZipFile(home / "lib" / "src.zip", "w") as zf:
        zf.writestr("java.base/X.java", "class X {}")
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert local_mod.jdk_src_zip_candidates()[0] == home / "lib" / "src.zip"
    assert find_jdk_src_zip() == (home / "lib" / "src.zip").resolve()


def test_no_files_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="no .py files"):
        build(tmp_path / "src")


# --------------------------------------------------------------------------- prepare_corpus
def _cfg(tmp_path, src, **data):
    d = {"local_path": str(src), "min_file_tokens": 5, **data}
    return config_from_dict({"name": "t", "run_dir": str(tmp_path / "run"), "data": d})


def test_prepare_corpus_manifest_and_reuse(tmp_path):
    src = make_tree(tmp_path / "src")
    cfg = _cfg(tmp_path, src)
    corpus_dir, m = prepare_corpus(cfg, progress=False)
    assert (corpus_dir / "dataset_dict.json").is_file()
    on_disk = read_manifest(corpus_dir)
    assert on_disk["content_hash"] == m["content_hash"] and on_disk["files"]["used"] == 4
    assert on_disk["files"]["found"] == 11 and on_disk["files"]["seen"] == 11 and on_disk["files"]["skipped_total"] == 7
    assert on_disk["files"]["skipped"]["duplicate"] == 1 and on_disk["language"] == "python"
    assert on_disk["source_path"] == str(src.resolve())
    assert sum(s["records"] for s in on_disk["splits"].values()) == 4
    assert on_disk["tokens_total"] == sum(s["tokens"] for s in on_disk["splits"].values())
    assert on_disk["run"]["config"]["data"]["local_path"] == str(src)
    dsd = load_corpus(cfg)
    assert set(dsd) == {"train", "validation", "test"}
    assert set(dsd["train"].column_names) >= {"id", "path", "code", "num_tokens", "language"}
    assert isinstance(dsd["train"][0]["code"], list)

    stamp = (corpus_dir / "manifest.json").stat().st_mtime_ns
    again_dir, again = prepare_corpus(cfg, progress=False)
    assert again["content_hash"] == m["content_hash"]
    assert (again_dir / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten

    # a changed source file -> rebuilt with new content
    (src / "delta.py").write_text(GOOD["delta.py"] + "\n\ndef more(x):\n    return x * 3 + 1\n")
    _, changed = prepare_corpus(cfg, progress=False)
    assert changed["content_hash"] != m["content_hash"]
    # a changed setting -> rebuilt
    _, raw = prepare_corpus(_cfg(tmp_path, src, literal_mode="raw"), progress=False)
    assert raw["content_hash"] != changed["content_hash"] and raw["literal_mode"] == "raw"


def test_load_corpus_missing_says_how_to_build(tmp_path):
    cfg = config_from_dict({"name": "t", "run_dir": str(tmp_path / "run")})
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        load_corpus(cfg)
