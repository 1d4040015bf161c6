"""The compute functions travel to the clusters as code: the project is not installed there."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from compute_funcs import FUNCTIONS
from compute_funcs.register import code_serializer


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_compute_functions_load_where_the_project_is_not_installed(name: str) -> None:
    """A cluster has neither `compute_funcs` nor `first_core`: the function must come as code."""
    buffer = code_serializer().serialize(FUNCTIONS[name])
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class NotOnTheCluster(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"compute_funcs", "first_core", "first_local"}:
                    raise ImportError(f"{name} is not installed on the cluster")
                return None

        sys.meta_path.insert(0, NotOnTheCluster())
        from globus_compute_sdk.serialize import ComputeSerializer

        function = ComputeSerializer().deserialize(sys.stdin.read())
        print(function.__name__, callable(function))
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], input=buffer, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [FUNCTIONS[name].__name__, "True"]
