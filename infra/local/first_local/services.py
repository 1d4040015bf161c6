"""The stand-ins the gateway talks to over HTTP, served from one side process: the Globus
Auth/Groups stand-in, (unless the user names a real backend) the mock vLLM, and (with
`--direct-port`) the mock upstream of the local direct backend.

Run by the stack as `python -m first_local.services --auth-port A [--vllm-port V ...]`.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvicorn

from first_local.globus_standin import create_app as create_standin
from first_local.mock_vllm import MockConfig
from first_local.mock_vllm import create_app as create_mock_vllm


def _server(app: Any, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return uvicorn.Server(config)


async def _serve(args: argparse.Namespace) -> None:
    servers = [_server(create_standin(), args.auth_port)]
    if args.vllm_port:
        mock = MockConfig(
            first_token_delay_s=args.mock_delay,
            tokens_per_second=args.mock_token_rate,
            error_rate=args.backend_errors,
            hang_rate=args.backend_hang,
            api_key=args.vllm_api_key or None,
        )
        servers.append(_server(create_mock_vllm(mock), args.vllm_port))
    if args.direct_port:
        # The local direct backend: a mock vLLM of its own, with a model no cluster serves and
        # the key the gateway holds for it (first_core.inference.direct).
        direct = MockConfig(models=tuple(args.direct_models), api_key=args.direct_api_key)
        servers.append(_server(create_mock_vllm(direct), args.direct_port))
    await asyncio.gather(*(server.serve() for server in servers))


def main() -> None:
    """Serve the Globus stand-in (and the mock vLLM, with `--vllm-port`) from one process until
    stopped."""
    parser = argparse.ArgumentParser(prog="first_local.services")
    parser.add_argument("--auth-port", type=int, required=True)
    parser.add_argument("--vllm-port", type=int, default=0)
    parser.add_argument("--vllm-api-key", default="")
    parser.add_argument("--mock-delay", type=float, default=0.0)
    parser.add_argument("--mock-token-rate", type=float, default=0.0)
    parser.add_argument("--backend-errors", type=float, default=0.0)
    parser.add_argument("--backend-hang", type=float, default=0.0)
    parser.add_argument("--direct-port", type=int, default=0)
    parser.add_argument("--direct-api-key", default=None)
    parser.add_argument("--direct-models", nargs="+", default=["openai/gpt-oss-20b"])
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
