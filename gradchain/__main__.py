"""``python -m gradchain``: the command line (see :mod:`gradchain.cli`)."""

import sys

from gradchain.cli import main

if __name__ == "__main__":
    sys.exit(main())
