"""The GPU compiler accepts the decode kernels (expand_shrunk's and gemv_lora's too), the grouped expand and the
gate-training route (gate_mix): compiled for an H100 (sm_90) here, where there is no GPU.

The interpreter tests (test_kernels.py) check what the kernels compute but run them as Python, which accepts code
that Triton's GPU code generator rejects; this lowers them to a cubin in a subprocess without TRITON_INTERPRET.
"""

import os
import subprocess
import sys


def test_kernels_compile_for_an_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_check", "--arch", "90", "--few"], check=False, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok  ") == 14 and "ok  bank_expand bf16 BM=16" in r.stdout, r.stdout
    assert "ok  gemv_lora bf16 BN=32" in r.stdout, r.stdout
    assert "ok  bank_expand bf16 BM=128 L>64" in r.stdout, r.stdout
    assert "ok  shrunk_expand bf16 logits" in r.stdout and "ok  shrunk_expand fp32 seq" in r.stdout, r.stdout
    assert "ok  gate_mix_fwd bf16" in r.stdout and "ok  gate_mix_bwd bf16" in r.stdout, r.stdout
