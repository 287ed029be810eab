"""Compile the Triton kernels for a GPU target on a machine without one: ``python -m kernels.bench.compile_check``.

Triton's compiler needs no device: ``triton.compile`` lowers a kernel to PTX and a cubin (its bundled ptxas) for
any ``GPUTarget``. This compiles the decode kernels (and the grouped prefill / training ones) in the configurations the launchers use (bf16 / fp32, token and
sentence routing, ranks 16 and 64) for an H100 (sm_90), so a kernel that the CPU interpreter accepts but the GPU
compiler rejects fails here, in CPU CI, instead of on the GPU. It prints each kernel's registers and spills when
ptxas reports them. Run it without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common.cli_args import ArgumentParser

# keys a configuration's constants may carry besides the kernel's own: the parameters a launch specialises as
# divisible by 16 (16-byte aligned pointers, strides and sizes that are multiples of 16, as Triton does at run time;
# without them a load cannot become cp.async and the loop is not software-pipelined), and num_stages
ALIGNED, STAGES = "__aligned__", "__num_stages__"


def signature(fn, dtypes: dict, constants: dict):
    """(signature, constexprs) for ``triton.compile``: pointers (and any other param) typed by name in ``dtypes``,
    the rest i32."""
    sig, consts = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr or name in constants:
            sig[name] = "constexpr"
            consts[(i,)] = constants[name] if name in constants or not p.has_default else p.default
        elif name.endswith("_ptr") or name in dtypes:
            sig[name] = dtypes[name]
        else:
            sig[name] = "i32"
    return sig, consts


def configurations():
    """(name, kernel, pointer dtypes, constants): the token (decode) kernels as ``triton_ops.forward`` launches them."""
    from kernels import triton_kernels as tk  # lazy: importing Triton is what this check is about to do
    from kernels.triton_ops import _CUDA_CONFIG as cfg

    out = []
    for dt in ("bf16", "fp32"):
        for seq in (False, True):
            common = {"ids_ptr": "*i64", "seq_ptr": "*i64", "ranks_ptr": "*i32", "scales_ptr": "*fp32",
                      "gate_ptr": f"*{dt}", "part_ptr": "*fp32"}  # fmt: skip
            data = {n: f"*{dt}" for n in ("x_ptr", "a_ptr", "b_ptr", "w_ptr", "base_ptr", "out_ptr")}
            ptrs = {**common, **data}
            for br in (16, 64):
                bk = cfg["FTILE"] // br
                out.append((f"token_fused {dt} seq={seq} BR={br}", tk.token_fused_kernel, ptrs,
                            {"K": 2, "TT": 1, "BK": bk, "BN": cfg["FBN"], "BR": br, "SEQ": seq}))  # fmt: skip
            out.append((f"token_shrink {dt} seq={seq}", tk.token_shrink_kernel, ptrs,
                        {"K": 2, "SPLIT": 3, "PP": 1, "BK": cfg["TBK"], "BR": 16, "SEQ": seq}))  # fmt: skip
            out.append((f"token_expand {dt} seq={seq}", tk.token_expand_kernel, ptrs,
                        {"K": 2, "SPLIT": 3, "SP": 4, "TT": 1, "BN": cfg["TBN"], "BR": 16, "SEQ": seq}))  # fmt: skip
    for dt in ("bf16", "fp32"):  # the grouped (prefill / training) kernels, as _shrink / _expand launch them
        ptrs = {"perm_ptr": "*i32", "off_ptr": "*i32", "ranks_ptr": "*i32", "scales_ptr": "*fp32", "u_ptr": "*fp32",
                "gate_ptr": f"*{dt}", **{n: f"*{dt}" for n in ("x_ptr", "w_ptr", "src_ptr", "out_ptr")}}  # fmt: skip
        out.append((f"grouped_shrink {dt}", tk.grouped_shrink_kernel.fn, ptrs,
                    {"K": 6, "BM": 64, "BK": 64, "BR": 16, "GP": 128, "F32": dt == "fp32", "ATOMIC": True}))  # fmt: skip
        out.append((f"grouped_expand {dt}", tk.grouped_expand_kernel.fn, ptrs,
                    {"K": 6, "BM": 64, "BN": 128, "BR": 16, "GP": 128, "F32": dt == "fp32", "ZERO_SRC": False}))  # fmt: skip
    from kernels import triton_bank as tb  # lazy, as above

    for dt in ("bf16", "fp32"):  # the bank-wide kernels: a decode step (split, skipping) and a prefill tile
        ptrs = {"ids_ptr": "*i64", "seq_ptr": "*i64", "ranks_ptr": "*i32", "scales_ptr": "*fp32", "gate_ptr": f"*{dt}",
                **{n: f"*{dt}" for n in ("x_ptr", "a_ptr", "b_ptr", "base_ptr", "out_ptr")}}  # fmt: skip
        for bm, small in ((16, True), (128, False)):
            hp = dict(ptrs, h_ptr="*fp32" if small else f"*{dt}")
            out.append((f"bank_shrink {dt} BM={bm}", tb.bank_shrink_kernel.fn, hp,
                        {"R": 16, "K": 2, "BM": bm, "BN": cfg["BANK_BN"], "BK": 64, "SEQ": small, "SKIP": small,
                         "F32": dt == "fp32"}))  # fmt: skip
            for one_window in (True, False):  # the routed-adapter set once per program (L <= 64), or per chunk
                out.append((f"bank_expand {dt} BM={bm}" + ("" if one_window else " L>64"), tb.bank_expand_kernel.fn,
                            hp, {"R": 16, "K": 2, "SPLIT": 8 if small else 1, "BM": bm, "BN": 128, "BK": 32,
                                 "SEQ": small, "SKIP": small, "ONE_WINDOW": one_window, "F32": dt == "fp32"}))  # fmt: skip
    from kernels import shrunk_expand as se
    from kernels import triton_shrunk_expand as tse  # lazy, as above

    for dt in ("bf16", "fp32"):  # the decode epilogue over a precomputed shrink: MeteoRA (logits) and DLP (seq_ids)
        ptrs = {"cm_ptr": "*i32", "ids_ptr": "*i64", "w_ptr": "*fp32", "seq_ptr": "*i64", "inv_temp": "fp32",
                **{n: f"*{dt}" for n in ("y_ptr", "h_ptr", "b_ptr", "out_ptr", "lg_ptr")}}  # fmt: skip
        for mode in ("logits", "seq"):
            out.append((f"shrunk_expand {dt} {mode}", tse.shrunk_expand_kernel, ptrs,
                        {"R": 16, "BR": 16, "K": 2, "BN": se.default_block_n(16, "cuda"), "SEQ": mode == "seq",
                         "LOGITS": mode == "logits", "LP": 32, "KP": 2}))  # fmt: skip
        # rank 8 over 4 adapters: the shape at which an earlier form of the logits path broke Triton 3.6's compiler
        out.append((f"shrunk_expand {dt} logits r8 L4", tse.shrunk_expand_kernel, ptrs,
                    {"R": 8, "BR": 8, "K": 2, "BN": 128, "SEQ": False, "LOGITS": True, "LP": 4, "KP": 2}))
        # the 8B decode default (rank 8, 28 adapters, BN 32; blocks inside one member) and the narrowest block the
        # benchmark sweeps
        for bn in (se.default_block_n(8, "cuda"), 16):
            out.append((f"shrunk_expand {dt} logits r8 L28 BN={bn}", tse.shrunk_expand_kernel, ptrs,
                        {"R": 8, "BR": 8, "K": 2, "BN": bn, "SEQ": False, "LOGITS": True, "LP": 32, "KP": 2,
                         "ONE_MEMBER": True}))  # fmt: skip
    from kernels import packed_gemv as gl
    from kernels import triton_packed_gemv as tgl  # lazy, as above

    # a uniform route's decode GEMV with the LoRA in its epilogue, and the base alone, specialised as the 8B shape's
    # launch is (aligned pointers, d_in and strides multiples of 16): pipelined, num_stages as gemv_lora launches it
    spec = {ALIGNED: ("x_ptr", "w_ptr", "b_ptr", "out_ptr", "N", "D", "sxt", "swn", "sbe", "sot"),
            STAGES: gl.NUM_STAGES}
    for dt in ("bf16", "fp32"):
        ptrs = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "b_ptr", "out_ptr")}
        for bn in (16, gl.default_block_n("cuda"), 64):
            for lora in (True, False):
                out.append((f"gemv_lora {dt} BN={bn}" + ("" if lora else " base"), tgl.gemv_lora_kernel, ptrs,
                            {"BT": gl.BLOCK_T, "BN": bn, "BE": 32, "BK": gl.BLOCK_K, "HAS_LORA": lora,
                             "F32": dt == "fp32", **spec}))  # fmt: skip
        if dt == "bf16":  # the benchmark's wider d_in step
            out.append(("gemv_lora bf16 BN=16 BK=256", tgl.gemv_lora_kernel, ptrs,
                        {"BT": gl.BLOCK_T, "BN": 16, "BE": 32, "BK": 256, "HAS_LORA": True, "F32": False, **spec}))
    from kernels import triton_gate_mix as tgm  # lazy, as above

    # a learning gate's route, multiply and CE (kernels.gate_mix), forward and backward, at SmolLM2's gate-training
    # shape (28 adapters of rank 8, top-2, labels), the logits in bf16 (autocast's) or fp32
    bt, bl, br = tgm._blocks(28, 8, "cuda")
    for dt in ("bf16", "fp32"):
        ptrs = {"y_ptr": "*i64", "brk_ptr": "*i1", "ce_ptr": "*fp32", "dce_ptr": "*fp32", "inv_temp": "fp32",
                **{n: f"*{dt}" for n in ("h_ptr", "z_ptr", "hc_ptr", "dhc_ptr", "dh_ptr", "dz_ptr")}}  # fmt: skip
        for name, kernel in (("fwd", tgm.gate_mix_fwd_kernel), ("bwd", tgm.gate_mix_bwd_kernel)):
            out.append((f"gate_mix_{name} {dt}", kernel, ptrs,
                        {"K": 2, "BT": bt, "BL": bl, "BR": br, "HAS_LABELS": True}))
    return out


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = H100)")
    ap.add_argument("--few", action="store_true",
                    help="each kernel once, both SEQ branches of the fused one (CI: a cold compile cache costs ~3 s each)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernels.bench.compile_check: unset TRITON_INTERPRET (the interpreter has no compiler to check)")
    target = GPUTarget("cuda", args.arch, 32)
    configs = configurations()
    if args.few:
        few = ("token_fused bf16 seq=False BR=16", "token_fused fp32 seq=True BR=64", "token_shrink bf16 seq=True",
               "token_expand fp32 seq=False", "grouped_expand bf16", "bank_shrink bf16 BM=16",
               "bank_expand bf16 BM=16", "bank_expand bf16 BM=128 L>64", "shrunk_expand bf16 logits",
               "shrunk_expand bf16 logits r8 L28 BN=32",
               "shrunk_expand fp32 seq", "gemv_lora bf16 BN=32", "gate_mix_fwd bf16", "gate_mix_bwd bf16")  # fmt: skip
        configs = [c for c in configs if c[0] in few]
    for name, fn, ptrs, constants in configs:
        sig, consts = signature(fn, ptrs, constants)
        names = [p.name for p in fn.params]
        aligned = constants.pop(ALIGNED, ())  # what a launch specialises as divisible by 16 (see ALIGNED)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        options = {"num_warps": 4, **({"num_stages": constants.pop(STAGES)} if STAGES in constants else {})}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options=options)  # fmt: skip
        assert k.asm.get("cubin"), f"{name}: no cubin"
        print(f"ok  {name:<34} sm_{args.arch}  shared {k.metadata.shared} B", flush=True)


if __name__ == "__main__":
    main()
