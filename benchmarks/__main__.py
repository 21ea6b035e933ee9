"""``python -m benchmarks``: see ``benchmarks.run``."""

import sys

from benchmarks.run import main

if __name__ == "__main__":  # the load generator's spawned processes import this module too
    sys.exit(main())
