"""Accuracy metrics on hand-checked pairs (Python and Java, identical / empty / partial)."""

from __future__ import annotations

import pytest
import tree_sitter_java
import tree_sitter_python
from tree_sitter import Language, Parser

from greencode.eval.metrics import SCALES, SUPPORTED_LANGUAGES, compute_metrics, sample_metrics, to_code

PY = "def add ( a , b ) : <EOL> c = a + b <EOL> return c"
JAVA = "public int add ( int a , int b ) { int c = a + b ; return c ; }"
PERFECT = {"codebleu": 1.0, "codebleu_ngram": 1.0, "codebleu_weighted_ngram": 1.0, "codebleu_syntax": 1.0,
           "codebleu_dataflow": 1.0, "rouge_l": 1.0, "bleu": 100.0, "chrf": 100.0, "exact_match": 1.0,
           "edit_similarity": 100.0}
ZERO = {k: 0.0 for k in PERFECT}


def _check(scores: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert scores[k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.parametrize("text,lang", [(PY, "python"), (JAVA, "java")])
def test_identical_is_perfect(text, lang):
    s = sample_metrics(text, text, lang)
    _check(s, PERFECT)
    assert s["codebleu_dataflow_counted_as_one"] is False  # real data flow (a, b -> c -> return) matched
    c = compute_metrics([text, text], [text, text], lang)
    _check(c, PERFECT)
    assert c["num_samples"] == 2 and c["scales"] == SCALES and c["scales"]["bleu"] == "0-100"


@pytest.mark.parametrize("lang", SUPPORTED_LANGUAGES)
def test_empty_cases_are_defined(lang):
    _check(sample_metrics("", "  ", lang), PERFECT)  # both empty after stripping: identical
    _check(sample_metrics("", "return x ;", lang), ZERO)  # not codebleu's 0.25 dataflow bonus
    _check(sample_metrics("return x ;", "", lang), ZERO)
    _check(compute_metrics(["", ""], ["", ""], lang), PERFECT)
    _check(compute_metrics(["", ""], ["x = 1 ;", "y ;"], lang), ZERO)
    mixed = compute_metrics([JAVA, ""], [JAVA, "return x ;"], lang)
    assert mixed["exact_match"] == 0.5 and mixed["edit_similarity"] == 50.0 and mixed["rouge_l"] == 0.5
    assert 0.0 < mixed["bleu"] < 100.0


def test_partial_match_hand_checked():
    s = sample_metrics("return x + 1", "return y + 1", "python")
    # code tokens [return, x, +, 1] vs [return, y, +, 1]: LCS 3 -> P = R = F = 3/4 (the default rouge-score
    # tokenizer would drop "+" and give 2/3)
    assert s["rouge_l"] == pytest.approx(0.75)
    assert s["exact_match"] == 0.0
    # 12 chars each, one substitution = 2 InDel edits: 100 * (1 - 2 / 24)
    assert s["edit_similarity"] == pytest.approx(100 * (1 - 2 / 24))
    assert 0.0 < s["chrf"] < 100.0
    # BLEU with no zero n-gram counts, equal lengths: 100 * (4/5 * 3/4 * 2/3 * 1/2) ** (1/4)
    b = sample_metrics("a b c d e", "a b c d f", "python")["bleu"]
    assert b == pytest.approx(100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    assert compute_metrics(["a b c d e"], ["a b c d f"], "java")["bleu"] == pytest.approx(b)


def test_edit_similarity_is_indel_ratio_and_em_ignores_spacing():
    s = sample_metrics("ab", "ba", "python")
    assert s["edit_similarity"] == pytest.approx(50.0)  # Levenshtein/max_len would give 0
    assert sample_metrics("return  x", "return x", "java")["exact_match"] == 1.0
    assert sample_metrics("Foo", "foo", "java")["rouge_l"] == 0.0  # case kept


def test_codebleu_dataflow_quirk_is_reported():
    s = sample_metrics("return x ;", "return y ;", "java")  # no data-flow edges in the reference
    assert s["codebleu_dataflow"] == 0.0 and s["codebleu_dataflow_counted_as_one"] is True
    parts = s["codebleu_ngram"] + s["codebleu_weighted_ngram"] + s["codebleu_syntax"]
    assert s["codebleu"] == pytest.approx(0.25 * (parts + 1.0))  # library's composite, bonus included
    ref = "def f ( a ) : <EOL> b = a <EOL> return b"
    t = sample_metrics("def f ( a ) : <EOL> b = a <EOL> return a", ref, "python")
    assert 0.0 < t["codebleu_dataflow"] < 1.0 and t["codebleu_dataflow_counted_as_one"] is False
    assert t["codebleu"] == pytest.approx(0.25 * (t["codebleu_ngram"] + t["codebleu_weighted_ngram"]
                                                  + t["codebleu_syntax"] + t["codebleu_dataflow"]))


def test_placeholders_become_parseable_code():
    py = to_code("<s> def f ( x ) : <EOL> if x > <NUM_LIT> : <EOL> return <STR_LIT:__main__> </s>", "python")
    assert py == 'def f ( x ) :\n    if x > 0 :\n        return "__main__"'
    java = to_code("char c = <CHAR_LIT> ; <EOL> String s = <STR_LIT> ; int n = <NUM_LIT:10> ;", "java")
    assert java == "char c = 'c' ;\nString s = \"\" ; int n = 10 ;"
    for code, lang in ((py, tree_sitter_python), (java, tree_sitter_java)):
        parser = Parser()
        parser.language = Language(lang.language())
        assert not parser.parse(code.encode()).root_node.has_error, code
    raw = "def f(x):\n    return x"
    assert to_code(raw, "python") == raw  # raw code passes through


def test_codebleu_sees_code_while_ngram_metrics_see_tokens():
    tok = "def f ( x ) : <EOL> return x + <NUM_LIT>"
    raw = "def f ( x ) :\n    return x + 0"
    a, b = sample_metrics(tok, tok, "python"), compute_metrics([raw], [tok], "python")
    assert a["codebleu"] == 1.0
    assert b["codebleu"] == pytest.approx(1.0)  # same code after conversion
    assert b["exact_match"] == 0.0 and b["bleu"] < 100.0  # but the text differs


def test_python_syntax_part_uses_the_python_grammar():
    # ref "if x :\n    y = 2\n    z = 3" has 7 subtrees with children (module, if_statement, block, 2 x
    # expression_statement, 2 x assignment); the candidate "if x :\n    y = 1" shares the 2 + 2 statement
    # subtrees (leaf text is not part of the s-expression) but not module/if/block: 4/7. Parsing Python with
    # the Java grammar (the authors' bug) gives a different number.
    p, r = "if x : <EOL> y = 1", "if x : <EOL> y = 2 <EOL> z = 3"
    assert sample_metrics(p, r, "python")["codebleu_syntax"] == pytest.approx(4 / 7)
    assert sample_metrics(p, r, "java")["codebleu_syntax"] != pytest.approx(4 / 7)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="python, java"):
        compute_metrics(["x"], ["x"], "go")
    with pytest.raises(ValueError, match="python, java"):
        sample_metrics("x", "x", "cobol")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"], "python")
    with pytest.raises(ValueError, match="no samples"):
        compute_metrics([], [], "python")
    with pytest.raises(ValueError, match=r"references\[0\] is a NoneType"):
        compute_metrics(["a"], [None], "java")
    assert sample_metrics("x", "x", " Python ")["exact_match"] == 1.0


# boilerplate references (greencode.eval.metrics.is_boilerplate): the exact matches of the full model on the
# default test split are all of these (Apache headers), so exact match is reported with them separated
@pytest.mark.parametrize("reference", [
    "#     http://www.apache.org/licenses/LICENSE-2",  # a line cut short, as the 15-token references are
    "\n#     http://www.apache.org/licenses/LICENSE-",
    "\n# See the License for the specific language governing permissions and\n# limitations",
    "\n# Unless required by applicable law or agreed to in writing, software\n",
    "\n#\n# Unless required by applicable law or agreed to in writing,",
    "# Licensed under the Apache License, Version 2.0 (the \"License\");",
    "# distributed under the License is distributed on an \"AS IS\" BASIS,",
    "# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.",
    "// Copyright 2020 Google LLC",
    "/*\n * Copyright (c) 2015, Oracle and/or its affiliates. All rights reserved.\n */",
    " * SPDX-License-Identifier: MIT",
    "# Copyright 2019 The TensorFlow Authors. <EOL> #",  # token format: <EOL> separates lines
    "Licensed under the Apache License, Version 2.0",  # the first fragment continues the context's comment
    "",
    "   \n\t\n",
])
def test_boilerplate_references(reference):
    from greencode.eval.metrics import is_boilerplate

    assert is_boilerplate(reference)


@pytest.mark.parametrize("reference", [
    " \"B\"])\n\n        tm.assert_frame_equal(other, float",
    "class License(models.Model):",  # the word in code, not in a comment
    "    license = \"MIT\"",
    "x = 1  # Copyright",  # code with a trailing comment
    "# limitations under the License.\n\nimport os",  # the header ends and code follows
    "# TODO: handle the empty case",  # a comment, but no licence
    "#",
    "return a + b <EOL> }",
    "    def push(self, item):\n        self.items.append(item)",
])
def test_not_boilerplate_references(reference):
    from greencode.eval.metrics import is_boilerplate

    assert not is_boilerplate(reference)


def test_exact_match_breakdown():
    from greencode.eval.metrics import exact_match_breakdown

    b = exact_match_breakdown([1.0, 1.0, 0.0, 1.0, 0.0], [True, True, True, False, False])
    assert b["exact_match_boilerplate_share"] == pytest.approx(2 / 3)
    assert b["exact_match_no_boilerplate"] == pytest.approx(1 / 2) and b["num_samples_no_boilerplate"] == 2
    assert b["boilerplate_reference_share"] == pytest.approx(3 / 5)
    none = exact_match_breakdown([0.0, 0.0], [True, False])
    assert none["exact_match_boilerplate_share"] is None and none["exact_match_no_boilerplate"] == 0.0
    assert exact_match_breakdown([1.0], [True])["exact_match_no_boilerplate"] is None
    with pytest.raises(ValueError, match="boilerplate flags"):
        exact_match_breakdown([1.0], [])
