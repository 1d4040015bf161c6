"""``first-auth``: log in to a FIRST gateway with Globus, print tokens for ``OPENAI_API_KEY``.

    first-auth login                 # prints a URL, reads the authorization code from stdin
    export OPENAI_API_KEY=$(first-auth token)
    first-auth whoami
    first-auth logout

A Globus native-app login (authorization code with PKCE, refresh tokens) through
``globus_sdk.UserApp``. Tokens live in ``$XDG_CONFIG_HOME/first/tokens.json``
(``~/.config/first/tokens.json``), mode 0600, in globus-sdk's JSON token storage format.
``first-auth token`` refreshes the access token when it has less than a minute left.

The defaults talk to the local Globus stand-in of the FIRST project: the running local
stack's, found through the state file ``first-gateway dev`` writes by default (one line and
exit status 2 when none runs). For a real deployment set ``FIRST_AUTH_CLIENT_ID`` (your
native app) and ``FIRST_AUTH_SCOPE`` (the gateway's scope). globus-sdk's own
``GLOBUS_SDK_SERVICE_URL_AUTH`` (or ``--auth-url``, or ``--stack-state FILE``) says where
Globus Auth is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import globus_sdk
from globus_sdk.gare import GlobusAuthorizationParameters
from globus_sdk.login_flows import CommandLineLoginFlowEOFError, CommandLineLoginFlowManager
from globus_sdk.services.auth import GlobusNativeAppFlowManager
from globus_sdk.token_storage import JSONTokenStorage, TokenValidationError
from globus_sdk.token_storage.validating_token_storage import MissingTokenError

# The local Globus stand-in's native app and gateway scope (first_local.globus_standin).
# Copied rather than imported, so that this package installs on its own; a unit test
# keeps them equal to the stand-in's.
DEV_NATIVE_CLIENT_ID = "1e65154c-eb9b-54bf-9de6-5ba2306b2721"
DEV_GATEWAY_SCOPE = (
    "https://auth.globus.org/scopes/5cf9edf0-8efb-5921-a62d-f0ecaa861f32/action_all"
)

APP_NAME = "first-auth"
AUTH_RESOURCE_SERVER = "auth.globus.org"
IDENTITY_SCOPES = ("openid", "profile", "email")
PENDING_LIFETIME_S = 600
# `token` refreshes an access token with less than this left.
DEFAULT_MIN_VALID_S = 60

LOGIN_HINT = "run `first-auth login`"


class CommandError(Exception):
    """A failure to report on stderr as ``first-auth: <message>``, with exit status 1."""


class UsageError(CommandError):
    """A user mistake (no running local stack, an unreadable state file): exit status 2."""


@dataclass(frozen=True)
class Settings:
    """Where first-auth logs in: the Globus app's client id, the gateway's scope and resource
    server, and where tokens are kept."""

    client_id: str
    scope: str
    resource_server: str
    config_dir: Path

    @property
    def tokens_path(self) -> Path:
        return self.config_dir / "tokens.json"

    @property
    def pending_path(self) -> Path:
        return self.config_dir / "pending-login.json"


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/first``, or ``~/.config/first`` (XDG: ignore a relative value)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "first"


def resource_server_of(scope: str) -> str:
    """The resource server a Globus scope string belongs to."""
    root = scope.split("[", 1)[0].strip()
    if root.startswith("https://auth.globus.org/scopes/") and len(root.split("/")) > 4:
        return root.split("/")[4]
    if root.startswith("urn:globus:auth:scope:") and len(root.split(":")) > 4:
        return root.split(":")[4]
    raise CommandError(
        f"cannot tell the resource server of scope {scope!r}: pass --resource-server"
    )


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), whatever the umask."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


class _LoginStarted(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class FirstLoginFlowManager(CommandLineLoginFlowManager):
    """The command-line native-app flow, plus a two-step form for scripts.

    ``start_only``: save the PKCE verifier (0600) and stop after printing the URL;
    ``code``: finish the flow a ``start_only`` run began, with the code Globus showed.
    """

    def __init__(
        self,
        login_client: globus_sdk.NativeAppAuthClient,
        *,
        pending_path: Path,
        start_only: bool = False,
        code: str | None = None,
    ) -> None:
        super().__init__(
            login_client, request_refresh_tokens=True, native_prefill_named_grant=APP_NAME
        )
        self.native_client = login_client
        self.pending_path = pending_path
        self.start_only = start_only
        self.code = code

    def run_login_flow(
        self, auth_parameters: GlobusAuthorizationParameters
    ) -> globus_sdk.OAuthTokenResponse:
        if self.code is not None:
            return self._finish_pending(self.code)
        authorize_url = self._get_authorize_url(auth_parameters, self.redirect_uri)
        if self.start_only:
            self._save_pending(auth_parameters.required_scopes or [])
            raise _LoginStarted(authorize_url)
        self.print_authorize_url(authorize_url)
        return self.native_client.oauth2_exchange_code_for_tokens(self.prompt_for_code())

    def print_authorize_url(self, authorize_url: str) -> None:
        # stderr: stdout stays for what scripts capture.
        lines = ["Log in with Globus at this address:", "", f"  {authorize_url}", ""]
        if not self.native_client.base_url.startswith("https://auth.globus.org"):
            lines.append("(local stand-in: add &user=bob to the address to log in as bob)")
        print("\n".join(lines), file=sys.stderr)

    def prompt_for_code(self) -> str:
        print("Paste the authorization code here: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            raise CommandLineLoginFlowEOFError("no authorization code on stdin")
        return line.strip()

    def _save_pending(self, scopes: list[str]) -> None:
        flow = self.native_client.current_oauth2_flow_manager
        if not isinstance(flow, GlobusNativeAppFlowManager):
            raise CommandError("the login flow did not start")  # pragma: no cover
        pending = {
            "client_id": str(self.native_client.client_id),
            "auth_url": self.native_client.base_url,
            "redirect_uri": flow.redirect_uri,
            "verifier": flow.verifier,
            "scopes": scopes,
            "expires_at": int(time.time()) + PENDING_LIFETIME_S,
        }
        _write_private(self.pending_path, json.dumps(pending))

    def _finish_pending(self, code: str) -> globus_sdk.OAuthTokenResponse:
        try:
            pending: dict[str, Any] = json.loads(self.pending_path.read_text())
        except (OSError, ValueError):
            pending = {}
        if (
            pending.get("client_id") != str(self.native_client.client_id)
            or pending.get("auth_url") != self.native_client.base_url
            or pending.get("expires_at", 0) < time.time()
        ):
            raise CommandError(
                "no login in progress to finish: run `first-auth login --start`, open the "
                "address it prints, then `first-auth login --code CODE`"
            )
        self.native_client.oauth2_start_flow(
            pending["scopes"],
            redirect_uri=pending["redirect_uri"],
            verifier=pending["verifier"],
            refresh_tokens=True,
        )
        tokens = self.native_client.oauth2_exchange_code_for_tokens(code)
        self.pending_path.unlink(missing_ok=True)
        return tokens


def _login_client(settings: Settings) -> globus_sdk.NativeAppAuthClient:
    return globus_sdk.NativeAppAuthClient(client_id=settings.client_id, app_name=APP_NAME)


def _storage(settings: Settings, login_client: globus_sdk.NativeAppAuthClient) -> JSONTokenStorage:
    # One namespace per (native app, Globus Auth): stand-in tokens never meet real ones.
    namespace = f"{settings.client_id}@{login_client.base_url}"
    return JSONTokenStorage(settings.tokens_path, namespace=namespace)


@contextlib.contextmanager
def _user_app(
    settings: Settings,
    login_client: globus_sdk.NativeAppAuthClient | None = None,
    flow: FirstLoginFlowManager | None = None,
) -> Iterator[globus_sdk.UserApp]:
    login_client = login_client or _login_client(settings)
    settings.config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    requirements: dict[str, list[str]] = {AUTH_RESOURCE_SERVER: list(IDENTITY_SCOPES)}
    requirements.setdefault(settings.resource_server, []).append(settings.scope)
    config = globus_sdk.GlobusAppConfig(
        token_storage=_storage(settings, login_client),
        login_flow_manager=flow
        or FirstLoginFlowManager(login_client, pending_path=settings.pending_path),
        request_refresh_tokens=True,
        # Never start a login behind the user's back (`token` runs inside $(...)).
        token_validation_error_handler=None,
    )
    app = globus_sdk.UserApp(
        APP_NAME, login_client=login_client, scope_requirements=requirements, config=config
    )
    with app, login_client:
        yield app


def _username(app: globus_sdk.UserApp) -> str:
    info = globus_sdk.AuthClient(app=app).userinfo()
    return str(info.get("preferred_username") or info["sub"])


def cmd_login(settings: Settings, args: argparse.Namespace) -> int:
    """`first-auth login`: the native-app login (or its two halves, `--start` and `--code`); tokens
    are stored, not printed."""
    login_client = _login_client(settings)
    flow = FirstLoginFlowManager(
        login_client, pending_path=settings.pending_path, start_only=args.start, code=args.code
    )
    with _user_app(settings, login_client, flow) as app:
        if not (args.force or args.start or args.code) and not app.login_required():
            print(
                f"Already logged in as {_username(app)} (first-auth login --force to log in "
                "again).",
                file=sys.stderr,
            )
            return 0
        try:
            app.login(force=True)
        except _LoginStarted as started:
            print(started.url)
            print(
                "Open that address, log in, then: first-auth login --code CODE",
                file=sys.stderr,
            )
            return 0
        except CommandLineLoginFlowEOFError as err:
            raise CommandError(f"{err} (or use --start and --code)") from err
        except globus_sdk.AuthAPIError as err:
            raise CommandError(f"Globus Auth refused the login: {_describe(err)}") from err
        except TokenValidationError as err:
            # An identity change: tokens of one person must not mix with another's.
            raise CommandError(
                f"{err}: run `first-auth logout` before logging in as someone else"
            ) from err
        print(
            f"Logged in as {_username(app)}. Tokens saved in {settings.tokens_path}",
            file=sys.stderr,
        )
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    """`first-auth token`: print a valid access token for the gateway, refreshing it if needed."""
    with _user_app(settings) as app:
        try:
            authorizer = app.get_authorizer(settings.resource_server)
        except MissingTokenError as err:
            raise CommandError(f"not logged in: {LOGIN_HINT}") from err
        except TokenValidationError as err:
            raise CommandError(
                f"the stored login does not cover {settings.scope} ({err}): {LOGIN_HINT}"
            ) from err
        if not isinstance(authorizer, globus_sdk.RefreshTokenAuthorizer):
            raise CommandError(f"no refresh token stored: {LOGIN_HINT}")  # pragma: no cover
        expires_at = authorizer.expires_at
        try:
            if expires_at is None or expires_at - time.time() < args.min_valid:
                authorizer.handle_missing_authorization()  # refresh now
            header = authorizer.get_authorization_header()
        except globus_sdk.AuthAPIError as err:
            raise CommandError(
                f"could not refresh the token ({_describe(err)}): {LOGIN_HINT}"
            ) from err
        if header is None:
            raise CommandError(f"no access token: {LOGIN_HINT}")  # pragma: no cover
    print(header.removeprefix("Bearer "), flush=True)
    return 0


def cmd_whoami(settings: Settings, args: argparse.Namespace) -> int:
    """`first-auth whoami`: the identity the stored tokens belong to."""
    with _user_app(settings) as app:
        try:
            info = globus_sdk.AuthClient(app=app).userinfo()
        except TokenValidationError as err:
            raise CommandError(f"not logged in: {LOGIN_HINT}") from err
        except globus_sdk.AuthAPIError as err:
            raise CommandError(f"Globus Auth: {_describe(err)}: {LOGIN_HINT}") from err
    print(info.get("preferred_username") or info["sub"])
    for key in ("name", "sub", "identity_provider_display_name"):
        if info.get(key):
            print(f"  {key}: {info[key]}", file=sys.stderr)
    return 0


def cmd_logout(settings: Settings, args: argparse.Namespace) -> int:
    """`first-auth logout`: revoke the stored tokens (best effort) and forget them."""
    login_client = _login_client(settings)
    storage = _storage(settings, login_client)
    stored = storage.get_token_data_by_resource_server()
    unrevoked = 0
    with login_client:
        for data in stored.values():
            for token in (data.access_token, data.refresh_token):
                if not token:
                    continue
                try:
                    login_client.oauth2_revoke_token(token)
                except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError):
                    unrevoked += 1  # best effort: forget it locally all the same
            storage.remove_token_data(data.resource_server)
    storage.close()
    _drop_if_empty(settings.tokens_path)
    settings.pending_path.unlink(missing_ok=True)
    if not stored:
        print("Not logged in.", file=sys.stderr)
    elif unrevoked:
        print(
            f"Logged out; {unrevoked} token(s) could not be revoked at Globus Auth and will "
            "expire on their own.",
            file=sys.stderr,
        )
    else:
        print("Logged out; tokens revoked and deleted.", file=sys.stderr)
    return 0


def _drop_if_empty(path: Path) -> None:
    """Delete the token file when no namespace in it holds a token any more."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not any(content.get("data", {}).values()):
        path.unlink(missing_ok=True)


def _describe(err: globus_sdk.GlobusAPIError) -> str:
    data = err.raw_json or {}
    detail = data.get("error_description") or data.get("error") or err.text
    return f"HTTP {err.http_status}: {detail}"


# The local stack's default state file, as `first-gateway dev` writes it (its target module;
# copied, so that this package installs on its own; a unit test keeps the two equal).
STATE_DIR_VARIABLE = "FIRST_STATE_DIR"


def default_state_path() -> Path:
    """``$FIRST_STATE_DIR/stack.json``, else ``$XDG_RUNTIME_DIR/first/stack.json``, else
    ``~/.cache/first/stack.json``."""
    override = os.environ.get(STATE_DIR_VARIABLE, "")
    if override:
        return Path(override) / "stack.json"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "first" / "stack.json"
    return Path.home() / ".cache" / "first" / "stack.json"


def _read_stack_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        str(state["globus_auth_url"])
    except FileNotFoundError:
        raise UsageError(f"no state file at {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"cannot read {path}: {err.__class__.__name__}: {err}") from None
    return dict(state)


def _stack_runs(state: dict[str, Any]) -> bool:
    """The stack that wrote `state` is alive (its pid) and its gateway answers HTTP."""
    import urllib.error
    import urllib.request

    try:
        os.kill(int(state["pid"]), 0)
    except PermissionError:
        pass  # another user's process, alive
    except (OSError, KeyError, TypeError, ValueError):
        return False
    try:
        with urllib.request.urlopen(f"{state['base_url']}/health", timeout=3):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, KeyError):
        return False


def _auth_url(args: argparse.Namespace) -> str | None:
    """Globus Auth's address: ``--auth-url``, ``--stack-state``, globus-sdk's own variable, or,
    for the stand-in's native app (the default client id), the running local stack's."""
    if args.auth_url:
        return str(args.auth_url)
    if args.stack_state is not None:
        return str(_read_stack_state(args.stack_state)["globus_auth_url"])
    if os.environ.get("GLOBUS_SDK_SERVICE_URL_AUTH") or args.client_id != DEV_NATIVE_CLIENT_ID:
        return None  # globus-sdk's choice: that variable, or Globus Auth itself
    path = default_state_path()
    hint = (
        "start one with `first-gateway dev`, or, for a deployed gateway, set "
        "FIRST_AUTH_CLIENT_ID (your native app) and FIRST_AUTH_SCOPE"
    )
    try:
        state = _read_stack_state(path)
    except UsageError as err:
        raise UsageError(f"no running local stack ({err}): {hint}") from None
    if not _stack_runs(state):
        raise UsageError(f"the local stack in {path} is not running: {hint}")
    print(f"acting on the local stack at {state.get('base_url')}", file=sys.stderr)
    return str(state["globus_auth_url"])


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--client-id",
        default=os.environ.get("FIRST_AUTH_CLIENT_ID") or DEV_NATIVE_CLIENT_ID,
        help="Globus native app client id (env FIRST_AUTH_CLIENT_ID; default: the local "
        "stand-in's)",
    )
    common.add_argument(
        "--scope",
        default=os.environ.get("FIRST_AUTH_SCOPE") or DEV_GATEWAY_SCOPE,
        help="the gateway's Globus scope (env FIRST_AUTH_SCOPE; default: the local stand-in's)",
    )
    common.add_argument(
        "--resource-server",
        default=os.environ.get("FIRST_AUTH_RESOURCE_SERVER"),
        help="the scope's resource server, when it cannot be read from the scope",
    )
    common.add_argument(
        "--auth-url",
        help="Globus Auth's base URL (sets GLOBUS_SDK_SERVICE_URL_AUTH), e.g. a local stand-in",
    )
    common.add_argument(
        "--stack-state",
        type=Path,
        help="the local stack's --state-file: use its Globus stand-in (default, with the "
        "stand-in's client id: the running stack's default state file)",
    )

    parser = argparse.ArgumentParser(
        prog="first-auth", description="Globus login for a FIRST inference gateway."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    login = commands.add_parser(
        "login", parents=[common], help="log in with Globus (native app, PKCE)"
    )
    login.add_argument("--force", action="store_true", help="log in even if logged in already")
    steps = login.add_mutually_exclusive_group()
    steps.add_argument(
        "--start",
        action="store_true",
        help="print the login address on stdout and stop; finish with --code",
    )
    steps.add_argument("--code", help="finish a login begun with --start, with this code")
    token = commands.add_parser(
        "token", parents=[common], help="print a valid access token (for OPENAI_API_KEY)"
    )
    token.add_argument(
        "--min-valid",
        type=int,
        default=DEFAULT_MIN_VALID_S,
        metavar="SECONDS",
        help="refresh the token if it expires sooner than this (default 60)",
    )
    commands.add_parser("whoami", parents=[common], help="show who is logged in")
    commands.add_parser("logout", parents=[common], help="revoke and delete the stored tokens")
    return parser


COMMANDS = {"login": cmd_login, "token": cmd_token, "whoami": cmd_whoami, "logout": cmd_logout}


def main(argv: Sequence[str] | None = None) -> int:
    """The `first-auth` command; the exit status says whether it worked."""
    args = _parser().parse_args(argv)
    try:
        auth_url = _auth_url(args)
        if auth_url:
            os.environ["GLOBUS_SDK_SERVICE_URL_AUTH"] = auth_url
        settings = Settings(
            client_id=args.client_id,
            scope=args.scope,
            resource_server=args.resource_server or resource_server_of(args.scope),
            config_dir=config_dir(),
        )
        result: int = COMMANDS[args.command](settings, args)
        return result
    except CommandError as err:
        print(f"first-auth: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except globus_sdk.NetworkError as err:
        print(f"first-auth: cannot reach Globus Auth: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `first-auth token | head -c 10`: the reader left; that is not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
