"""How test workers end: a PartialFCError becomes the CLI's one-line error and exit 2; each rank records its
exit status in `out/rank<k>.exit` so a test can check every rank, then the communicator is closed."""

import sys
from collections.abc import Callable
from pathlib import Path

from partial_fc.comm import Communicator, close_communicator, exit_process
from partial_fc.errors import PartialFCError


def run_and_exit(comm: Communicator, out: str, work: Callable[[], None]) -> None:
    """Run `work()`, report like `partial-fc` does, record the status, close and exit with it."""
    status = 0
    try:
        work()
    except PartialFCError as error:
        print(f"partial-fc: error: {error}", file=sys.stderr, flush=True)
        status = 2
    (Path(out) / f"rank{comm.rank}.exit").write_text(str(status))
    close_communicator()
    exit_process(status)
