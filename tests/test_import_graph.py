"""The package's import graph, read from the source (AST, every import: at module top and inside
functions, so imports hidden in functions count too): no circle among the evaluation's modules,
training imports nothing of evaluation, serving imports neither the calibration stage nor the
evaluator (it reads calibrated results through greencode.calibrated)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "greencode"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the greencode modules it imports anywhere in its file}. ``from a import b`` names the
    module ``a.b`` when that is a module, else ``a``."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one more level up per extra dot
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    out.add(f"{src}.{a.name}" if f"{src}.{a.name}" in files else src)
        graph[mod] = {t for t in out if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """The strongly connected components of more than one module among the modules under ``within``."""
    nodes = sorted(m for m in graph if m == within or m.startswith(within + "."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v] & set(nodes)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_function_level_imports():
    g = import_graph()
    # eval/__init__.py imports the evaluator inside evaluate(), never at its top
    assert "greencode.eval.evaluator" in g["greencode.eval"]
    # ``from greencode.eval.methods import MethodSpec`` names the module, ``from greencode.eval import evaluate`` the package
    assert "greencode.eval.methods" in g["greencode.eval.evaluator"]
    assert "greencode.eval" in g["greencode.eval.tuning"]


def test_no_import_circle_in_the_package():
    """Every import counted, those inside functions too: no two modules import each other, however indirectly."""
    assert cycles(import_graph(), "greencode") == []


def test_the_bottom_floor_imports_nothing_of_the_package():
    """errors and utils sit under everything (the config raises ConfigError from errors; a run's metadata and
    the weights it names live above, in runinfo and provenance)."""
    g = import_graph()
    assert g["greencode.errors"] == set() and g["greencode.utils"] == set()
    assert g["greencode.config"] - {"greencode.errors"} <= {m for m in g if m.startswith("greencode.decoding")}


def test_training_imports_nothing_of_evaluation():
    g = import_graph()
    bad = {m: sorted(t for t in ts if t == "greencode.eval" or t.startswith("greencode.eval."))
           for m, ts in g.items() if m.startswith("greencode.training")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


# The floors, bottom up: a module imports only modules on its own floor or below. The decoding package (controllers,
# registry, the loop: torch and the errors, nothing of the config) sits under the config, which validates method
# names against the controller registry; the readers of calibrated results and the energy meters sit beside the
# run's paths, under everything that evaluates or serves.
FLOORS = (
    ("errors", "utils"),
    ("decoding",),
    ("config",),
    ("paths", "provenance", "runinfo", "stats", "distributed", "energy", "calibrated"),
    ("models",),
    ("data", "training", "rl"),
    ("eval",),
    ("plots", "serve", "bench"),
    ("pipeline", "cli", ""),  # "" = the package's __init__
)


def _floor(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else ""
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{mod} has no floor in FLOORS (add its top-level name)")


def test_no_module_imports_one_on_a_higher_floor():
    g = import_graph()
    up = sorted(f"{m} -> {t}" for m, ts in g.items() for t in ts if _floor(t) > _floor(m))
    assert up == []


def test_serving_imports_nothing_of_evaluation():
    """Serving reads calibrated thresholds (greencode.calibrated) and meters energy (greencode.energy);
    neither lives in eval/."""
    g = import_graph()
    bad = {m: sorted(t for t in ts if t == "greencode.eval" or t.startswith("greencode.eval."))
           for m, ts in g.items() if m.startswith("greencode.serve")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


# ----------------------------------------------------------------------------- imports at module top
def _runtime_top_imports(path: Path, mod: str, files: dict) -> set[str]:
    """The package modules a file imports when it is loaded: module-level statements, class bodies, module-level
    if/try/with blocks (not ``if TYPE_CHECKING:``), never function bodies."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def walk(stmts):
        for n in stmts:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                walk(n.orelse)
                continue
            if isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                out.update(_targets(n, mod, is_pkg, files))
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(n, field, None)
                if isinstance(sub, list):
                    walk(sub)

    walk(ast.parse(path.read_text(), str(path)).body)
    return {t for t in out if t in files and t != mod}


def _targets(node: ast.ImportFrom, mod: str, is_pkg: bool, files: dict) -> set[str]:
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    return {f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names}


def _parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def test_a_function_level_import_defers_something():
    """Imports sit at module top. One inside a function is kept only when it defers a module the file does not
    load anyway (a measured start-up cost: e.g. greencode.config validates controllers from greencode.decoding,
    1.3 s of torch, only when a config names them; the pipeline imports each stage when it runs) or when the
    target loads this module at its own top (a circle). An import of a module the file already loads when it is
    imported hides an edge of the graph and buys nothing: move it to the top."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    top = {m: _runtime_top_imports(p, m, files) for m, p in files.items()}

    def loaded(m: str) -> set[str]:  # what importing m loads: its packages, its top imports, theirs, ...
        seen, todo = set(), [m]
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            todo += [p for p in _parents(x) if p in files] + sorted(top.get(x, ()))
        return seen

    closure = {m: loaded(m) for m in files}
    redundant = []
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                if isinstance(n, ast.ImportFrom):
                    targets = _targets(n, mod, is_pkg, files)
                elif isinstance(n, ast.Import):
                    targets = {a.name for a in n.names}
                else:
                    continue
                for t in targets & set(files):
                    if t != mod and t in closure[mod] and mod not in closure[t]:
                        redundant.append(f"{path.relative_to(PKG.parent)}:{n.lineno} {fn.name}() imports {t}")
    assert redundant == [], "\n".join(sorted(set(redundant)))
