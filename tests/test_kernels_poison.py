"""One bad adapter never poisons the others: NaN / Inf where no token should read, on every path of the op.

Three places a value must never come from, whatever the bank holds there:
  unrouted   an adapter no token of the call routes to (one NaN / Inf in its A and one in its B)
  padding    A's columns / B's rows past an adapter's rank (all of them)
  empty      empty slots (id -1): adapter 0, which an empty slot would read if it gathered, is poisoned and
             routed by nobody, and the empty slots' weights are poisoned too
Every check draws fresh random inputs, poisons a copy, and compares the output and every gradient (x, base, A, B,
weights) of the poisoned call with the float64 reference on the clean inputs: equal within the path's tolerance,
and finite. Paths: the reference, the torch backend's dense and gathered forms, every Triton forward path (forced
through ``use_path``, with the grouped backward; interpreted on CPU), auto dispatch (the narrow bank at T > 64 that
used to turn every output NaN) and the sequence-concatenated form. A last group routes some tokens *to* a broken
adapter: the other tokens stay clean (per token on the routed paths, per row tile on the Triton bank path).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_ops is first imported

from test_kernels import DEV, DIFF, TOL, call, make_inputs, rel_err, run_with_grads, use_path

from kernels import multi_lora
from kernels.reference import multi_lora_reference
from kernels.sequence_concat import multi_lora_per_sequence

# the interpreter computes the discarded products in numpy, which warns about the NaN it then throws away
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")
RANKS = [8, 3, 5, 8, 2]  # L = 5, R = 8: adapters 1, 2 and 4 have padding
KINDS = ("unrouted", "padding", "empty")
TRITON_PATHS = ("fused", "small", "grouped", "bank", "bank_split", "bank_small")
PATHS = ("reference", "torch_dense", "torch_gathered", *TRITON_PATHS, "auto", "sequence_concat")


def _spot(t: torch.Tensor, g: torch.Generator, value: float) -> None:
    """One element of ``t`` (a view into the bank) set to ``value``, at a random place."""
    t[tuple(int(torch.randint(0, n, (1,), generator=g)) for n in t.shape)] = value


def poisoned_inputs(kinds, value, T, K, seed, *, L=5, R=8, ranks=None, dtype=torch.float32, device="cpu"):
    """(clean, poisoned) op inputs: the routing is arranged so that the poisoned places are unread."""
    ranks = RANKS if ranks is None else ranks
    inp = make_inputs(T, 24, 20, L, R, K, dtype, ranks=ranks, empty=0.25, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    ids = inp["ids"].clone()
    if "unrouted" in kinds:
        ids[ids == L - 1] = 1  # adapter L - 1: no token
    if "empty" in kinds:
        ids[ids == 0] = 2  # adapter 0: no token, and a few empty slots for sure
        ids[:: max(T // 4, 1), -1] = -1
    clean = dict(inp, ids=ids)
    A, B, w = inp["A"].clone(), inp["B"].clone(), inp["weights"].clone()
    if "unrouted" in kinds:
        _spot(A[L - 1, :, : ranks[L - 1]], g, value)
        _spot(B[L - 1, : ranks[L - 1]], g, value)
    if "padding" in kinds:
        for a, r in enumerate(ranks):
            A[a, :, r:] = value
            B[a, r:, :] = value
    if "empty" in kinds:
        _spot(A[0, :, : ranks[0]], g, value)
        _spot(B[0, : ranks[0]], g, value)
        w[ids < 0] = value
    bad = dict(clean, A=A, B=B, weights=w)
    move = {k: v.to(device) for k, v in bad.items()}
    return clean, move


def _fp64(inp):
    return {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in inp.items()}


def _as_sequences(inp, S):
    """Token inputs [S * Lq, ...] as the folded form takes them: x [S, Lq, d], ids/weights per sequence [S, K]."""
    Lq = inp["x"].shape[0] // S
    seq_ids = torch.arange(S).repeat_interleave(Lq)
    rows = torch.arange(S) * Lq
    return (dict(inp, ids=inp["ids"][rows].contiguous(), weights=inp["weights"][rows].contiguous()), seq_ids, Lq)


def run_path(path, inp, grad, monkeypatch, triton_ops):
    """Forward and backward of ``path`` on ``inp``; returns (out [T, d_out], {name: grad}). ``grad=None``: the
    forward alone, under no_grad (the inference paths)."""
    if grad is None:
        with torch.no_grad():
            return run_path(path, inp, torch.zeros(()), monkeypatch, triton_ops)
    run = run_with_grads if torch.is_grad_enabled() else _forward
    if path == "reference":
        return run(multi_lora_reference, inp, grad)
    if path.startswith("torch"):
        return run(multi_lora, inp, grad, backend="torch")
    if path == "sequence_concat":
        seq, _, Lq = _as_sequences(inp, 3)
        S = 3

        def folded(x, base, A, B, scales, ranks, ids, weights):
            out = multi_lora_per_sequence(x.view(S, Lq, -1), base.view(S, Lq, -1), A, B, scales, ranks, ids, weights)
            return out.reshape(S * Lq, -1)

        return run(folded, seq, grad)
    if path != "auto":
        use_path(triton_ops, monkeypatch, path)
    return run(multi_lora, inp, grad, backend="triton")


def _forward(fn, inp, grad, **kw):
    return call(fn, inp, **kw), None


def _shape(path):
    """(T, K): few pairs for the gathered form and the sort-free token paths, more elsewhere."""
    return {"torch_gathered": (3, 2), "fused": (7, 2), "small": (7, 4)}.get(path, (21, 2))


def _clean_reference(path, clean, grad):
    if path == "sequence_concat":
        seq, seq_ids, _ = _as_sequences(clean, 3)
        leaves = {k: (v.detach().double().requires_grad_(True) if k in DIFF else v) for k, v in _fp64(seq).items()}
        out = call(multi_lora_reference, leaves, seq_ids=seq_ids)
        out.backward(grad.double())
        return out.detach(), {k: leaves[k].grad for k in DIFF}
    return run_with_grads(multi_lora_reference, _fp64(clean), grad.double())


# each poison alone on the cheap paths; on the interpreted Triton paths all three at once (one case per path)
CASES = [(path, (kind,), (NAN, INF, -INF)[(i + j) % 3]) for i, path in enumerate(PATHS) if path not in TRITON_PATHS
         and path != "auto" for j, kind in enumerate(KINDS)]
CASES += [(path, KINDS, (NAN, INF, -INF)[i % 3]) for i, path in enumerate((*TRITON_PATHS, "auto"))]


@pytest.mark.parametrize("path,kinds,value", CASES)
def test_poison_where_no_token_reads_never_reaches_output_or_gradients(triton_ops, monkeypatch, path, kinds, value):
    T, K = _shape(path)
    if path == "sequence_concat":
        T, K = 15, 4  # 3 sequences of 5 tokens, a wide nucleus
    seed = 7 * PATHS.index(path) + KINDS.index(kinds[0])
    clean, bad = poisoned_inputs(set(kinds), value, T, K, seed, dtype=torch.float64 if path == "reference" else
                                 torch.float32, device=DEV if path in (*TRITON_PATHS, "auto") else "cpu")
    grad = torch.randn(T, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref_out, ref_grads = _clean_reference(path, clean, grad)
    out, grads = run_path(path, bad, grad.to(bad["base"].device), monkeypatch, triton_ops)
    tol = 1e-10 if path == "reference" else TOL[torch.float32]
    assert torch.isfinite(out).all(), f"{path}: {value} in the {kinds} places reached the output"
    assert rel_err(out, ref_out) < tol
    for k in DIFF:
        assert torch.isfinite(grads[k]).all(), f"{path}: {value} in the {kinds} places reached the gradient of {k}"
        assert rel_err(grads[k], ref_grads[k]) < tol, k


def test_narrow_bank_at_prefill_under_auto_dispatch(triton_ops):
    """The shape that turned every output NaN: L = 4, r = 16, T = 100 (auto dispatch takes the bank path on the
    interpreter's config as on the GPU's), one NaN in B of the adapter nobody routes to."""
    assert triton_ops.forward_path(triton_ops._config(torch.device(DEV)), 100, 4, 16, 24, 20) == "bank"
    for backend in ("triton", "torch", "reference"):
        clean, bad = poisoned_inputs({"unrouted"}, NAN, 100, 2, 3, L=4, R=16, ranks=[16, 16, 16, 16], device=DEV)
        ref = call(multi_lora_reference, _fp64(clean))
        with torch.no_grad():
            out = call(multi_lora, bad, backend=backend)
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32], backend


@pytest.mark.parametrize("path", ["bank", "bank_small"])
def test_bank_path_past_64_adapters(triton_ops, monkeypatch, path):
    """Past 64 adapters the bank expand builds its routed-adapter set per chunk (a 64-bit window), not once."""
    use_path(triton_ops, monkeypatch, path)
    L = 70
    ranks = [1 + a % 4 for a in range(L)]
    clean, bad = poisoned_inputs(set(KINDS), NAN, 20, 2, 5, L=L, R=4, ranks=ranks, device=DEV)
    ids = clean["ids"].clone()
    ids[(ids == 64) | (ids == 65)] = 2
    ids[:, 0] = torch.where(torch.arange(20) % 3 == 0, 66, ids[:, 0])  # a routed adapter past the first window
    clean["ids"] = bad["ids"] = ids
    bad["weights"] = torch.where(ids < 0, bad["weights"], clean["weights"])  # only the slots still empty poisoned
    bad["A"][64:66] = NAN  # unrouted, in the window of routed 66
    bad["B"][64:66] = INF
    ref = call(multi_lora_reference, _fp64(clean))
    with torch.no_grad():
        out = call(multi_lora, bad, backend="triton")
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("path", [*TRITON_PATHS, "torch_gathered", "torch_dense"])
@pytest.mark.parametrize("sentence", [False, True])
def test_inference_paths_with_every_poison_at_once(triton_ops, monkeypatch, path, sentence):
    """The no-grad paths (direct Triton launches, sentence routing read through seq_ids; the torch forms) with
    unrouted, padding and empty-slot poison all at once, NaN in A and Inf in B."""
    T, K = _shape(path)
    clean, bad = poisoned_inputs(set(KINDS), NAN, T, K, 40 + len(path) + sentence, device=DEV)
    bad["B"] = torch.where(torch.isnan(bad["B"]), INF, bad["B"])
    seq_ids = None
    if sentence:
        seq_ids = torch.randint(0, 2, (T,), generator=torch.Generator().manual_seed(T))
        clean = dict(clean, ids=clean["ids"][:2].contiguous(), weights=clean["weights"][:2].contiguous())
        bad = dict(bad, ids=bad["ids"][:2].contiguous(), weights=bad["weights"][:2].contiguous())
    ref = call(multi_lora_reference, _fp64(clean), seq_ids=seq_ids)
    backend = "torch" if path.startswith("torch") else "triton"
    if backend == "triton":
        use_path(triton_ops, monkeypatch, path)
    else:
        bad = {k: v.cpu() for k, v in bad.items()}
    with torch.no_grad():
        out = call(multi_lora, bad, seq_ids=None if seq_ids is None else seq_ids.to(bad["x"].device), backend=backend)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("path", ["reference", "torch_dense", "torch_gathered", "fused", "small", "grouped", "bank",
                                  "bank_small", "sequence_concat"])
def test_a_broken_adapter_spoils_only_the_tokens_routed_to_it(triton_ops, monkeypatch, path):
    """Some tokens route *to* an adapter with a NaN: they may be NaN, the others are exactly the clean run. Per token
    on every path but the Triton bank path, whose expand multiplies a row tile's tokens by every adapter any of
    them routes to (BM = 16 rows under the interpreter): there, tokens of other row tiles are clean."""
    T, K = _shape(path)
    if path in ("bank", "bank_small", "sequence_concat", "torch_dense", "reference", "grouped"):
        T = 40 if path != "sequence_concat" else 15
    clean, _ = poisoned_inputs(set(), NAN, T, K, 77 + len(path))
    ids = clean["ids"].clone()
    ids[ids == 3] = 1
    routed = torch.zeros(T, dtype=torch.bool)
    routed[[t for t in (0, 1, 5) if t < T] if path != "sequence_concat" else list(range(5))] = True  # folded: seq 0
    ids[routed, 0] = 3
    clean["ids"] = ids
    bad = dict(clean, B=clean["B"].clone())
    bad["B"][3, 0, 4] = NAN
    if path.startswith("bank"):
        spared = torch.arange(T) >= 16  # the other row tiles
    else:
        spared = ~routed
    ref, _ = _clean_reference(path, clean, torch.zeros(T, 20))
    dev = DEV if path in TRITON_PATHS else "cpu"
    if path == "reference":
        bad = _fp64(bad)
    out, _ = run_path(path, {k: v.to(dev) for k, v in bad.items()}, None, monkeypatch, triton_ops)
    out = out.cpu()
    assert torch.isfinite(out[spared]).all()
    assert rel_err(out[spared], ref[spared]) < TOL[torch.float32]
    assert not torch.isfinite(out[routed]).all(1).any(), "a token routed to the broken adapter looks clean"


def test_out_of_range_ids_are_one_clear_error_on_every_backend():
    """Ids must be -1 (empty) or in [0, L): -2 is not another spelling of empty, L is past the bank."""
    inp = make_inputs(6, 16, 16, 3, 8, 2, torch.float32, empty=0.0)
    for bad_id in (-2, 3, 99):
        ids = inp["ids"].clone()
        ids[2, 1] = bad_id
        for backend in ("reference", "torch", "triton"):
            with pytest.raises(ValueError, match=r"outside \[-1, 3\)") as e:
                call(multi_lora, dict(inp, ids=ids), backend=backend)
            assert "\n" not in str(e.value) and str(bad_id) in str(e.value)
        with pytest.raises(ValueError, match=r"outside \[-1, 3\)"):
            call(multi_lora_reference, dict(inp, ids=ids))
        S = 2
        x, base = inp["x"].view(S, 3, 16), inp["base"].view(S, 3, 16)
        with pytest.raises(ValueError, match=r"multi_lora_per_sequence: adapter ids .* outside \[-1, 3\)"):
            multi_lora_per_sequence(x, base, inp["A"], inp["B"], inp["scales"], inp["ranks"], ids[1:3], inp["weights"][1:3])


@pytest.mark.gpu
@pytest.mark.parametrize("T,L,R,dtype", [(1, 4, 16, torch.bfloat16), (16, 4, 16, torch.bfloat16),
                                         (100, 4, 16, torch.bfloat16), (300, 4, 16, torch.float32),
                                         (1, 28, 16, torch.bfloat16), (40, 28, 16, torch.bfloat16),
                                         (300, 28, 64, torch.bfloat16)])  # fmt: skip
def test_gpu_poison_never_reaches_output_or_gradients(T, L, R, dtype):
    """Auto dispatch on the GPU (bank path for the narrow banks, token / grouped for L = 28), forward and backward,
    every poison at once; the reference runs on the clean inputs in float64."""
    ranks = [R - 3 * (a % 3) for a in range(L)]
    clean, bad = poisoned_inputs(set(KINDS), NAN, T, 2, T + L, L=L, R=R, ranks=ranks, dtype=dtype, device="cuda")
    bad["B"] = torch.where(torch.isnan(bad["B"]), INF, bad["B"])
    grad = torch.randn(T, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_out, ref_grads = run_with_grads(multi_lora_reference, _fp64(clean), grad)
    out, grads = run_with_grads(multi_lora, bad, grad.cuda())
    with torch.no_grad():
        direct = call(multi_lora, bad)
    for name, got, want in [("out", out, ref_out), ("direct", direct, ref_out)] + [(k, grads[k], ref_grads[k]) for k in DIFF]:
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < TOL[dtype], name
