"""`python -m router.bench`: the same as `router bench`."""

import sys

from router.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
