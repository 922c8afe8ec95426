"""``python -m vlmkit.bench SOURCE ...``: the same as ``vlmkit bench SOURCE ...``."""

import sys

from .run import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
