"""Benchmarks and checks of the op, kept apart from it (they import the op, never the other way round).

    python -m kernels.bench [--quick] [--paths] [--overhead] --out DIR   GPU timings -> kernel_bench*.{json,md}
    python -m kernels.bench --epilogue --out DIR                          a group's decode GEMM + expand_shrunk
    python -m kernels.bench.compile_check [--few]                         compile the kernels for sm_90, no GPU

``kernel_bench`` times whole layers against the base linear; ``overhead`` the host cost per decode call;
``epilogue`` a projection group's decode GEMM and its ``expand_shrunk`` epilogue, piece by piece;
``compile_check`` lowers every kernel configuration with Triton's compiler.
"""
