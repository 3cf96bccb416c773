"""Model-level benchmark, the script form of ``mpvg bench``; the logic is in ``mpvg_kernels.benchmark.models``.

python benchmarks/bench_models.py --smoke                     # < 1 minute, tiny model, eager
python benchmarks/bench_models.py                             # the full CPU run (see docs/bench_export.md)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, also when one is installed

from mpvg_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
