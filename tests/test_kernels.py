"""The multi-LoRA op: Triton kernels (interpreted on CPU) and the torch paths against a float64 reference.

Every check draws fresh random inputs (never zeros), poisons the kernels' buffers with NaN (so an element no
kernel wrote shows up) and compares the output and every gradient (x, base, A, B, weights) by relative error.
Under the interpreter every tl.dot runs in fp32 (the interpreter's bf16 dot is unreliable): fp16/bf16 cases there
test the data path and rounding of the storage dtype, not tensor-core arithmetic; the `gpu` tests cover that.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_ops is first imported

from kernels import multi_lora
from kernels.dense import multi_lora_dense, multi_lora_gathered
from kernels.reference import multi_lora_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where backend="triton" tests run (interpreted on CPU)
DIFF = ("x", "base", "A", "B", "weights")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_inputs(
    T, d_in, d_out, L, R, K, dtype, *, ranks=None, routing="uniform", empty=0.2, seed=0, device="cpu"
):
    """Random op inputs; routing 'uniform', 'one' (every token on adapter L-1) or 'zipf'; ``empty`` = share of -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    base = torch.randn(T, d_out, generator=g)
    A = torch.randn(L, d_in, R, generator=g) / d_in**0.5
    B = torch.randn(L, R, d_out, generator=g) / R**0.5
    scales = torch.rand(L, generator=g) + 0.5
    if ranks is None:
        ranks = torch.randint(1, R + 1, (L,), generator=g)
    ranks = torch.as_tensor(ranks)
    if routing == "one":
        ids = torch.full((T, K), L - 1)
    elif routing == "zipf":
        p = 1.0 / torch.arange(1, L + 1, dtype=torch.float64)
        ids = torch.multinomial(p / p.sum(), T * K, replacement=True, generator=g).view(T, K)
    else:
        ids = torch.randint(0, L, (T, K), generator=g)
    ids = torch.where(torch.rand(T, K, generator=g) < empty, torch.full_like(ids, -1), ids)
    weights = torch.rand(T, K, generator=g) + 0.1
    cast = {"x": x, "base": base, "A": A, "B": B, "weights": weights}
    out = {k: v.to(device=device, dtype=dtype) for k, v in cast.items()}
    out.update(scales=scales.to(device), ranks=ranks.to(device), ids=ids.to(device))
    return out


def call(fn, inp, **kw):
    return fn(
        inp["x"],
        inp["base"],
        inp["A"],
        inp["B"],
        inp["scales"],
        inp["ranks"],
        inp["ids"],
        inp["weights"],
        **kw,
    )


def run_with_grads(fn, inp, grad_out, **kw):
    """Forward and backward of ``fn`` on leaf copies of ``inp``; returns (out, {name: grad}). An input the output
    does not read gets autograd's None, which is a zero gradient: zeros here, so a form that does not read it (the
    reference, where a single token's every slot is empty) compares with one that returns zeros."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in DIFF else v) for k, v in inp.items()}
    out = call(fn, leaves, **kw)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {k: torch.zeros_like(leaves[k]) if leaves[k].grad is None else leaves[k].grad for k in DIFF}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_fp64(inp, fn, tol, **kw):
    ref_inp = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    grad = torch.randn(inp["base"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_grads = run_with_grads(multi_lora_reference, {k: v.cpu() for k, v in ref_inp.items()}, grad)
    out, grads = run_with_grads(fn, inp, grad.to(inp["base"].device), **kw)
    assert torch.isfinite(out).all(), "output has unwritten (NaN-poisoned) elements"
    errs = {"out": rel_err(out, ref_out)}
    for k in DIFF:
        assert grads[k] is not None and torch.isfinite(grads[k]).all(), (
            f"grad of {k} missing or not fully written"
        )
        errs[k] = rel_err(grads[k], ref_grads[k])
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad}"
    return errs


def test_reference_gradcheck():
    inp = make_inputs(5, 6, 7, 3, 4, 2, torch.float64, ranks=[4, 2, 3])
    names = list(inp)

    def f(*vals):
        return call(multi_lora_reference, dict(zip(names, vals)))

    args = [v.requires_grad_(True) if k in DIFF else v for k, v in inp.items()]
    assert torch.autograd.gradcheck(f, args)


def test_dense_torch_path_matches_reference():
    for K, routing in ((1, "uniform"), (2, "zipf"), (4, "one")):
        inp = make_inputs(23, 12, 10, 5, 8, K, torch.float64, ranks=[8, 3, 0, 5, 1], routing=routing, seed=K)
        check_against_fp64(inp, multi_lora_dense, 1e-10)
        inp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
        check_against_fp64(inp32, multi_lora, 1e-5, backend="torch")


def test_gathered_torch_path_matches_reference():
    """The torch backend's decode form (fewer routed pairs than adapters): A[ids], B[ids] copies, per-token products."""
    for K, T, seed in ((1, 3, 0), (2, 2, 1), (4, 1, 2)):
        inp = make_inputs(T, 12, 10, 9, 8, K, torch.float64, ranks=[8, 3, 0, 5, 1, 8, 2, 7, 4], empty=0.3, seed=seed)
        check_against_fp64(inp, multi_lora_gathered, 1e-10)
        inp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
        check_against_fp64(inp32, multi_lora, 1e-5, backend="torch")


def test_gathered_path_reuses_route_and_bank_derivations_until_they_change():
    """Inference calls cache what depends only on the route or on scales/ranks (kernels.derived_cache); in-place
    updates (version bump), new tensors and sentence routing through seq_ids must all be seen."""
    inp = make_inputs(3, 12, 10, 9, 8, 2, torch.float32, ranks=[8, 3, 0, 5, 1, 8, 2, 7, 4], seed=4)

    def ref(i, seq_ids=None):
        return call(multi_lora_reference, {k: (v.double() if v.is_floating_point() else v) for k, v in i.items()},
                    seq_ids=seq_ids)

    with torch.no_grad():
        first = call(multi_lora_gathered, inp)
        assert rel_err(first, ref(inp)) < 1e-5
        assert torch.equal(call(multi_lora_gathered, inp), first)  # a cache hit gives the same result
        inp["weights"].mul_(2.0)  # same objects, changed in place
        inp["scales"].add_(0.5)
        second = call(multi_lora_gathered, inp)
        assert rel_err(second, ref(inp)) < 1e-5 and not torch.allclose(first, second)
        inp["ranks"] = torch.tensor([2, 3, 0, 5, 1, 8, 2, 7, 4])  # a new tensor (hot swap)
        assert rel_err(call(multi_lora_gathered, inp), ref(inp)) < 1e-5
        seq = dict(inp, ids=inp["ids"][:2].contiguous(), weights=inp["weights"][:2].contiguous())
        seq_ids = torch.tensor([1, 0, 1])
        for _ in range(2):
            assert rel_err(call(multi_lora_gathered, seq, seq_ids=seq_ids), ref(seq, seq_ids)) < 1e-5
        seq_ids[0] = 0  # in place: the per-token expansion must be redone
        assert rel_err(call(multi_lora_gathered, seq, seq_ids=seq_ids), ref(seq, seq_ids)) < 1e-5


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [(F32, 2, "small"), (F32, 1, "grouped"), (F32, 2, "grouped"), (F32, 4, "grouped"), (F16, 2, "grouped"),
         (F16, 4, "fused"), (BF16, 2, "small"), (BF16, 2, "grouped"), (F32, 3, "grouped"), (F32, 3, "fused"),
         (F32, 2, "bank"), (F32, 4, "bank_split"), (BF16, 2, "bank"), (F16, 3, "bank_small")]  # fmt: skip


def use_path(triton_ops, monkeypatch, path):
    """Force the forward onto one path: fused (one launch), small (two launches, split-K), grouped (sorted) or bank
    (every adapter; bank_split: its shrink split over d_in, bank_small: at small T, chunks skipped per row tile)."""
    from kernels import switches

    forced = {"fused": "token", "small": "token", "grouped": "grouped"}.get(path, "bank")
    monkeypatch.setattr(switches.state, "forward_path", forced)  # kernels.switches.forced_path, for the whole test
    monkeypatch.setattr(triton_ops, "SMALL_T_MAX", 10**9 if path in ("fused", "small", "bank_small") else 0)
    monkeypatch.setattr(triton_ops, "FUSED_T_MAX", 10**9 if path == "fused" else 0)
    cfg = dict(triton_ops._INTERPRETER_CONFIG, BANK_MIN_CHUNK=16 if path == "bank_split" else 10**9)
    monkeypatch.setattr(triton_ops, "_INTERPRETER_CONFIG", cfg)
    monkeypatch.setattr(triton_ops, "FUSED_L2_BYTES", float("inf"))
    monkeypatch.setattr(triton_ops, "FUSED_CHAIN_MAX", 10**9)


def test_fused_decode_dispatch_on_the_gpu_config():
    """Where the GPU takes the one-launch kernel (bf16): loops over d_in of at most 2 steps (rank 16 up to d_in 1024,
    rank 64 up to 256: measured on the H200, 8 steps at d_in 4096 lost 1.7-1.9x to two launches) and A re-read from
    L2 under 16 MB: SmolLM2's 576-wide inputs at r = 16 up to T = 64; LLaMA's 4096 / 14336, SmolLM2's down_proj
    (1536) and rank 64 at 576 go to the two-launch split-K path."""
    from kernels import triton_ops

    def bk(T, D, DO, BR):
        return triton_ops._fused_bk(triton_ops._CUDA_CONFIG, T, D, DO, BR, 2)

    assert bk(1, 576, 1536, 16) == 512 and bk(64, 576, 1536, 16) == 512 and bk(1, 1024, 1024, 16) == 512
    assert bk(1, 256, 1024, 64) == 128 and bk(1, 576, 576, 64) is None and bk(1, 1536, 576, 16) is None
    assert bk(1, 4096, 4096, 16) is None and bk(65, 576, 576, 16) is None
    assert bk(1, 4096, 4096, 64) is None and bk(1, 14336, 4096, 16) is None


@pytest.mark.parametrize("dtype,K,path", CASES)
def test_triton_matches_fp64_reference(triton_ops, monkeypatch, dtype, K, path):
    """Mixed ranks (24 = R, 5, 0 = unused adapter, 17) with R = 24 padded to 32 inside; d_out not a tile multiple."""
    use_path(triton_ops, monkeypatch, path)
    inp = make_inputs(17 if K < 4 else 9, 40, 36, 4, 24, K, dtype, ranks=[24, 5, 0, 17], seed=K, device=DEV)
    check_against_fp64(inp, multi_lora, TOL[dtype], backend="triton")


INFERENCE_CASES = [(F32, 1, "fused", True), (F32, 2, "fused", False), (F32, 4, "fused", True),
                   (F16, 2, "fused", True), (BF16, 4, "fused", False), (F32, 2, "small", True),
                   (F32, 2, "grouped", True), (F32, 2, "bank", True), (BF16, 4, "bank_small", True),
                   (F32, 1, "bank_split", False)]  # fmt: skip


@pytest.mark.parametrize("dtype,K,path,sentence", INFERENCE_CASES)
def test_triton_inference_path_matches_fp64_reference(triton_ops, monkeypatch, dtype, K, path, sentence):
    """The no-grad path (direct launches, sentence routing read through seq_ids by the kernels) against float64.

    Mixed ranks with a rank-0 adapter, -1 slots, d_in / d_out not tile multiples, T not a multiple of the tokens a
    program takes; the output is NaN-poisoned first and every element is compared.
    """
    use_path(triton_ops, monkeypatch, path)
    T = 19 if path in ("grouped", "bank", "bank_split") else 7
    inp = make_inputs(T, 40, 36, 5, 24, K, dtype, ranks=[24, 5, 0, 17, 1], empty=0.3, seed=10 + K, device=DEV)
    seq_ids = None
    if sentence:  # 3 sequences of unequal length, tokens interleaved; the routing rows are sequences
        seq_ids = torch.randint(0, 3, (T,), generator=torch.Generator().manual_seed(K)).to(DEV)
        inp = dict(inp, ids=inp["ids"][:3].contiguous(), weights=inp["weights"][:3].contiguous())
    ref = call(multi_lora_reference, {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in inp.items()},
               seq_ids=None if seq_ids is None else seq_ids.cpu())  # fmt: skip
    with torch.no_grad():
        out = call(multi_lora, inp, seq_ids=seq_ids, backend="triton")
    assert torch.isfinite(out).all(), "output has unwritten (NaN-poisoned) elements"
    assert rel_err(out, ref) < TOL[dtype]
    worst = ((out.double().cpu() - ref).abs() / ref.abs().max()).max().item()
    assert worst < 4 * TOL[dtype], f"an element is off by {worst:.2e} of the output's scale"


def test_inference_launches_directly_and_training_goes_through_the_custom_op(monkeypatch):
    from kernels import op

    def refuse(*args):
        raise AssertionError("custom op called")

    monkeypatch.setattr(op, "_multi_lora_op", refuse)
    inp = make_inputs(3, 16, 16, 3, 8, 2, torch.float32, device=DEV)
    with torch.no_grad():
        call(multi_lora, inp, backend="triton")
    call(multi_lora, inp, backend="triton")  # nothing requires grad: direct as well
    x = inp["x"].clone().requires_grad_(True)
    with pytest.raises(AssertionError, match="custom op called"):
        call(multi_lora, dict(inp, x=x), backend="triton")


def test_bank_in_another_dtype_is_cast_once_and_recast_after_an_update(triton_ops):
    from kernels import cast_cache

    inp = make_inputs(4, 16, 24, 3, 8, 2, torch.float16, device=DEV)
    A32, B32 = inp["A"].float(), inp["B"].float()
    with torch.no_grad():
        got = call(multi_lora, dict(inp, A=A32, B=B32), backend="triton")
        assert cast_cache.cast(A32, torch.float16) is cast_cache.cast(A32, torch.float16)
        torch.testing.assert_close(got, call(multi_lora, inp, backend="triton"), rtol=0, atol=0)
        A32.mul_(2.0)  # an in-place update (optimizer step) must not be served from the stale cast
        got2 = call(multi_lora, dict(inp, A=A32, B=B32), backend="triton")
        want2 = call(multi_lora, dict(inp, A=A32.half()), backend="triton")
    torch.testing.assert_close(got2, want2, rtol=0, atol=0)
    assert not torch.equal(got2, got)
    A32.data = A32.data * 0.5  # what module.to() does: new storage, same tensor, no version bump
    with torch.no_grad():
        got3 = call(multi_lora, dict(inp, A=A32, B=B32), backend="triton")
        want3 = call(multi_lora, dict(inp, A=A32.half()), backend="triton")
    torch.testing.assert_close(got3, want3, rtol=0, atol=0)


@pytest.mark.parametrize("routing,L,K,T,path", [("one", 3, 2, 33, "grouped"), ("zipf", 128, 1, 16, "grouped"),
                                                 ("uniform", 1, 1, 20, "grouped"), ("one", 3, 2, 33, "bank"),
                                                 ("zipf", 128, 1, 16, "bank"), ("uniform", 1, 1, 20, "bank")])  # fmt: skip
def test_triton_skewed_routing_and_bank_sizes(triton_ops, monkeypatch, routing, L, K, T, path):
    use_path(triton_ops, monkeypatch, path)
    inp = make_inputs(T, 16, 20, L, 8, K, torch.float32, routing=routing, empty=0.3, seed=L, device=DEV)
    check_against_fp64(inp, multi_lora, TOL[torch.float32], backend="triton")


@pytest.mark.parametrize("one_launch_groups", [0, 10**6])
def test_triton_wide_nucleus_per_slot_launches(triton_ops, monkeypatch, one_launch_groups):
    """A DLP-like wide nucleus (K = 6 slots of L = 9 adapters, sentence routing, grouped path): the shrink in one
    launch per slot (0) and in one launch for all slots (10**6) both match float64, forward and every gradient.
    The expand always takes one slot's L + 1 groups per launch."""
    use_path(triton_ops, monkeypatch, "grouped")
    monkeypatch.setattr(triton_ops, "SHRINK_ONE_LAUNCH_GROUPS", one_launch_groups)
    inp = make_inputs(13, 24, 20, 9, 8, 6, torch.float32, empty=0.25, seed=6, device=DEV)
    check_against_fp64(inp, multi_lora, TOL[torch.float32], backend="triton")
    seq_ids = torch.tensor([0, 1, 1, 0, 2, 2, 2, 1, 0, 0, 2, 1, 1], device=DEV)
    inp = dict(inp, ids=inp["ids"][:3].contiguous(), weights=inp["weights"][:3].contiguous())
    ref = call(multi_lora_reference, {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in inp.items()},
               seq_ids=seq_ids.cpu())  # fmt: skip
    with torch.no_grad():
        out = call(multi_lora, inp, seq_ids=seq_ids, backend="triton")
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("path", ["bank", "bank_small", "grouped", "small"])
def test_unrouted_adapters_and_columns_past_rank_never_reach_the_output(triton_ops, monkeypatch, path):
    """The bank path multiplies x by every adapter: NaN in A of an adapter no token routes to, or in A or B past an
    adapter's rank, must still stay out of the output (as on the routed paths, which never read them)."""
    use_path(triton_ops, monkeypatch, path)
    inp = make_inputs(21, 24, 20, 5, 8, 2, torch.float32, ranks=[8, 3, 5, 8, 2], empty=0.2, seed=4, device=DEV)
    ids = inp["ids"].clone()
    ids[ids == 4] = 1  # adapter 4 is routed by no token
    inp["ids"] = ids
    A, B = inp["A"].clone(), inp["B"].clone()
    for a, r in enumerate([8, 3, 5, 8, 2]):
        A[a, :, r:] = float("nan")
        B[a, r:, :] = float("nan")
    A[4] = float("nan")
    B[4] = float("inf")  # the bank expand masks the rows of the adapters no token of its row tile routes to
    clean = {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in inp.items()}
    ref = call(multi_lora_reference, clean)
    with torch.no_grad():
        out = call(multi_lora, dict(inp, A=A, B=B), backend="triton")
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]


def test_forward_path_dispatch_on_the_gpu_config(monkeypatch):
    """The bank path where the H200 measured it faster (kernel_bench_paths.md): prefill up to L * R = 128 bank
    columns, small T up to 64 columns or, for outputs at least twice as wide as inputs from T = 32, up to 448; the
    routed paths (sort-free token kernels at T <= 64, grouped above) elsewhere."""
    from kernels import triton_ops

    monkeypatch.setattr(triton_ops, "FORWARD_PATH", "auto")

    def path(T, L, R, D=4096, DO=4096):
        return triton_ops.forward_path(triton_ops._CUDA_CONFIG, T, L, R, D, DO)

    assert path(4096, 8, 16) == "bank" and path(4096, 28, 8) == "grouped" and path(4096, 28, 64) == "grouped"
    assert path(16, 4, 16) == "bank" and path(16, 8, 16) == "token" and path(1, 28, 8) == "token"
    assert path(64, 28, 16, 4096, 14336) == "bank" and path(16, 28, 16, 4096, 14336) == "token"
    assert path(64, 28, 16, 14336, 4096) == "token" and path(64, 28, 64, 4096, 14336) == "token"
    assert path(2**22, 8, 16) == "grouped"  # the h buffer ([T, L * R]) would pass 256 MB
    monkeypatch.setattr(triton_ops, "FORWARD_PATH", "dense")
    with pytest.raises(ValueError, match="use one of") as e:
        path(16, 4, 16)
    assert "LORAMUX_FORWARD_PATH='dense'" in str(e.value) and "\n" not in str(e.value)


def test_slots_pad_to_a_power_of_two():
    from kernels.triton_ops import pad_slots

    ids, w = torch.tensor([[3, -1, 0], [1, 2, 4]]), torch.tensor([[0.5, 0.0, 0.2], [0.1, 0.3, 0.6]])
    pi, pw = pad_slots(ids, w)
    assert pi.tolist() == [[3, -1, 0, -1], [1, 2, 4, -1]] and pw[:, 3].tolist() == [0.0, 0.0]
    assert torch.equal(pw[:, :3], w) and pi.dtype == ids.dtype and pw.dtype == w.dtype
    two = torch.tensor([[1, 2]])
    assert pad_slots(two, two.float())[0] is two  # already a power of two: untouched


def test_slot_group_ranges_are_each_slots_offsets():
    from kernels.triton_ops import slot_group_ranges

    off = torch.arange(3 * 5 + 1)  # K = 3 slots, L = 4 adapters + the empty group
    (whole,) = slot_group_ranges(off, 30, 4, 3, one_launch=True)
    assert whole[0] is off and whole[1:] == (15, 30)
    parts = slot_group_ranges(off, 30, 4, 3, one_launch=False)
    assert [(p[0][:6].tolist(), p[1], p[2]) for p in parts] == [
        ([0, 1, 2, 3, 4, 5], 5, 10), ([5, 6, 7, 8, 9, 10], 5, 10), ([10, 11, 12, 13, 14, 15], 5, 10)]


def test_all_slots_empty_gives_base_and_zero_adapter_grads(triton_ops):
    inp = make_inputs(6, 16, 16, 2, 16, 2, torch.float32, empty=1.0, device=DEV)
    out, grads = run_with_grads(multi_lora, inp, torch.randn(6, 16, device=DEV), backend="triton")
    assert torch.equal(out, inp["base"])
    for k in ("x", "A", "B", "weights"):
        assert torch.count_nonzero(grads[k]) == 0, k


def test_sentence_routing_equals_token_routing():
    inp = make_inputs(12, 16, 16, 3, 8, 2, torch.float32)
    seq_ids = torch.tensor([0] * 5 + [1] * 7)
    s_ids, s_w = inp["ids"][:2], inp["weights"][:2]
    tok = dict(inp, ids=s_ids[seq_ids], weights=s_w[seq_ids])
    for backend in ("torch", "triton", "reference"):
        if backend == "triton" and DEV == "cuda":
            inp, seq_ids, s_ids, s_w = (
                {k: v.cuda() for k, v in inp.items()},
                seq_ids.cuda(),
                s_ids.cuda(),
                s_w.cuda(),
            )
        got = multi_lora(
            *[inp[k] for k in ("x", "base", "A", "B", "scales", "ranks")],
            s_ids,
            s_w,
            seq_ids,
            backend=backend,
        )
        torch.testing.assert_close(got.cpu(), call(multi_lora_reference, tok), rtol=1e-5, atol=1e-5)


def test_leading_batch_dims_are_flattened():
    inp = make_inputs(12, 16, 16, 3, 8, 2, torch.float32)
    x3, b3 = inp["x"].view(3, 4, 16), inp["base"].view(3, 4, 16)
    got = multi_lora(x3, b3, *[inp[k] for k in ("A", "B", "scales", "ranks", "ids", "weights")])
    assert got.shape == (3, 4, 16)
    torch.testing.assert_close(got.view(12, 16), call(multi_lora_reference, inp))


def test_bad_shapes_raise_one_clear_line():
    inp = make_inputs(4, 8, 8, 2, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="ids and weights") as e:
        multi_lora(
            *[inp[k] for k in ("x", "base", "A", "B", "scales", "ranks", "ids")], inp["weights"][:, :0].T
        )
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown backend"):
        call(multi_lora, inp, backend="cuda-magic")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 300])
def test_gpu_bf16_against_fp64(T):
    inp = make_inputs(T, 512, 384, 28, 64, 2, torch.bfloat16, seed=T, device="cuda")
    check_against_fp64(inp, multi_lora, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("T,d_in,d_out,R,K,dtype,sentence", [
    (1, 576, 1536, 16, 1, torch.bfloat16, True), (8, 1536, 576, 16, 2, torch.bfloat16, False),
    (1, 4096, 4096, 16, 2, torch.bfloat16, False), (16, 576, 576, 64, 4, torch.bfloat16, True),
    (5, 4096, 14336, 64, 2, torch.bfloat16, False), (3, 576, 1536, 24, 2, torch.float32, True),
    (40, 576, 576, 16, 2, torch.bfloat16, True), (300, 576, 1536, 16, 2, torch.float16, True)])  # fmt: skip
def test_gpu_inference_path_against_fp64(T, d_in, d_out, R, K, dtype, sentence):
    """No-grad direct launches on SmolLM2 / LLaMA shapes: fused (short d_in loops, small L2 re-reads), two-launch,
    grouped."""
    inp = make_inputs(T, d_in, d_out, 28, R, K, dtype, empty=0.2, seed=T + R, device="cuda")
    seq_ids = None
    if sentence:
        S = min(4, T)  # sequences: per-sequence routing rows come from the first S token rows
        seq_ids = torch.randint(0, S, (T,), generator=torch.Generator().manual_seed(T)).cuda()
        inp = dict(inp, ids=inp["ids"][:S].contiguous(), weights=inp["weights"][:S].contiguous())
    ref = call(multi_lora_reference, {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in inp.items()},
               seq_ids=None if seq_ids is None else seq_ids.cpu())  # fmt: skip
    with torch.no_grad():
        out = call(multi_lora, inp, seq_ids=seq_ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else TOL[dtype])


@pytest.mark.gpu
def test_gpu_fp32_against_fp64():
    inp = make_inputs(200, 256, 320, 6, 16, 2, torch.float32, seed=3, device="cuda")
    check_against_fp64(inp, multi_lora, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4, 256])
def test_gpu_forward_and_backward_capture_in_a_cuda_graph(T):
    inp = make_inputs(T, 256, 256, 8, 16, 2, torch.bfloat16, seed=5, device="cuda")
    leaves = {k: (v.clone().requires_grad_(True) if k in DIFF else v) for k, v in inp.items()}
    grad = torch.randn_like(inp["base"])

    def step():
        for v in leaves.values():
            v.grad = None
        out = call(multi_lora, leaves)
        out.backward(grad)
        return out.detach(), leaves["x"].grad, leaves["A"].grad, leaves["weights"].grad

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_torch_compile_holds_the_op():
    inp = make_inputs(64, 128, 128, 4, 16, 2, torch.bfloat16, seed=7, device="cuda")
    compiled = torch.compile(lambda *a: call(multi_lora, dict(zip(inp, a))) * 2, fullgraph=True)
    got = compiled(*inp.values())
    torch.testing.assert_close(got, call(multi_lora, inp) * 2)


def test_cached_casts_only_where_nothing_traces_or_differentiates_them():
    """One rule for the op's direct launch and the uniform path: no gradient needed, not compiling, not capturing."""
    from kernels.cast_cache import may_cache

    frozen, trained = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    assert may_cache(frozen) and not may_cache(frozen, trained)
    with torch.no_grad():
        assert may_cache(frozen, trained)  # no graph is recorded: the detached cached copy is exact
    seen = []

    def probe(t):
        seen.append(may_cache(t))
        return t * 2

    torch.compile(probe, backend="eager", fullgraph=True)(frozen)
    assert seen == [False]  # traced once by dynamo, which must see the cast itself
