"""CodeXGLUE token format from real source text: Python (tokenize, py150 rules) and Java
(tree-sitter-java, javaCorpus rules), on tricky inputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from greencode.data import lexers
from greencode.data.lexers import (
    KEEP_ALL, LexError, SyntaxCheckError, check_python_syntax, finalize_literals, source_to_text,
    tokenize_java_source, tokenize_python_source, wrap,
)

# --------------------------------------------------------------------------- python
SMALL_PY = '''#!/usr/bin/env python
"""Module doc
over two lines."""
import os  # a comment


@dec(1)
def f(a, b='x, y'):
    return a + \\
        b * 2.5
'''

SMALL_PY_TOKENS = [
    "<s>",
    '"""<STR_LIT>"""', "<EOL>",
    "import", "os", "<EOL>",
    "@", "dec", "(", "<NUM_LIT>", ")", "<EOL>",
    "def", "f", "(", "a", ",", "b", "=", "'<STR_LIT>'", ")", ":", "<EOL>",
    "return", "a", "+", "b", "*", "<NUM_LIT>",
    "</s>",
]


def test_small_python_file_exact_tokens():
    assert wrap(tokenize_python_source(SMALL_PY)) == SMALL_PY_TOKENS


def test_python_kept_literals_are_escaped_like_codexglue():
    keep = {"str": ["xU+002CU+0020y"], "num": ["2.5"]}
    toks = tokenize_python_source(SMALL_PY, keep_literals=keep)
    assert "'<STR_LIT:xU+002CU+0020y>'" in toks
    assert "<NUM_LIT:2.5>" in toks and "<NUM_LIT>" in toks  # 1 is not kept
    assert '"""<STR_LIT>"""' in toks  # docstring not kept
    # the two-pass path (keep everything, then finalize) gives the same result
    assert finalize_literals(tokenize_python_source(SMALL_PY, keep_literals=KEEP_ALL), keep) == toks


def test_python_string_prefixes_and_quotes():
    src = 'a = f"x {y!r:>{w}} z" + rb\'\\d+\' + b"by" + R"r" + u\'u\' + Rb"""m\nn"""\n'
    assert tokenize_python_source(src) == [
        "a", "=", 'f"<STR_LIT>"', "+", "rb'<STR_LIT>'", "+", 'b"<STR_LIT>"', "+", 'R"<STR_LIT>"', "+",
        "u'<STR_LIT>'", "+", 'Rb"""<STR_LIT>"""']


def test_python_nested_fstring_is_one_literal():
    src = "x = f'{a:{b}}' + f\"{f'{1}'}\"\n"
    assert tokenize_python_source(src) == ["x", "=", "f'<STR_LIT>'", "+", 'f"<STR_LIT>"']


def test_python_triple_quoted_string_spanning_lines_and_blank_lines():
    src = "s = '''one\n\n  two'''\n\n\n# c\nt = 1\n"
    assert tokenize_python_source(src) == ["s", "=", "'''<STR_LIT>'''", "<EOL>", "t", "=", "<NUM_LIT>"]
    # raw mode keeps the literal as written, newlines included
    assert tokenize_python_source(src, "raw") == ["s", "=", "'''one\n\n  two'''", "<EOL>", "t", "=", "1"]


def test_python_newlines_inside_brackets_become_eol_like_py150():
    # tokenize emits NL inside brackets; CodeXGLUE turns every NEWLINE/NL into <EOL>
    assert tokenize_python_source("x = [1,\n     2]\n") == ["x", "=", "[", "<NUM_LIT>", ",", "<EOL>", "<NUM_LIT>", "]"]


def test_python_crlf_and_cr_line_endings_like_text_mode_reading():
    lf = "def f():\n    s = '''a\nb'''\n    return s\n"
    for eol in ("\r\n", "\r"):
        other = lf.replace("\n", eol)
        assert tokenize_python_source(other) == tokenize_python_source(lf)
        assert tokenize_python_source(other, "raw") == tokenize_python_source(lf, "raw")
    assert "'''a\nb'''" in tokenize_python_source(lf, "raw")


def test_python_line_continuation_has_no_eol():
    assert tokenize_python_source("y = 1 + \\\n    2\n") == ["y", "=", "<NUM_LIT>", "+", "<NUM_LIT>"]


def test_python_decorators_and_numbers():
    src = "@a.b(c=0x1F, d=1_000, e=1e-3j)\nclass K: pass\n"
    assert tokenize_python_source(src) == [
        "@", "a", ".", "b", "(", "c", "=", "<NUM_LIT>", ",", "d", "=", "<NUM_LIT>", ",", "e", "=", "<NUM_LIT>", ")",
        "<EOL>", "class", "K", ":", "pass"]
    assert tokenize_python_source(src, "raw")[7] == "0x1F"


@pytest.mark.parametrize("src", ["def f(:\n    return 1\n", "x = (1,\n", "if x:\n    a\n  b\n", "a = 'abc\n",
                                 "a $ b\n"])
def test_python_broken_input_raises_lexerror(src):
    with pytest.raises(LexError):
        tokenize_python_source(src)


def test_python_syntax_check_separate_from_lexing():
    src = "x = = 1\n"  # lexes fine, does not parse
    assert tokenize_python_source(src) == ["x", "=", "=", "<NUM_LIT>"]
    with pytest.raises(SyntaxCheckError):
        check_python_syntax(src)
    check_python_syntax(SMALL_PY)


def test_python_lenient_prompt_cut_mid_statement():
    assert tokenize_python_source("print(f(x,\n", lenient=True) == ["print", "(", "f", "(", "x", ","]
    assert source_to_text("def f(x):\n    return g(x, 1", "python") == "def f ( x ) : <EOL> return g ( x , 1"


def test_python_bad_literal_mode():
    with pytest.raises(ValueError, match="literal_mode"):
        tokenize_python_source("x = 1\n", literal_mode="weird")


def _python(version: str):
    """A working interpreter of ``version`` (pyenv shims that refuse to run are passed over)."""
    cands = [str(p) for p in sorted(Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python{version}"))]
    if shutil.which(f"python{version}"):
        cands.append(shutil.which(f"python{version}"))
    for exe in cands:
        try:
            if subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=30).returncode == 0:
                return exe
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_python_tokens_identical_on_newer_interpreters(version, tmp_path):
    """Python 3.12 splits f-strings into FSTRING_START/MIDDLE/END; the lexer must give the
    same tokens as on this interpreter (the module needs only the standard library)."""
    exe = _python(version)
    if exe is None:
        pytest.skip(f"no python{version} on this machine")
    src = SMALL_PY + "z = f'{a!r:>{w}}' + f\"{f'{1}'}\" + rb'\\x'\nq = 1if x else 2\n"
    script = tmp_path / "run.py"
    script.write_text(
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('lx', {str(Path(lexers.__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "src = sys.stdin.read()\n"
        "print(json.dumps([m.tokenize_python_source(src), m.tokenize_python_source(src, 'raw')]))\n")
    out = subprocess.run([exe, str(script)], input=src, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [tokenize_python_source(src), tokenize_python_source(src, "raw")]


# --------------------------------------------------------------------------- java
SMALL_JAVA = r'''package a.b;
/** Javadoc. */
@SuppressWarnings("unchecked")
class Box<T extends Comparable<? super T>> {
    char c = 'x', nl = '\n', u = '\u0041';
    String s = """
        hi, "there"
        """;
    long n = 0x1FL; // trailing
    Map<String, List<Integer>> m = new HashMap<>();
    int sh = n >> 2;
}
'''

SMALL_JAVA_TOKENS = [
    "package", "a", ".", "b", ";",
    "@", "SuppressWarnings", "(", '"<STR_LIT>"', ")",
    "class", "Box", "<", "T", "extends", "Comparable", "<", "?", "super", "T", ">", ">", "{",
    # CodeXGLUE: a char literal is <CHAR_LIT> only when its content is one character after
    # unicode-escape translation; '\n' (two characters) comes out as '<STR_LIT>'
    "char", "c", "=", "'<CHAR_LIT>'", ",", "nl", "=", "'<STR_LIT>'", ",", "u", "=", "'<CHAR_LIT>'", ";",
    "String", "s", "=", '"""<STR_LIT>"""', ";",
    "long", "n", "=", "<NUM_LIT>", ";",
    "Map", "<", "String", ",", "List", "<", "Integer", ">", ">", "m", "=", "new", "HashMap", "<", ">", "(", ")", ";",
    "int", "sh", "=", "n", ">>", "<NUM_LIT>", ";",
    "}",
]


def test_small_java_file_exact_tokens():
    toks = tokenize_java_source(SMALL_JAVA, syntax_check=True)
    assert toks == SMALL_JAVA_TOKENS
    assert "<EOL>" not in toks


def test_java_raw_mode_keeps_literals_and_text_block():
    toks = tokenize_java_source(SMALL_JAVA, "raw")
    assert "'\\n'" in toks and "0x1FL" in toks and '"unchecked"' in toks
    assert '"""\n        hi, "there"\n        """' in toks


def test_java_kept_literals():
    keep = {"str": ["unchecked"], "num": ["2"], "char": ["x"]}
    toks = tokenize_java_source(SMALL_JAVA, keep_literals=keep)
    assert '"<STR_LIT:unchecked>"' in toks and "<NUM_LIT:2>" in toks and "'<CHAR_LIT:x>'" in toks
    assert "'<CHAR_LIT>'" in toks  # 'A' (from \u0041) is not kept


def test_java_unicode_escape_outside_literals():
    # JLS 3.3: \u0061 in an identifier is the letter a
    assert tokenize_java_source("class A { int \\u0061bc = 1; }", syntax_check=True) == [
        "class", "A", "{", "int", "abc", "=", "<NUM_LIT>", ";", "}"]


def test_java_modern_syntax_parses():
    src = ("record P(int a) {}\nclass C { Object f(Object o) { var y = switch (o) { case Integer i when i > 0 -> 1;"
           " default -> 2; }; return (Runnable) () -> {}; } }\n")
    toks = tokenize_java_source(src, syntax_check=True)
    assert toks[:3] == ["record", "P", "("] and "->" in toks and "var" in toks


def test_java_syntax_error_detected_only_when_asked():
    src = "class A { void f( { int x = 1; }"
    with pytest.raises(SyntaxCheckError, match="line 1"):
        tokenize_java_source(src, syntax_check=True)
    toks = tokenize_java_source(src)  # lexemes still come out
    assert toks[:3] == ["class", "A", "{"] and "<NUM_LIT>" in toks


def test_translate_unicode_escapes_even_backslashes():
    assert lexers.translate_unicode_escapes("\\u0041") == "A"
    assert lexers.translate_unicode_escapes("\\\\u0041") == "\\\\u0041"  # escaped backslash: not an escape
    assert lexers.translate_unicode_escapes("\\uuu0042") == "B"
    assert lexers.translate_unicode_escapes("\\ud83d\\ude00") == "\U0001F600"


def test_source_to_text_dispatch():
    assert source_to_text("int x = 1;", "java", "normalized") == "int x = <NUM_LIT> ;"
    with pytest.raises(ValueError, match="language"):
        source_to_text("x", "cobol")


# --------------------------------------------------------------------------- source pieces
def test_source_pieces_rebuild_the_file_and_cut_at_token_ends():
    from greencode.data.lexers import source_pieces

    text = ('x = f"{a!r:>{w}} and {b}"  # note\r\nif x:\r\n    y = """doc\r\n  more"""\r\n\r\n    z = 0x1F\r\n')
    pieces = source_pieces(text, "python")
    assert "".join(pieces) == text.replace("\r\n", "\n")
    assert 'f"{a!r:>{w}} and {b}"' in [p.strip() for p in pieces]  # an f-string is one piece
    assert "  # note" in pieces and pieces.count("\n") >= 4  # comments kept; each line break its own piece
    assert ' """doc\n  more"""' in pieces and "    z" in pieces
    # a piece never ends inside whitespace except a line break
    assert all(p.endswith("\n") or not p[-1].isspace() for p in pieces)


def test_source_pieces_roundtrip_real_stdlib_files():
    import sysconfig
    from pathlib import Path

    from greencode.data.lexers import source_pieces, universal_newlines

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / n for n in ("json/encoder.py", "textwrap.py", "string.py", "argparse.py", "dataclasses.py")]
    files = [f for f in files if f.is_file()]
    assert files
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "".join(source_pieces(text, "python")) == universal_newlines(text), f


def test_source_pieces_java_and_bad_input():
    from greencode.data.lexers import LexError, joiner, source_pieces

    java = 'class A {\n  // c\n  String s = "a\\"b"; char c = \'}\';\n  /* x\n y */ int n = 3;\n}\n'
    pieces = source_pieces(java, "java")
    assert "".join(pieces) == java and ' "a\\"b"' in pieces and " '}'" in pieces
    with pytest.raises(LexError):
        source_pieces('s = """never closed\n', "python")
    with pytest.raises(ValueError, match="use python or java"):
        source_pieces("x", "cobol")
    assert joiner("source") == "" and joiner("raw") == " " and joiner("normalized") == " "
