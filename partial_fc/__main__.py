"""`python -m partial_fc` runs the `partial-fc` command."""

from partial_fc.cli.main import run

run()
