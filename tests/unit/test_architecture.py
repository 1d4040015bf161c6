"""Rules of the layout, as tests (read statically from the source, so a rule breaks here before
it breaks a deploy):

- the core (`layers/core/first_core`, the Lambda layer) has no import cycle, lazy imports and
  `TYPE_CHECKING` ones included;
- the core imports nothing local-only (`first_local`), nothing that runs on the clusters
  (`compute_funcs`), no web framework (`chalice`, `starlette`) and no handler (`app`,
  `chalicelib`, `functions`);
- handlers are thin: no function in `app.py`, `chalicelib/` or `functions/` is over 40 lines;
- a core module over 350 lines says why at its top (`Long because:`); none is over 600;
- a test imports what tests share from `tests.support` (or a conftest), never from another test
  module, so a fake or an identity has one definition.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import PROJECT_ROOT

CORE = PROJECT_ROOT / "layers" / "core" / "first_core"
HANDLERS = [
    PROJECT_ROOT / "app.py",
    *sorted((PROJECT_ROOT / "chalicelib").rglob("*.py")),
    *sorted((PROJECT_ROOT / "functions").rglob("*.py")),
]
FORBIDDEN = {
    "first_local", "compute_funcs", "chalice", "chalicelib", "starlette", "app", "functions"
}
MAX_HANDLER_LINES = 40


def core_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def imports_of(path: Path, package: str, modules: set[str] | None = None) -> set[str]:
    """Every module the file imports, anywhere in it (in functions, under TYPE_CHECKING).
    `from package import submodule` is the submodule (the package's `__init__` runs first
    anyway, as for any submodule, and is not counted)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            named = {f"{base}.{alias.name}" for alias in node.names}
            submodules = named & (modules or set())
            found.update(submodules)
            if submodules != named:
                found.add(base)
    return found


def core_graph() -> dict[str, set[str]]:
    modules = core_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = imports_of(path, package, set(modules))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_core_has_no_import_cycle() -> None:
    assert cycles(core_graph()) == []


def test_a_cycle_would_be_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_core_imports_no_local_cluster_web_or_handler_code() -> None:
    offending = {
        f"{name}: {module}"
        for name, path in core_modules().items()
        for module in imports_of(path, name.rpartition(".")[0])
        if module.split(".")[0] in FORBIDDEN
    }
    assert offending == set()


def test_every_core_module_imports_alone_without_local_or_cluster_code() -> None:
    """And at run time too: each module loads with those packages made unimportable."""
    modules = sorted(core_modules())
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Forbidden(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {sorted(FORBIDDEN)!r}:
                    raise ImportError(f"the core imported {{name}}")
                return None

        sys.meta_path.insert(0, Forbidden())
        for module in {modules!r}:
            importlib.import_module(module)
        print(len({modules!r}))
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert int(ran.stdout) == len(modules) > 20


def test_handlers_are_thin() -> None:
    too_long = {
        f"{path.relative_to(PROJECT_ROOT)}: {node.name}"
        for path in HANDLERS
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_HANDLER_LINES
    }
    assert too_long == set()


def test_long_core_modules_say_why() -> None:
    unexplained = set()
    for path in CORE.rglob("*.py"):
        text = path.read_text()
        lines = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text)) or ""
        reason = any(line.startswith("Long because:") for line in docstring.splitlines())
        if lines > 600 or (lines > 350 and not reason):
            unexplained.add(str(path.relative_to(CORE)))
    assert unexplained == set()


def test_tests_share_through_tests_support_only() -> None:
    borrowed = {
        f"{path.relative_to(PROJECT_ROOT)}: {module}"
        for path in (PROJECT_ROOT / "tests").rglob("test_*.py")
        for module in imports_of(path, "tests")
        if module.startswith("tests.") and module.rpartition(".")[2].startswith("test_")
    }
    assert borrowed == set()
