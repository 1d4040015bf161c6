import sys

from first_auth.cli import main

sys.exit(main())
