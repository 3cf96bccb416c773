"""Model-level benchmark (issue 6): the script form of ``mpvg bench``; the logic is in ``mpvg_kernels.bench``.

python benchmarks/bench_models.py --smoke                     # < 1 minute, tiny model, eager
python benchmarks/bench_models.py                             # the full CPU run (see docs/bench_export.md)
"""

from __future__ import annotations

import argparse
import sys

from mpvg_kernels.benchmark.models import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
