"""`python -m tlora_hooks ...` runs the command-line interface."""

import sys

from .commands import main

sys.exit(main())
