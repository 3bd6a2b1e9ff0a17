"""insightface's `unpack_glint360k.py` interface (`--include DIR1,DIR2 --output OUT`): runs `partial-fc unpack`."""

import sys

from partial_fc.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["unpack", *sys.argv[1:]]))
