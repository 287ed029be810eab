"""``python -m kernels.bench``: the op's GPU benchmark (``kernels/bench/kernel_bench.py``)."""

from kernels.bench.kernel_bench import main

main()
