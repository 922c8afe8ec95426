"""``python -m vlmkit ...``: the command line (so ``accelerate launch -m vlmkit train ...`` works)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
