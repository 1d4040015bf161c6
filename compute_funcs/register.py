"""Register the compute functions with Globus Compute and put their ids in a registry file.

Run by an operator with Globus Compute credentials (a `globus-compute-endpoint` login or
`GLOBUS_COMPUTE_CLIENT_ID`/`_SECRET`), not on the clusters:

    python -m compute_funcs.register                          # register, print the ids
    python -m compute_funcs.register --registry FILE --write  # and write them into FILE

Functions are registered as source code (`code_serializer`), because the endpoints do not have
this project installed. `--write` rewrites FILE through a YAML round trip, which drops its
comments; without it the ids are printed as a `functions:` block to paste. The local stack
registers them the same way at every start, with the stand-in of the Globus Compute service,
and puts the ids it gets into its registry.

`GLOBUS_SDK_SERVICE_URL_COMPUTE` points the client at another Globus Compute service (the local
stack's stand-in), as it does the gateway's (`first_core.compute.globus_client`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from compute_funcs import FUNCTIONS


def code_serializer() -> Any:
    """How functions travel: as source code, as they must to a cluster where this project is
    not installed (Globus Compute's default pickles a module function by reference)."""
    from globus_compute_sdk.serialize import ComputeSerializer, DillCodeSource

    return ComputeSerializer(strategy_code=DillCodeSource())


def make_client() -> Any:
    """A Globus Compute client that registers functions as source code."""
    # Registration runs where the gateway is installed (an operator's machine, the local
    # stack), never on a cluster, so it may use the gateway's own way of making a client.
    from globus_compute_sdk.serialize import DillCodeSource

    from first_core.compute import globus_client

    return globus_client(code_serialization_strategy=DillCodeSource())


def register_all(client: Any) -> dict[str, str]:
    """Register every function; their names in the registry → the ids Globus Compute gave."""
    return {
        name: str(client.register_function(function, description=f"FIRST gateway: {name}"))
        for name, function in FUNCTIONS.items()
    }


def main(argv: list[str] | None = None, client: Any = None) -> int:
    """Register every compute function and print the ids; with --registry and --write, put them into
    that registry file."""
    parser = argparse.ArgumentParser(prog="python -m compute_funcs.register")
    parser.add_argument("--registry", type=Path, help="registry YAML to update")
    parser.add_argument("--cluster", action="append", default=[], help="only these clusters")
    parser.add_argument("--write", action="store_true", help="rewrite --registry in place")
    args = parser.parse_args(argv)
    import yaml

    from first_core.registry.config import put_functions

    ids = register_all(client if client is not None else make_client())
    if args.write:
        if args.registry is None:
            parser.error("--write needs --registry")
        registry = yaml.safe_load(args.registry.read_text())
        changed = put_functions(registry, ids, args.cluster)
        args.registry.write_text(yaml.safe_dump(registry, sort_keys=False))
        print(f"wrote function ids to {changed} endpoint(s) in {args.registry}", file=sys.stderr)
    print(yaml.safe_dump({"functions": ids}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
