"""The package layout holds: sub-packages import only downward, and nothing imports in a cycle.

    course  →  serve  →  engine          train → engine
       └──────→ measure ←──┘ (serve and course may use measure; engine and measure use neither)

Read from the source with `ast` (no import is executed), so a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LABKIT = Path(__file__).resolve().parent.parent / "labkit"
# sub-package -> the other sub-packages it may import
ALLOWED: dict[str, set[str]] = {
    "engine": set(),
    "measure": set(),
    "serve": {"engine", "measure"},
    "train": {"engine"},
    "course": {"engine", "serve", "measure", "train"},
}
TOP_LEVEL = {"cli", "__main__", "__init__"}  # the command router may name any package


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def labkit_imports(root: Path = LABKIT) -> dict[str, set[str]]:
    """module -> the labkit modules it imports (package-level names resolved to modules)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("labkit")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.startswith("labkit"):
                for alias in node.names:  # `from labkit.engine import model` names a module
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in modules else node.module)
        graph[name] = {m for m in found if m != name}
    return graph


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        source = _package(module)
        if source is None or source in TOP_LEVEL:
            continue
        for target in sorted(targets):
            dest = _package(target)
            if dest is not None and dest != source and dest not in ALLOWED[source]:
                problems.append(f"{module} imports {target}: labkit.{source} may import only "
                                f"{sorted(ALLOWED[source]) or 'nothing else from labkit'}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between modules, each as the path that closes it."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_subpackage_is_known_to_the_rules():
    packages = {p.name for p in LABKIT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED), "add the new sub-package to ALLOWED with what it may import"


def test_subpackages_import_only_downward():
    assert upward_imports(labkit_imports()) == []


def test_no_import_cycles():
    assert cycles(labkit_imports()) == []


def test_the_checks_catch_a_planted_violation(tmp_path: Path):
    """An upward import (engine → serve) and a cycle are both reported."""
    root = tmp_path / "labkit"
    for package in ("engine", "serve"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "engine" / "model.py").write_text("def load():\n    from labkit.serve import http\n")
    (root / "serve" / "http.py").write_text("from labkit.engine import model\n")
    graph = labkit_imports(root)
    assert upward_imports(graph) == [
        "labkit.engine.model imports labkit.serve.http: labkit.engine may import only "
        "nothing else from labkit"]
    assert cycles(graph) == [["labkit.engine.model", "labkit.serve.http", "labkit.engine.model"]]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_subpackage_says_what_it_owns_and_may_import(package: str):
    doc = ast.get_docstring(ast.parse((LABKIT / package / "__init__.py").read_text()))
    assert doc and "May import" in doc


def _listed_as(path: Path) -> str:
    """`package/module.py`, or `package/sub/` for a module of a nested package."""
    parts = path.relative_to(LABKIT).parts
    return "/".join(parts) if len(parts) == 2 else f"{parts[0]}/{parts[1]}/"


def test_architecture_md_names_every_module_and_only_existing_ones():
    """ARCHITECTURE.md's module table follows the tree: a new module gets a line there."""
    import re

    text = (LABKIT.parent / "ARCHITECTURE.md").read_text()
    named = set()
    for package, files in re.findall(r"`(\w+)/([\w.]+\.py(?:`, `[\w.]+\.py)*)`", text):
        if package in ALLOWED:
            named |= {f"{package}/{f}" for f in re.findall(r"[\w]+\.py", files)}
    named |= {f"{package}/{sub}/" for package, sub in re.findall(r"`(\w+)/(\w+)/`", text)
              if package in ALLOWED}
    modules = {_listed_as(p) for p in LABKIT.rglob("*.py")
               if p.name != "__init__.py" and p.parent != LABKIT and p.parent.name != "train"}
    assert sorted(modules - named) == [], "add these modules to ARCHITECTURE.md"
    assert sorted(named - modules) == [], "ARCHITECTURE.md names modules that do not exist"


def package_modules(package: str) -> set[str]:
    return {p.stem for p in (LABKIT / package).glob("*.py") if p.name != "__init__.py"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_docstring_names_its_modules_and_only_those(package: str):
    """The docstring is the package's map: every module in it as `name` (ARCHITECTURE.md's
    table, checked above, catches a name whose module is gone)."""
    import re

    doc = ast.get_docstring(ast.parse((LABKIT / package / "__init__.py").read_text())) or ""
    named = set(re.findall(r"`(\w+)`", doc))
    assert sorted(package_modules(package) - named) == [], \
        f"labkit/{package}/__init__.py does not name these modules"


MAX_MODULE_LINES = 600
LONG_MODULES_ALLOWED = {"train/corpus.py"}  # data, not logic


def test_no_module_over_600_lines():
    """A module that grows past 600 lines is doing more than one job: split it."""
    long = {str(p.relative_to(LABKIT)): len(p.read_text().splitlines())
            for p in LABKIT.rglob("*.py")}
    over = {name: n for name, n in long.items()
            if n > MAX_MODULE_LINES and name not in LONG_MODULES_ALLOWED}
    assert over == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {over}"


MAX_FUNCTION_LINES = 50


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated `@triton.jit` or `@triton.jit(...)`: a kernel reads as one piece, like the
    paper's pseudo-code, and may run long."""
    return any(ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit"
               for d in node.decorator_list)


def long_functions(root: Path = LABKIT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' for each function or method, nested ones included, longer
    than `limit` lines from its `def` to the end of its body; Triton kernels excepted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    or _is_triton_kernel(node):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                             f"({length} lines)")
    return found


def test_no_function_over_50_lines():
    """A function longer than 50 lines does more than one job: give each job a helper."""
    long = long_functions()
    assert long == [], (f"shorten these (over {MAX_FUNCTION_LINES} lines; Triton kernels "
                        "excepted):\n" + "\n".join(long))


def _function(header: str, length: int, indent: str = "") -> str:
    """Source of a function `length` lines long, `def` line included."""
    return f"{indent}{header}\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(length - 1))


def test_the_length_check_catches_a_long_function_and_spares_a_kernel(tmp_path: Path):
    """51 lines is reported (a method too), 50 is not, and neither is a long Triton kernel."""
    root = tmp_path / "labkit"
    root.mkdir()
    (root / "m.py").write_text(
        "import triton\n\n" + _function("def fits():", 50)
        + "\nclass C:\n" + _function("async def method(self):", 51, indent="    ")
        + "\n@triton.jit\n" + _function("def kernel():", 80)
        + "\n@triton.jit(do_not_specialize=['n'])\n" + _function("def kernel2(n):", 80))
    assert long_functions(root) == ["labkit/m.py:55 method (51 lines)"]
