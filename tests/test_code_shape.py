"""The code's shape, read from the source: no function of the package runs over 60 lines (methods and nested
functions included; issue 29 asked it of decoding/, and the rest of the package holds to it too), so a new mode,
controller or benchmark lands as a new piece rather than a longer one."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "greencode"
MAX_LINES = 60


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``file:line name (N lines)`` for every function under ``root`` longer than ``limit`` lines, counted from
    its ``def`` to the last line of its body."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_the_count_sees_nested_functions(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    (tmp_path / "m.py").write_text(f"class C:\n    def f(self):\n        def g():\n            pass\n{body}\n")
    assert long_functions(tmp_path) == ["m.py:2 f (63 lines)"]
    assert long_functions(tmp_path, limit=63) == []


def test_no_function_in_the_package_runs_over_60_lines():
    assert long_functions(PKG) == []
