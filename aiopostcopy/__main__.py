"""``python -m aiopostcopy``: see :mod:`aiopostcopy.cli`."""

import sys

from aiopostcopy.cli import main

if __name__ == "__main__":
    sys.exit(main())
