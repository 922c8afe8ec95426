#!/usr/bin/env python
"""vlmkit vs transformers, side by side, on one checkpoint folder.

    python benchmarks/run_bench.py FOLDER [--repeats 3] [--quick] [--int8] [--threads N]
                                          [--new-tokens 32] [--json out.json]

The same as ``vlmkit bench FOLDER ...``; see :mod:`vlmkit.bench` for what is measured.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmkit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
