"""What the dashboard's routes answer a browser with: the page and its assets (shipped under
`chalicelib/dashboard_assets/`, nothing from a CDN), the headers every page carries (a strict
Content-Security-Policy: scripts, styles and connections from this origin only, no inline
script), and the little HTML page for a sign-in that failed."""

from __future__ import annotations

import html
import re
from pathlib import Path

from first_core.errors import GatewayError, NotFoundError

# Only 'self': the page's script and style are files of their own, Chart.js is shipped.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}
# The dashboard's files, by name (no path ever reaches the file system from a URL).
ASSETS = ("dashboard.js", "dashboard.css", "chart.umd.min.js", "chart.js-LICENSE.md")
_DEV_USER = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def asset(folder: Path, name: str) -> tuple[str, str]:
    """An asset's text and content type; 404 for any name not listed."""
    if name not in (*ASSETS, "index.html"):
        raise NotFoundError(f"No dashboard asset '{name[:80]}'.")
    return (folder / name).read_text(encoding="utf-8"), ASSET_TYPES[Path(name).suffix]


def dev_user(value: str | None) -> str | None:
    """The `user=` a sign-in passes to the authorize page (the local stand-in's dev user), if
    it is a plain name."""
    return value if value and _DEV_USER.match(value) else None


def signin_failed(error: GatewayError, login_url: str) -> str:
    """The page for a sign-in that did not work: what Globus or the gateway said, and a link to
    try again (as another user, locally)."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        "<title>FIRST dashboard: not signed in</title>"
        '<link rel=stylesheet href="assets/dashboard.css"></head><body><main class=signin>'
        f"<h1>Not signed in</h1><p role=alert>{html.escape(error.message)}</p>"
        f'<p><a href="{html.escape(login_url)}">Sign in again</a></p></main></body></html>'
    )
