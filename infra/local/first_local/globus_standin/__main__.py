"""`python -m first_local.globus_standin serve|token`."""

from __future__ import annotations

import argparse

from first_local.globus_standin.app import create_app
from first_local.globus_standin.identities import DEV_IDENTITIES
from first_local.globus_standin.tokens import mint_token


def main(argv: list[str] | None = None) -> None:
    """Serve the Globus Auth and Groups stand-in, or print a dev user's access token."""
    parser = argparse.ArgumentParser(description="Local stand-in for Globus Auth and Groups.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the stand-in")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    token = commands.add_parser("token", help="print an access token for a dev user")
    token.add_argument("user", choices=sorted(DEV_IDENTITIES))
    token.add_argument("--expired", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "token":
        print(mint_token(args.user, expired=args.expired))
        return
    import uvicorn

    base = f"http://{args.host}:{args.port}"
    print(f"GLOBUS_SDK_SERVICE_URL_AUTH={base}/auth/")
    print(f"GLOBUS_SDK_SERVICE_URL_GROUPS={base}/groups/")
    uvicorn.run(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
