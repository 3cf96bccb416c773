"""Op benchmark: the fused ops of every available backend vs eager PyTorch vs torch.compile, interleaved in one run.

The logic is in :mod:`mpvg_kernels.benchmark.ops` (its docstring describes the candidates, bytes and timing).

    python benchmarks/bench_ops.py                    # full run: CPU, 1 thread, fp32 + bf16, all shapes
    python benchmarks/bench_ops.py --quick --out /tmp/b   # CI smoke run (< 30 s)
    python benchmarks/bench_ops.py --device cuda       # GPU: triton backend, CUDA-event timing
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's package, also when another copy is installed

from mpvg_kernels.benchmark.ops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=HERE / "results"))
