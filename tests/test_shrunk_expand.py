"""``kernels.expand_shrunk``: the routed expand over a shrink the base GEMM already computed.

Every case builds one wide random "GEMM output" per token ([y | pad | h | logits | pad], NaN in the pads) and
passes y, h and the logits as strided views of it, exactly as a grouped projection will. The torch backend is
checked against a float64 loop over tokens, members and slots; the Triton kernel (interpreted on CPU) against the
torch backend. Poisoned inputs (NaN in every h row a (token, member) does not route, in the B of adapters nobody
routes, in B's rank-padding rows and in the empty slots' weights) must give exactly the clean result.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_shrunk_expand is first imported

from kernels import expand_shrunk, switches
from kernels.shrunk_expand import blocks_in_one_member, expand_shrunk_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where backend="triton" tests run (interpreted on CPU)
NAN = float("nan")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# (route, K, temperature): given routes per sequence / per token, or MeteoRA's top-k of the logits
ROUTES = [("sentence", 1, 1.0), ("sentence", 2, 1.0), ("sentence", 3, 1.0), ("token", 1, 1.0), ("token", 2, 1.0),
          ("token", 3, 1.0), ("logits", 1, 1.0), ("logits", 2, 1.0), ("logits", 2, 15.0)]  # fmt: skip
MEMBERS = [(48,), (48, 16, 16)]


def make_case(route, K, temperature, sizes, *, T=5, L=6, R=6, S=3, dtype=torch.float32, seed=0, device="cpu"):
    """Random inputs as one wide GEMM output per token: (views of it, the other arguments of expand_shrunk)."""
    g = torch.Generator().manual_seed(seed)
    n, N = len(sizes), sum(sizes)
    h0, lg0 = N + 3, N + 3 + n * L * R  # where h and the logits start in a row (after 3 NaN pad columns)
    wide = torch.full((T, lg0 + n * L + 2), NAN)
    wide[:, :N] = torch.randn(T, N, generator=g)
    ranks = torch.randint(1, R + 1, (n, L), generator=g)
    ranks[:, 0] = R  # one full-rank adapter
    h = torch.randn(T, n, L, R, generator=g)
    h = torch.where(torch.arange(R) < ranks[None, :, :, None], h, 0.0)  # the GEMM's zero A rows: exact zeros
    wide[:, h0:lg0] = h.reshape(T, -1)
    # distinct logits, apart by >= 0.25 so that bf16 keeps them distinct (a tie would make the top-k ambiguous)
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(T * n)]).view(T, n * L)
    wide[:, lg0:lg0 + n * L] = (perm + 0.5 * torch.rand(T, n * L, generator=g)) * 0.5 - L / 4
    member = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))
    B = torch.randn(L, R, N, generator=g) / R**0.5
    B = torch.where(torch.arange(R)[None, :, None] < ranks[member].T[:, None, :], B, 0.0)  # [L, R, N]
    kw = {"col_member": member.to(torch.int32)}
    if route == "logits":
        kw.update(top_k=K, temperature=temperature)
    else:
        rows = S if route == "sentence" else T
        ids = torch.randint(0, L, (rows, K), generator=g)
        ids = torch.where(torch.rand(rows, K, generator=g) < 0.25, -1, ids)
        ids[0, -1] = -1  # an empty slot for sure
        kw.update(ids=ids, weights=torch.rand(rows, K, generator=g) + 0.1)
        if route == "sentence":
            kw["seq_ids"] = torch.randint(0, S, (T,), generator=g)
            kw["seq_ids"][:S] = torch.arange(S).flip(0)  # every row used, none in token order
    wide = wide.to(device, dtype)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    kw["B"] = B.to(device, dtype)
    return views(wide, n, L, R, N, "ids" not in kw), kw


def views(wide, n, L, R, N, logits):
    """y, h (and the logits) as strided views of the wide GEMM output: no copies."""
    T = wide.shape[0]
    h0, lg0 = N + 3, N + 3 + n * L * R
    v = {"wide": wide, "y": wide[:, :N], "h": wide[:, h0:lg0].view(T, n, L, R)}
    if logits:
        v["logits"] = wide[:, lg0:lg0 + n * L].view(T, n, L)
    return v


def call(v, kw, **extra):
    return expand_shrunk(v["y"], v["h"], kw["B"], kw["col_member"], logits=v.get("logits"),
                         **{k: x for k, x in kw.items() if k not in ("B", "col_member")}, **extra)  # fmt: skip


def routes(v, kw):
    """Per (token, member): [(adapter, weight)], in float64, by the definitions (top-k of distinct logits)."""
    T, n = v["h"].shape[:2]
    out = {}
    for t in range(T):
        for m in range(n):
            if "logits" in v:
                lg = v["logits"][t, m].double().cpu()
                idx = sorted(range(lg.numel()), key=lambda a: -lg[a])[:kw["top_k"]]
                w = torch.softmax(lg[idx] / kw["temperature"], 0)
                out[t, m] = list(zip(idx, w.tolist()))
            else:
                row = int(kw["seq_ids"][t]) if "seq_ids" in kw else t
                out[t, m] = [(int(a), float(w)) for a, w in zip(kw["ids"][row], kw["weights"][row].double())
                             if int(a) >= 0]  # fmt: skip
    return out


def brute(v, kw):
    """y + routed deltas by loops over tokens, members and slots, in float64."""
    y, h, B = v["y"].double().cpu(), v["h"].double().cpu(), kw["B"].double().cpu()
    member = kw["col_member"].cpu()
    out = y.clone()
    for (t, m), slots in routes(v, kw).items():
        cols = (member == m).nonzero().squeeze(1)
        for a, w in slots:
            out[t, cols] += w * h[t, m, a] @ B[a][:, cols]
    return out


def poison(v, kw):
    """(views', kw') of a poisoned copy: NaN in every h row its (token, member) does not route, in B of the adapters nobody routes, in
    B's rank-padding rows (where h is exactly 0) and in the empty slots' weights."""
    kw = dict(kw)
    _, n, L, R = v["h"].shape
    pv = views(v["wide"].clone(), n, L, R, v["y"].shape[1], "logits" in v)
    used = set()
    for (t, m), slots in routes(v, kw).items():
        routed = {a for a, _ in slots}
        used |= routed
        for a in set(range(L)) - routed:
            pv["h"][t, m, a] = NAN
    B = kw["B"].clone()
    member = kw["col_member"].long()
    for a in set(range(L)) - used:
        B[a] = NAN
    pad = (v["h"] == 0).all(0)  # [n, L, R]: rank padding of member m's adapter a
    B = torch.where(pad[member].permute(1, 2, 0), NAN, B)
    kw["B"] = B
    if "ids" in kw:
        kw["weights"] = torch.where(kw["ids"] < 0, NAN, kw["weights"])
    return pv, kw


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("sizes", MEMBERS)
@pytest.mark.parametrize("route,K,temperature", ROUTES)
def test_torch_backend_matches_fp64_loop(route, K, temperature, sizes):
    v, kw = make_case(route, K, temperature, sizes, seed=K + len(sizes))
    out = call(v, kw, backend="torch")
    assert out.shape == v["y"].shape and out.is_contiguous() and out.dtype == v["y"].dtype
    assert rel_err(out, brute(v, kw)) < 1e-6
    v64, kw64 = make_case(route, K, temperature, sizes, seed=K + len(sizes), dtype=torch.float64)
    assert rel_err(call(v64, kw64, backend="torch"), brute(v64, kw64)) < 1e-12


@pytest.mark.parametrize("sizes", MEMBERS)
@pytest.mark.parametrize("route,K,temperature", ROUTES)
def test_triton_matches_torch_backend(route, K, temperature, sizes):
    v, kw = make_case(route, K, temperature, sizes, seed=10 + K, device=DEV)
    with switches.poisoned_buffers():
        got = call(v, kw, backend="triton")
    assert torch.isfinite(got).all()
    assert rel_err(got, call(v, kw, backend="torch")) < 1e-5
    assert rel_err(got, brute(v, kw)) < 1e-5


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_logits_blocks_inside_and_across_members(block_n):
    """MeteoRA's route takes one top-k per block where no block crosses a member, else one per column. Members
    48 / 16 / 16: every block of 16 lies in one member, blocks of 32 and 64 cross members. Both paths equal the
    fp64 loop, poisoned inputs included."""
    v, kw = make_case("logits", 2, 3.0, (48, 16, 16), T=3, L=7, seed=20 + block_n, device=DEV)
    assert blocks_in_one_member(kw["col_member"], block_n) == (block_n == 16)
    want = brute(v, kw)
    assert rel_err(call(v, kw, backend="triton", block_n=block_n), want) < 1e-5
    pv, pkw = poison(v, kw)
    got = call(pv, pkw, backend="triton", block_n=block_n)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("route,K,temperature", [("logits", 2, 15.0), ("sentence", 2, 1.0)])
def test_a_plain_members_columns_read_member_0_and_add_nothing(route, K, temperature, backend):
    """A projection group's plain member (models.plain_member: k_proj beside q / v adapters) has no bank rows, no
    gate and a zero B: its columns name banked member 0 (``col_member`` then goes back down, e.g. q, v, plain) and
    route by member 0's logits, adding nothing. Its own h and logits slot is NaN here: never read."""
    v, kw = make_case(route, K, temperature, (16, 16, 16), T=4, L=5, seed=31, device=DEV)
    kw["col_member"] = torch.tensor([0] * 16 + [1] * 16 + [0] * 16, dtype=torch.int32, device=DEV)
    kw["B"][:, :, 32:] = 0
    v["h"][:, 2] = NAN
    if "logits" in v:
        v["logits"][:, 2] = NAN
    got = call(v, kw, backend=backend, **({"block_n": 16} if backend == "triton" else {}))
    assert torch.isfinite(got).all()
    assert torch.equal(got[:, 32:], v["y"][:, 32:])  # the plain columns: the base output as it was
    assert rel_err(got, brute(v, kw)) < 1e-5


@pytest.mark.parametrize("block_t", [2, 4, 8])
@pytest.mark.parametrize("route,K,temperature", [("sentence", 2, 1.0), ("token", 3, 1.0), ("logits", 2, 15.0)])
def test_programs_of_several_tokens(route, K, temperature, block_t):
    """block_t tokens per program (5 tokens: a last program with fewer, or one program with all): the same output as
    one token per program and as the fp64 loop, in place too, poisoned inputs included."""
    v, kw = make_case(route, K, temperature, (48, 16, 16), seed=30 + block_t, device=DEV)
    one = call(v, kw, backend="triton")
    got = call(v, kw, backend="triton", block_t=block_t)
    assert torch.equal(got, one) and rel_err(got, brute(v, kw)) < 1e-5
    pv, pkw = poison(v, kw)
    assert torch.equal(call(pv, pkw, backend="triton", block_t=block_t), one)
    assert call(v, kw, backend="triton", block_t=block_t, out=v["y"]) is v["y"] and torch.equal(v["y"], one)


@pytest.mark.parametrize("route,K,temperature", [("sentence", 2, 1.0), ("logits", 2, 15.0)])
def test_triton_bf16(route, K, temperature):
    v, kw = make_case(route, K, temperature, (48, 16, 16), seed=3, dtype=torch.bfloat16, device=DEV)
    got = call(v, kw, backend="triton")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, call(v, kw, backend="torch")) < 1e-2
    assert rel_err(got, brute(v, kw)) < 2e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("route,K,temperature", [("sentence", 3, 1.0), ("token", 2, 1.0), ("logits", 2, 1.0)])
def test_poison_never_reaches_the_output(route, K, temperature, backend):
    v, kw = make_case(route, K, temperature, (48, 16, 16), seed=7, device=DEV if backend == "triton" else "cpu")
    clean = call(v, kw, backend=backend)
    pv, pkw = poison(v, kw)
    assert not torch.isfinite(pv["h"]).all() and not torch.isfinite(pkw["B"]).all()
    got = call(pv, pkw, backend=backend)
    assert torch.isfinite(got).all()
    assert torch.equal(got, clean)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("route", ["sentence", "logits"])
def test_in_place_equals_out_of_place(route, backend):
    v, kw = make_case(route, 2, 1.0, (48, 16, 16), seed=11, device=DEV if backend == "triton" else "cpu")
    want = call(v, kw, backend=backend)
    before = v["wide"].clone()
    got = call(v, kw, backend=backend, out=v["y"])
    assert got is v["y"]
    assert torch.equal(v["wide"][:, :80], want)
    torch.testing.assert_close(v["wide"][:, 80:], before[:, 80:], rtol=0, atol=0, equal_nan=True)  # the rest kept


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_slot_gives_a_copy_of_y(backend):
    v, kw = make_case("token", 2, 1.0, (48, 16, 16), seed=4, device=DEV if backend == "triton" else "cpu")
    got = call(v, dict(kw, ids=kw["ids"][:, :0], weights=kw["weights"][:, :0]), backend=backend)
    assert torch.equal(got, v["y"]) and got.is_contiguous() and got.data_ptr() != v["y"].data_ptr()


def test_refuses_bad_calls():
    v, kw = make_case("token", 2, 1.0, (48,), seed=1)
    with pytest.raises(ValueError, match="pass a route"):
        expand_shrunk(v["y"], v["h"], kw["B"], kw["col_member"])
    with pytest.raises(ValueError, match="outside"):
        call(v, dict(kw, ids=kw["ids"] + 9))
    with pytest.raises(ValueError, match="top_k"):
        expand_shrunk(v["y"], v["h"], kw["B"], kw["col_member"], logits=v["h"][..., 0], top_k=7)
    with pytest.raises(ValueError, match="inference only"):
        call(v, dict(kw, B=kw["B"].clone().requires_grad_(True)))
    with torch.no_grad():
        call(v, dict(kw, B=kw["B"].clone().requires_grad_(True)))
    with pytest.raises(ValueError, match="block_t"):
        call(v, kw, block_t=0)
    with pytest.raises(ValueError, match="unknown backend"):
        call(v, kw, backend="cuda-magic")


def test_expand_shrunk_torch_is_the_auto_cpu_path():
    v, kw = make_case("logits", 2, 1.0, (48, 16, 16), seed=2)
    assert torch.equal(call(v, kw), expand_shrunk_torch(v["y"], v["h"], kw["B"], kw["col_member"],
                                                        logits=v["logits"], top_k=2, temperature=1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("route,K,temperature", [("sentence", 2, 1.0), ("token", 3, 1.0), ("logits", 2, 15.0)])
def test_gpu_expand_shrunk_matches_torch_and_captures(route, K, temperature):
    """CUDA bf16 on SmolLM2's q/k/v widths (576 / 192 / 192), 28 adapters of rank <= 16: eager equals the torch
    backend and the fp64 loop, and a CUDA graph capture replays it exactly (in place too)."""
    v, kw = make_case(route, K, temperature, (576, 192, 192), T=4, L=28, R=16, S=2, seed=5,
                            dtype=torch.bfloat16, device="cuda")  # fmt: skip
    eager = call(v, kw)
    assert torch.isfinite(eager).all()
    assert rel_err(eager, call(v, kw, backend="torch")) < 1e-2
    assert rel_err(eager, brute(v, kw)) < 2e-2
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(v, kw, out=out)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(v, kw, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
