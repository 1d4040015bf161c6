"""`python -m first_auth`: the `first-auth` command."""

import sys

from first_auth.cli import main

sys.exit(main())
