"""Source text -> CodeXGLUE token-level completion tokens.

Python follows CodeXGLUE's ``py150/preprocess.py``: the standard ``tokenize`` module;
comments, INDENT/DEDENT, ENCODING and ENDMARKER dropped; NEWLINE/NL collapsed into one
``<EOL>`` (none at the start or end); whitespace inside a token collapsed to one space;
a string becomes ``<prefix><quote><STR_LIT><quote>`` (``'<STR_LIT>'``, ``f"<STR_LIT>"``,
``'''<STR_LIT>'''``) and a number ``<NUM_LIT>``.

Java follows CodeXGLUE's ``javaCorpus/preprocess.py`` with tree-sitter-java as the lexer
(javalang, which CodeXGLUE used, splits Java 15 text blocks into three strings): comments
dropped, no ``<EOL>``, strings ``"<STR_LIT>"`` (text blocks ``\"\"\"<STR_LIT>\"\"\"``),
numbers ``<NUM_LIT>``, char literals ``'<CHAR_LIT>'``. As in CodeXGLUE (whose javalang
values have unicode escapes translated but other escapes kept), a char literal whose
content is more than one character after unicode-escape translation, e.g. ``'\\n'``,
becomes ``'<STR_LIT>'``.

Frequent literals can be kept as ``<STR_LIT:value>`` / ``<NUM_LIT:value>`` /
``<CHAR_LIT:value>`` (CodeXGLUE's ``literals.json``; in the value a space is written
``U+0020`` and a comma ``U+002C``). ``literal_mode="raw"`` keeps every literal verbatim.

Every function returns the token list *without* ``<s>`` / ``</s>``; ``wrap`` adds them.
This module only needs the standard library (and tree-sitter for Java), so worker
processes start fast.
"""

from __future__ import annotations

import io
import re
import tokenize
import warnings
from typing import Iterable, Mapping, Optional, Union

BOS, EOS, EOL = "<s>", "</s>", "<EOL>"
STR_LIT, NUM_LIT, CHAR_LIT = "<STR_LIT>", "<NUM_LIT>", "<CHAR_LIT>"
PAD, UNK = "<pad>", "<unk>"
LITERAL_TOKENS = (EOL, STR_LIT, NUM_LIT, CHAR_LIT)
LITERAL_MODES = ("normalized", "raw", "source")
# how a record's tokens are joined into the text a model sees: CodeXGLUE's space join, or
# (``source``) nothing at all, because each piece carries its own whitespace
SOURCE_MODE = "source"


def joiner(literal_mode: str) -> str:
    """The separator of a record's tokens: ``""`` for ``source`` pieces, ``" "`` otherwise."""
    return "" if literal_mode == SOURCE_MODE else " "

# keep_literals=KEEP_ALL writes every literal in its kept form (used to count literals
# before the frequent ones are known; see finalize_literals)
KEEP_ALL = "all"
KeepLiterals = Optional[Union[str, Mapping[str, Iterable[str]]]]

_QUALIFIER = re.compile(r"^[A-Za-z]+")
_QUOTES = ("'''", '"""', "'", '"')
_KEPT = re.compile(r"^([A-Za-z]*)('''|\"\"\"|'|\"|)<(STR_LIT|CHAR_LIT|NUM_LIT):(.*)>\2$", re.DOTALL)
_SPECIAL_CHARS = (("\u0020", "U+0020"), (",", "U+002C"))
_KIND_KEY = {"STR_LIT": "str", "NUM_LIT": "num", "CHAR_LIT": "char"}


class LexError(ValueError):
    """The text does not tokenize (lexical error) in the requested language."""


class SyntaxCheckError(ValueError):
    """The text tokenizes but the language's parser rejects it."""


def universal_newlines(text: str) -> str:
    """CRLF and CR -> LF, as CodeXGLUE's ``open(path).read()`` gave its tokenizer."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def wrap(tokens: list[str]) -> list[str]:
    """CodeXGLUE record format: ``<s> ... </s>``."""
    return [BOS, *tokens, EOS]


def _check_mode(literal_mode: str) -> None:
    if literal_mode not in LITERAL_MODES:
        raise ValueError(f"literal_mode={literal_mode!r}; use one of {LITERAL_MODES}")


def _keep_sets(keep_literals: KeepLiterals) -> Optional[dict[str, set]]:
    if keep_literals is None or keep_literals == KEEP_ALL:
        return None
    return {k: set(keep_literals.get(k, ())) for k in ("str", "num", "char")}


def _escape_value(value: str) -> str:
    for ch, code in _SPECIAL_CHARS:
        value = value.replace(ch, code)
    return value


def _split_quoted(token: str) -> tuple[str, str, str, str]:
    """``rb'x'`` -> (qualifier ``rb``, start quote, content, end quote), as CodeXGLUE."""
    m = _QUALIFIER.match(token)
    qualifier = m.group(0) if m else ""
    rest = token[len(qualifier):]
    for q in _QUOTES:
        if rest.startswith(q):
            body = rest[len(q):]
            end = ""
            if len(body) >= len(q) and body.endswith(q):
                body, end = body[: -len(q)], q
            return qualifier, q, body, end
    return qualifier, "", rest, ""


def _literal(kind: str, qualifier: str, start: str, value: str, end: str, keep: KeepLiterals,
             sets: Optional[dict[str, set]]) -> str:
    value = _escape_value(value)
    key = _KIND_KEY[kind]
    if keep == KEEP_ALL or (sets is not None and value in sets[key]):
        return f"{qualifier}{start}<{kind}:{value}>{end}"
    return f"{qualifier}{start}<{kind}>{end}"


def parse_kept_literal(token: str) -> Optional[tuple[str, str]]:
    """``'<STR_LIT:abc>'`` -> ("str", "abc"); None for any other token."""
    if "_LIT:" not in token:
        return None
    m = _KEPT.match(token)
    if not m:
        return None
    return _KIND_KEY[m.group(3)], m.group(4)


def finalize_literals(tokens: list[str], keep: Mapping[str, Iterable[str]]) -> list[str]:
    """Turn tokens written with ``KEEP_ALL`` into the final form for the kept literal sets."""
    sets = _keep_sets(keep)
    out = []
    for t in tokens:
        if "_LIT:" in t:
            m = _KEPT.match(t)
            if m and m.group(4) not in sets[_KIND_KEY[m.group(3)]]:
                t = f"{m.group(1)}{m.group(2)}<{m.group(3)}>{m.group(2)}"
        out.append(t)
    return out


# --------------------------------------------------------------------------- python
_PY_STRING_STARTS = {getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, n)}
_PY_STRING_ENDS = {getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, n)}
_PY_SKIP = {tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
_PY_EOL = {tokenize.NEWLINE, tokenize.NL}


def _py_raw_tokens(text: str, lenient: bool) -> Iterable[tuple[int, str]]:
    """(type, string) pairs; on Python >= 3.12 an f-string comes back as one STRING token
    (its source text), as Python <= 3.11 gives it."""
    line_starts: Optional[list[int]] = None

    def offset(pos: tuple[int, int]) -> int:
        nonlocal line_starts
        if line_starts is None:  # tokenize reads lines split at "\n" only (StringIO.readline)
            line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        return line_starts[pos[0] - 1] + pos[1]

    gen = tokenize.generate_tokens(io.StringIO(text).readline)
    depth, fstart = 0, None
    try:
        for tok in gen:
            if tok.type in _PY_STRING_STARTS:
                if depth == 0:
                    fstart = tok.start
                depth += 1
                continue
            if depth:
                if tok.type in _PY_STRING_ENDS:
                    depth -= 1
                    if depth == 0:
                        yield tokenize.STRING, text[offset(fstart): offset(tok.end)]
                continue
            if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
                if not lenient:
                    raise LexError(f"invalid token {tok.string!r} at line {tok.start[0]}")
                yield tokenize.OP, tok.string
                continue
            yield tok.type, tok.string
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        if not lenient:
            raise LexError(f"python tokenize failed: {e}") from e


def tokenize_python_source(text: str, literal_mode: str = "normalized", keep_literals: KeepLiterals = None,
                           *, lenient: bool = False) -> list[str]:
    """Python source -> CodeXGLUE py150 tokens (without ``<s>``/``</s>``).

    ``keep_literals``: ``{"str": [...], "num": [...]}`` literal values (escaped as in
    CodeXGLUE's literals.json) kept as ``<STR_LIT:value>``; None keeps none.
    ``lenient``: return the tokens read so far instead of raising at an unfinished
    statement or string at the end (a prompt cut in the middle of a line).
    Raises ``LexError`` when the text does not tokenize.
    """
    _check_mode(literal_mode)
    sets = _keep_sets(keep_literals)
    raw = literal_mode == "raw"
    text = universal_newlines(text)
    out: list[str] = []
    prev_eol = False
    for toknum, tokval in _py_raw_tokens(text, lenient):
        if toknum in _PY_EOL:
            if not prev_eol:
                out.append(EOL)
                prev_eol = True
            continue
        if toknum in _PY_SKIP:
            continue
        if toknum == tokenize.STRING:
            if raw:
                out.append(tokval)
            else:
                q, s, body, e = _split_quoted(" ".join(tokval.split()))
                out.append(_literal("STR_LIT", q, s, body, e, keep_literals, sets))
        elif toknum == tokenize.NUMBER:
            out.append(tokval if raw else _literal("NUM_LIT", "", "", tokval, "", keep_literals, sets))
        else:
            tokval = " ".join(tokval.split())
            if not tokval:
                continue
            out.append(tokval)
        prev_eol = False
    if out and out[0] == EOL:
        out = out[1:]
    if out and out[-1] == EOL:
        out = out[:-1]
    return out


def check_python_syntax(text: str) -> None:
    """Raise ``SyntaxCheckError`` unless the running interpreter can parse ``text``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(text, "<source>", "exec", dont_inherit=True)  # cheaper than building the ast objects
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise SyntaxCheckError(f"python syntax error: {e}") from e


# --------------------------------------------------------------------------- java
_JAVA_NUMBERS = {
    "decimal_integer_literal", "hex_integer_literal", "octal_integer_literal", "binary_integer_literal",
    "decimal_floating_point_literal", "hex_floating_point_literal",
}
_JAVA_COMMENTS = {"comment", "line_comment", "block_comment"}
_JAVA_ATOMIC = {"string_literal", "character_literal", *_JAVA_NUMBERS}
_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u+([0-9a-fA-F]{4})")
_java_parser = None


def translate_unicode_escapes(text: str) -> str:
    """JLS 3.3: ``\\uXXXX`` (an odd run of backslashes, one or more ``u``) -> the character."""
    if "\\u" not in text:
        return text
    out = _UNICODE_ESCAPE.sub(lambda m: m.group(1) + chr(int(m.group(2), 16)), text)
    # surrogate pairs written as two escapes -> one character
    return out.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _parser():
    global _java_parser
    if _java_parser is None:
        import tree_sitter_java
        from tree_sitter import Language, Parser

        _java_parser = Parser(Language(tree_sitter_java.language()))
    return _java_parser


def _java_leaves(root) -> Iterable:
    cursor = root.walk()
    while True:
        node = cursor.node
        if node.type in _JAVA_ATOMIC or node.child_count == 0:
            yield node
        elif cursor.goto_first_child():
            continue
        while not cursor.goto_next_sibling():
            if not cursor.goto_parent():
                return


def _java_tree(text: str):
    parser = _parser()
    tree = parser.parse(text.encode("utf-8", "surrogatepass"))
    if tree.root_node.has_error and "\\u" in text:
        # unicode escapes outside literals (e.g. in identifiers) are translated before
        # lexing in Java; retry with them translated
        translated = translate_unicode_escapes(text)
        tree2 = parser.parse(translated.encode("utf-8", "surrogatepass"))
        if not tree2.root_node.has_error:
            return tree2
    return tree


def tokenize_java_source(text: str, literal_mode: str = "normalized", keep_literals: KeepLiterals = None,
                         *, syntax_check: bool = False) -> list[str]:
    """Java source -> CodeXGLUE javaCorpus tokens (without ``<s>``/``</s>``).

    ``syntax_check``: raise ``SyntaxCheckError`` when tree-sitter-java finds a syntax
    error; otherwise every lexeme is kept (tree-sitter recovers from errors).
    """
    _check_mode(literal_mode)
    sets = _keep_sets(keep_literals)
    raw = literal_mode == "raw"
    tree = _java_tree(universal_newlines(text))
    if syntax_check and tree.root_node.has_error:
        node = _first_error(tree.root_node)
        where = f" at line {node.start_point[0] + 1}" if node is not None else ""
        raise SyntaxCheckError(f"java syntax error{where}")
    out: list[str] = []
    for node in _java_leaves(tree.root_node):
        kind = node.type
        if kind in _JAVA_COMMENTS:
            continue
        value = node.text.decode("utf-8", "surrogatepass")
        if not value:  # zero-width MISSING node inserted by error recovery
            continue
        if raw:
            out.append(value)
        elif kind == "string_literal":
            q, s, body, e = _split_quoted(" ".join(value.split()))
            out.append(_literal("STR_LIT", q, s, body, e, keep_literals, sets))
        elif kind == "character_literal":
            q, s, body, e = _split_quoted(value)
            body = translate_unicode_escapes(body)
            lit = "CHAR_LIT" if len(body) == 1 and s == "'" else "STR_LIT"
            out.append(_literal(lit, q, s, " ".join(body.split()) or body, e, keep_literals, sets))
        elif kind in _JAVA_NUMBERS:
            out.append(_literal("NUM_LIT", "", "", value, "", keep_literals, sets))
        else:
            out.append(" ".join(value.split()))
    return [t for t in out if t]


def _first_error(node):
    if node.type == "ERROR" or node.is_missing:
        return node
    for child in node.children:
        if child.has_error or child.is_missing:
            found = _first_error(child)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------- source pieces
_JAVA_PIECE = re.compile(r"""[^\S\n]*(?:\n|//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|\w+|\S)""",
                         re.DOTALL)


def _py_piece_ends(text: str) -> list[int]:
    """End offsets of the Python tokens of ``text`` that carry text (an f-string is one
    token; INDENT whitespace joins the token after it)."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def offset(pos: tuple[int, int]) -> int:
        return line_starts[pos[0] - 1] + pos[1]

    ends: list[int] = []
    depth = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in _PY_STRING_STARTS:
                depth += 1
                continue
            if depth:
                if tok.type in _PY_STRING_ENDS:
                    depth -= 1
                    if depth == 0:
                        ends.append(offset(tok.end))
                continue
            if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.ENCODING):
                continue
            if tok.start == tok.end:
                continue
            if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
                raise LexError(f"invalid token {tok.string!r} at line {tok.start[0]}")
            ends.append(offset(tok.end))
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        raise LexError(f"python tokenize failed: {e}") from e
    return ends


def source_pieces(text: str, language: str) -> list[str]:
    """Source text -> pieces whose concatenation is the text (after universal newlines).

    A piece is one lexical token with the whitespace and comments before it; a line break
    is a piece of its own (``"\n"``, possibly after trailing spaces or a comment), so a piece
    that ends with ``"\n"`` closes a line. This is ``literal_mode="source"``: the model sees
    the file as written and its completions are code an editor can insert.
    """
    text = universal_newlines(text)
    if language == "python":
        cuts = sorted(set(e for e in _py_piece_ends(text) if 0 < e <= len(text)))
    elif language == "java":
        cuts = [m.end() for m in _JAVA_PIECE.finditer(text)]
    else:
        raise ValueError(f"language={language!r}; use python or java")
    pieces, prev = [], 0
    for c in cuts:
        if c > prev:
            pieces.append(text[prev:c])
            prev = c
    if prev < len(text):
        if pieces:
            pieces[-1] += text[prev:]
        else:
            pieces.append(text[prev:])
    return pieces


def tokenize_source(text: str, language: str, literal_mode: str = "normalized",
                    keep_literals: KeepLiterals = None) -> list[str]:
    """Dispatch on ``language`` (python | java); ``literal_mode="source"`` gives
    ``source_pieces``."""
    if literal_mode == SOURCE_MODE:
        return source_pieces(text, language)
    if language == "python":
        return tokenize_python_source(text, literal_mode, keep_literals)
    if language == "java":
        return tokenize_java_source(text, literal_mode, keep_literals)
    raise ValueError(f"language={language!r}; use python or java")


def source_to_text(text: str, language: str, literal_mode: str = "raw", *, lenient: bool = True) -> str:
    """Editor text -> the space-joined CodeXGLUE format a model trained on a corpus sees
    (what ``code_text`` gives for a record). ``lenient`` accepts a prompt that stops in the
    middle of a statement."""
    if language == "python":
        toks = tokenize_python_source(text, literal_mode, lenient=lenient)
    elif language == "java":
        toks = tokenize_java_source(text, literal_mode)
    else:
        raise ValueError(f"language={language!r}; use python or java")
    return " ".join(toks)
