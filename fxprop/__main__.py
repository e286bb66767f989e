"""``python -m fxprop demo`` (also the ``fxprop`` console script)."""

import sys

from .cli import main  # noqa: F401  (the console script entry)

if __name__ == "__main__":
    sys.exit(main())
