"""Rules of the layout, as tests: the core layer ships production code only."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import first_core


def test_the_core_imports_no_local_stack_and_no_cluster_code() -> None:
    """`layers/core` is the Lambda layer: it may not need `first_local` (the local stack) or
    `compute_funcs` (code that runs on the clusters) to import, whatever module is loaded."""
    modules = sorted(f"first_core.{m.name}" for m in pkgutil.iter_modules(first_core.__path__))
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Forbidden(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"compute_funcs", "first_local"}}:
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
