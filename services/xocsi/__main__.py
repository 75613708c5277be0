"""``python -m services.xocsi``: the same as the ``xocsi`` console script."""

import sys

from services.xocsi.cli import main

if __name__ == "__main__":
    sys.exit(main())
