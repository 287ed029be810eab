"""``kernels.bench.epilogue`` (``python -m kernels.bench --epilogue``) on CPU: what it builds and computes, not what
it times.

The bench lays out a projection group's packed weight, GEMM output views and expand_shrunk weights itself; these
tests check that layout against ``models.projection_groups.ProjectionGroup``'s (fake members holding the bench's
adapters: the same packed weight, expand weights and outputs), that (b)+(c) -- the packed GEMM then the epilogue --
equals the ungrouped fp32 reference (each member's base + its routed adapters' LoRA) on the torch backend and on
the Triton kernel (interpreted, tiny sizes, every block_n), that the op's ``block_n`` keyword is checked and
changes nothing computed, and the page written from a hand-built record list (no number here is a result).
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_shrunk_expand is first imported

from kernels import expand_shrunk
from kernels.bench import epilogue as ep

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton path runs (interpreted on CPU)
SIZES = [(24, 8, 8), (40,)]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: -inf - -inf  # a q/k/v-like group (members of different widths) and a lone projection


def small(sizes, T=3, S=None, device="cpu", seed=0, **kw):
    gen = torch.Generator(device=device).manual_seed(seed)
    return ep.build_group(sizes, 16, T, L=4, R=4, K=2, S=S, dtype=torch.float32, device=device, gen=gen, **kw)


def rel(a, b):
    return ep.rel_err(a.double().cpu(), b.double().cpu())


class Bank(list):
    version = 0


def model_group(g):
    """A ``ProjectionGroup`` over fake members that hold the bench group's base weights and adapters (scale 1: the
    bench's B already holds the scale)."""
    from models.projection_groups import ProjectionGroup

    members, r0 = [], 0
    for m, d in enumerate(g.sizes):
        lin = nn.Linear(g.x.shape[1], d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(g.W[r0:r0 + d])
        r0 += d
        slots = SimpleNamespace(A=g.A[m], B=g.Bs[m], ranks=torch.full((g.L,), g.R), scales=torch.ones(g.L),
                                host_ranks=[g.R] * g.L, host_scales=[1.0] * g.L)  # fmt: skip
        members.append(SimpleNamespace(base_layer=lin, slots=slots, out_features=d))
    pg = ProjectionGroup(members)
    pg.pack()  # as MultiLoRAModel.group_projections() does
    return pg, Bank(range(g.L))


@pytest.mark.parametrize("sizes", SIZES)
def test_layout_and_outputs_are_projection_groups(sizes):
    from models.projection_groups import PACK_ALIGN, SHRINK_ALIGN
    from models.routing.route import GroupGates

    assert ep.SHRINK_ALIGN == SHRINK_ALIGN and ep.PACK_ALIGN == PACK_ALIGN
    g = small(sizes, T=3, S=2)
    pg, bank = model_group(g)
    route = SimpleNamespace(ids=g.ids, weights=g.weights, seq_ids=g.seq_ids)
    with torch.no_grad():
        got = pg._routed_expand(g.x, bank, route=route)  # DLP's layout: base | shrink | bank
        assert pg.weight.shape[0] == g.rows("seq")
        torch.testing.assert_close(got, ep.step(g, "seq"), rtol=1e-5, atol=1e-5)
        gates = GroupGates(weights=list(g.gates.split(g.L)), top_k=g.top_k, temperature=g.temperature)
        got = pg._routed_expand(g.x, bank, gates=gates)  # MeteoRA's: + gates
        assert pg.weight.shape[0] == g.rows("logits")
        torch.testing.assert_close(got, ep.step(g, "logits"), rtol=1e-5, atol=1e-5)
        Bc, col = pg._expand_weights(bank, torch.float32, "cpu")
        assert torch.equal(Bc, g.B) and torch.equal(col, g.col_member)
        got = pg._uniform(g.x, bank, g.adapter)  # writes the shrink rows of the uniform adapter
        torch.testing.assert_close(got, ep.step(g, "uniform"), rtol=1e-5, atol=1e-5)
        assert torch.equal(pg._shrink_rows(bank, g.adapter, torch.float32), g.B_slot)
    assert torch.equal(pg.weight, g.W)  # every row: base, uniform shrink, bank A^T, gates


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("mode", ep.MODES)
def test_gemm_plus_epilogue_equals_the_ungrouped_reference_torch(mode, sizes):
    g = small(sizes, T=5, S=2, seed=1)
    before = g.W.clone()
    y_all = ep.packed_gemm(g, mode)
    assert y_all.shape == (5, g.rows(mode))
    out = ep.epilogue(g, mode, y_all, backend="torch")
    assert out.shape == (5, g.N)
    if mode != "uniform":
        assert out.data_ptr() == y_all.data_ptr()  # in place on the GEMM output's base columns, as the model
    assert rel(out, ep.reference(g, mode)) < 1e-5
    delta = ep.reference(g, mode) - ep.base_gemm(g)
    assert delta.abs().max() > 1e-2  # the adapters do contribute
    assert torch.equal(g.W, before)


@pytest.mark.parametrize("mode", ["seq", "logits"])
@pytest.mark.parametrize("block_n", [None, 16, 32])
def test_gemm_plus_epilogue_equals_the_ungrouped_reference_triton(mode, block_n):
    g = small((24, 8, 8), T=3, S=2, seed=2, device=DEV)
    got = ep.step(g, mode, block_n=block_n, backend="triton")
    assert torch.isfinite(got).all()
    assert rel(got, ep.reference(g, mode)) < 1e-5
    assert rel(got, ep.step(g, mode, backend="torch")) < 1e-5


def test_programs_and_rows():
    g = small((24, 8, 8), T=3)
    assert [ep.programs(g, bn) for bn in (16, 32)] == [3 * 3, 3 * 2]
    n, L, R = 3, 4, 4
    assert g.extra == 16  # n R = 12, rounded up to 8
    assert [g.used_rows(m) for m in ep.MODES] == [40 + 16, 40 + 16 + n * L * R, 40 + 16 + n * L * R + n * L]
    # a routed mode's rows rounded up to PACK_ALIGN (zero rows: the model's packed weight); uniform: a prefix
    assert [g.rows(m) for m in ep.MODES] == [40 + 16, 128, 128] and ep.PACK_ALIGN == 64
    assert g.W.shape[0] == 128 and (g.W[g.used_rows("logits"):] == 0).all()
    with pytest.raises(ValueError, match="unknown mode"):
        g.rows("nope")
    q = ep.GROUPS["qkv"]
    assert q == ((4096, 1024, 1024), 4096) and ep.default_block_n(ep.R, "cuda") == 32
    assert 6144 + 24 + 3 * 28 * 8 + 3 * 28 == 6924  # the 8B q/k/v packed rows (logits), for the record


def test_block_n_keyword():
    g = small((24, 8, 8), T=3, seed=3)
    y_all = ep.packed_gemm(g, "seq")
    n, L, R = g.n, g.L, g.R
    h = y_all[:, g.N + g.extra:g.N + g.extra + n * L * R].unflatten(1, (n, L, R))
    kw = {"ids": g.ids, "weights": g.weights, "seq_ids": g.seq_ids}
    for bad in (24, 8, 0, 2.0):
        with pytest.raises(ValueError, match="block_n"):
            expand_shrunk(y_all[:, :g.N], h, g.B, g.col_member, block_n=bad, **kw)
    want = expand_shrunk(y_all[:, :g.N], h, g.B, g.col_member, backend="torch", **kw)
    assert torch.equal(expand_shrunk(y_all[:, :g.N], h, g.B, g.col_member, backend="torch", block_n=64, **kw), want)
    gd = small((24, 8, 8), T=3, seed=3, device=DEV)
    y_d = ep.packed_gemm(gd, "seq")
    hd = y_d[:, gd.N + gd.extra:gd.N + gd.extra + n * L * R].unflatten(1, (n, L, R))
    kwd = {"ids": gd.ids, "weights": gd.weights, "seq_ids": gd.seq_ids}
    outs = [expand_shrunk(y_d[:, :gd.N], hd, gd.B, gd.col_member, backend="triton", block_n=bn, **kwd)
            for bn in (None, 16, 64)]  # fmt: skip
    for o in outs[1:]:  # each column's sum is its own: the blocking changes nothing but rounding order on a GPU
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU behaviour")
def test_bench_refuses_without_a_gpu(tmp_path, capsys):
    from kernels.bench.kernel_bench import main

    for mode in (["--epilogue"], []):
        with pytest.raises(SystemExit) as stop:
            main([*mode, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: kernels.bench")
        assert "needs a CUDA GPU; run it on the GPU machine" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--overhead", "--device", "gpu"], ["--shapes", "3"]])
def test_bench_refuses_an_unknown_device_or_shape_before_it_starts(tmp_path, argv, capsys):
    """A device torch does not know, or a shape index past SHAPES: argparse's usage error (exit 2) naming the
    choices, before any timing starts or any file is written."""
    from kernels.bench.kernel_bench import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1  # common.cli_args: one line, the usage on it
    assert err.startswith("error: argument ") and "invalid choice" in err and "; usage: python -m kernels.bench" in err
    assert not (tmp_path / "out").exists()


def records():
    """Hand-built rows (two groups, T = 1, every mode; T = 8 seq with one and eight tokens per program; made-up
    numbers, not results). The T = 1 rows carry no block_t, as records made before it (read as 1)."""
    rows = []
    for group, base in (("qkv", 10.0), ("o", 6.0)):
        rows.append({"group": group, "T": 1, "mode": "uniform", "block_n": None, "programs": None,
                     "base_gemm_us": base, "packed_gemm_us": base + 0.5, "epilogue_us": 3.0,
                     "gemm_plus_epilogue_us": base + 2.0, "rel_err": 1e-3})  # fmt: skip
        for mode in ("seq", "logits"):
            for bn in (64, 128):
                rows.append({"group": group, "T": 1, "mode": mode, "block_n": bn, "programs": 6144 // bn,
                             "base_gemm_us": base, "packed_gemm_us": base + 1.0, "epilogue_us": 4.0 + bn / 64,
                             "gemm_plus_epilogue_us": base + 5.0 + bn / 64, "rel_err": 2e-3})  # fmt: skip
        for bt in (1, 8):  # T = 8 with one token per program, then all 8 in one
            rows.append({"group": group, "T": 8, "mode": "seq", "block_n": 128, "block_t": bt,
                         "programs": (8 // bt) * 48, "base_gemm_us": base, "packed_gemm_us": base + 1.0,
                         "epilogue_us": 8.0 / bt, "gemm_plus_epilogue_us": base + 1.0 + 8.0 / bt, "rel_err": 2e-3})
    prov = {"device": "NVIDIA H200 (hand-built)", "torch": "2.x", "triton": "3.x", "git_sha": "0123456789abcdef",
            "date": "2000-01-01T00:00:00+00:00", "method": ep.METHOD, "seconds": 1.0}  # fmt: skip
    doc = ep.document(rows, prov, 2.5)
    doc["config"]["groups"] = {k: v for k, v in doc["config"]["groups"].items() if k in ("qkv", "o")}
    doc["config"]["default_block_n"] = 128  # the op's default when the table was made: the one it bolds and sums
    return doc


def test_markdown_from_records(tmp_path):
    doc = records()
    md = ep.markdown(doc)
    assert md.startswith("# kernel_bench_epilogue")
    assert "NVIDIA H200 (hand-built)" in md and "git 0123456789" in md and "2.50 us" in md
    assert "## qkv: members 4096 + 1024 + 1024, d_in 4096" in md and "## o: members 4096, d_in 4096" in md
    assert "## gate_up" not in md
    # a row: T, mode, block_n (the default in bold), block_t, programs, a, b, c, d, d - a, d - b, rel err
    assert "| 1 | seq | **128** | 1 | 48 | 10.00 | 11.00 | 6.00 | 17.00 | 7.00 | 6.00 | 2.0e-03 |" in md
    assert "| 1 | logits | 64 | 1 | 96 | 6.00 | 7.00 | 5.00 | 12.00 | 6.00 | 5.00 | 2.0e-03 |" in md
    assert "| 1 | uniform | - | 1 | - | 10.00 | 10.50 | 3.00 | 12.00 | 2.00 | 1.50 | 1.0e-03 |" in md
    assert "| 8 | seq | **128** | 8 | 48 | 10.00 | 11.00 | 1.00 | 12.00 | 2.00 | 1.00 | 2.0e-03 |" in md
    # per token: one token per program in the first table, all 8 in one in the second
    assert ep.per_token(doc)[-1]["epilogue_ms"] == pytest.approx(32 * (8.0 + 8.0) / 1e3)
    wide = [t for t in ep.per_token(doc, all_tokens=True) if t["T"] == 8]
    assert len(wide) == 1 and wide[0]["epilogue_ms"] == pytest.approx(32 * (1.0 + 1.0) / 1e3)
    assert "all T tokens in one program" in md and "| 8 | seq | 0.512 | 0.064 | 0.064 | 0.128 | qkv, o |" in md
    # per token at the default block_n: 32 layers x (qkv + o), in ms
    tok = {(t["T"], t["mode"]): t for t in ep.per_token(doc)}
    assert tok[1, "seq"]["over_base_ms"] == pytest.approx(32 * (7.0 + 7.0) / 1e3)
    assert tok[1, "uniform"]["gemm_rows_ms"] == pytest.approx(32 * 1.0 / 1e3)
    assert "| 1 | seq | 0.512 | 0.064 | 0.384 | 0.448 | qkv, o |" in md
    path = tmp_path / "kernel_bench_epilogue.json"
    path.write_text(json.dumps(doc))
    assert ep.rebuild(str(path)) == str(tmp_path / "kernel_bench_epilogue.md")
    assert (tmp_path / "kernel_bench_epilogue.md").read_text() == md


@pytest.mark.parametrize("block_n, block_k", [(16, 16), (32, None)])
def test_one_launch_equals_the_ungrouped_reference(block_n, block_k):
    """(e) the uniform route through kernels.gemv_lora on the bench's own packed layout (interpreted on CPU): the
    ungrouped reference with the LoRA, the base GEMM without it."""
    g = small((24, 8, 8), T=3, seed=4, device=DEV)
    got = ep.one_launch(g, block_n, block_k=block_k)
    assert rel(got, ep.reference(g, "uniform")) < 1e-5
    assert rel(ep.one_launch(g, block_n, lora=False, block_k=block_k), ep.base_gemm(g)) < 1e-5
    assert rel(got, ep.base_gemm(g)) > 1e-3  # the adapter does contribute


def test_one_launch_rows_on_the_page():
    """One-launch rows (made-up numbers) get their own per-token table, and stay out of the two-launch sums."""
    doc = records()
    before = ep.per_token(doc)
    for group, base in (("qkv", 10.0), ("o", 6.0)):
        doc["rows"].append({"group": group, "T": 1, "mode": "uniform", "form": "one_launch", "block_n": 32,
                            "block_k": 128, "block_t": 1, "programs": 2, "base_gemm_us": base, "packed_gemm_us": None,
                            "packed_unaligned_us": None, "epilogue_us": None, "gemm_plus_epilogue_us": base + 1.0,
                            "triton_base_us": base - 0.5, "rel_err": 1e-3})  # fmt: skip
    assert ep.per_token(doc) == before
    (one,) = ep.one_launch_per_token(doc)
    assert one["one_over_base_ms"] == pytest.approx(32 * 2.0 / 1e3)
    assert one["two_over_base_ms"] == pytest.approx(32 * 4.0 / 1e3)  # the uniform rows' d - a: 2.0 per group
    assert one["triton_base_ms"] == pytest.approx(32 * 15.0 / 1e3)
    md = ep.markdown(doc)
    assert "| 1 | 32 | 128 | 0.512 | 0.480 | 0.576 | 0.064 | 0.128 | qkv, o |" in md
    assert "| 1 | uniform (one launch) | 32 | 1 | 2 | 10.00 | - | - | 11.00 | 1.00 | - | 1.0e-03 | - |" in md
