"""``python -m ddp_reduce.bench``: the benchmarks (:mod:`ddp_reduce.analysis.bench`)."""

import sys

from ddp_reduce.analysis.bench import main

if __name__ == "__main__":
    sys.exit(main())
