"""`python -m partial_fc` runs the `partial-fc` command."""

import sys

from partial_fc.cli.main import main

sys.exit(main())
