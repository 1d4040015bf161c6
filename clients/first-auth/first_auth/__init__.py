"""first-auth: Globus login for FIRST gateway users (`login`, `token`, `whoami`, `logout`)."""

from first_auth.cli import main

__all__ = ["main"]
