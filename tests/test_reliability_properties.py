"""Property tests (hypothesis, issue 7): the composite answer parser and the kernels' routing, for any input.

* Composite parser: any mix of answer lines (numbers in and out of 1..n, repeats, leading blanks), noise lines and
  decimals is parsed exactly as a plain line-by-line reading of MeteoRA's rule (``i. answer`` at a line start, the
  first occurrence counts) would parse it, and the counts add up.
* Routing: any ids (including -1 empty slots, repeats of one adapter in a row, adapters of rank 0) and any
  weights (zero and negative included), token or sentence routing, give through ``kernels.multi_lora`` the same
  output and gradients as the reference loop (``backend="reference"``), for the torch backend on CPU (both its
  dense and gathered forms); the Triton backend's grouped path, whose routing metadata (sort keys, group offsets)
  is built on the device, is checked the same way under ``TRITON_INTERPRET=1`` with tiny shapes and few examples.
"""

from __future__ import annotations

import os
import re

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_ops is first imported

from data.composite import parse_report
from kernels import multi_lora

# ------------------------------------------------------------------------------------------ composite parser
WORD = st.text(alphabet=st.characters(whitelist_categories=("L", "N", "P", "Zs")), max_size=20).map(
    lambda s: " ".join(s.split()))
NOISE = st.text(alphabet=st.characters(whitelist_categories=("L", "P", "Zs")), max_size=20).filter(
    lambda s: not re.match(r"^[ \t]*\d", s))


def oracle(text: str, n: int):
    """MeteoRA's rule read line by line, no regex: ``<blanks><digits>.<not a digit><answer>``; first one counts."""
    found, extra, duplicate = {}, 0, 0
    for line in text.split("\n"):
        rest = line.lstrip(" \t")
        digits = ""
        while rest[:1].isdecimal():  # a decimal digit of any script, like the regex's \d
            digits, rest = digits + rest[0], rest[1:]
        if not digits or not rest.startswith(".") or rest[1:2].isdecimal():
            continue
        i, answer = int(digits), rest[1:].strip(" \t")
        if not 1 <= i <= n:
            extra += 1
        elif i in found:
            duplicate += 1
        else:
            found[i] = answer
    return [found.get(i, "") for i in range(1, n + 1)], {"missing": n - len(found), "extra": extra,
                                                          "duplicate": duplicate}


@st.composite
def model_outputs(draw):
    """(text, n): numbered answer lines in any order, out-of-range numbers, repeats, decimals, noise lines."""
    n = draw(st.integers(1, 10))
    line = st.one_of(
        st.builds(lambda i, a, pad: f"{pad}{i}. {a}", st.integers(0, 14), WORD, st.sampled_from(["", " ", "\t", "  "])),
        st.builds(lambda i, a: f"{i}.{a}", st.integers(1, n), WORD),  # no blank after the dot
        st.builds(lambda i, d, a: f"{i}.{d} {a}", st.integers(1, n), st.integers(0, 9), WORD),  # a decimal: no answer
        NOISE,
    )
    return "\n".join(draw(st.lists(line, max_size=16))), n


@settings(max_examples=300, deadline=None)
@given(model_outputs())
def test_composite_parser_equals_a_line_by_line_reading(case):
    text, n = case
    answers, report = parse_report(text, n)
    assert (answers, report) == oracle(text, n)
    assert len(answers) == n and all("\n" not in a for a in answers)
    assert report["missing"] == n - sum(1 for i in range(1, n + 1) if re.search(rf"(?m)^[ \t]*{i}\.(?!\d)", text))


@settings(max_examples=150, deadline=None)
@given(st.lists(WORD, min_size=1, max_size=10), st.data())
def test_composite_answers_survive_shuffling_noise_and_extra_numbers(answers, data):
    n = len(answers)
    lines = [f"{i}. {a}" for i, a in enumerate(answers, 1)]
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    extras = data.draw(st.lists(st.integers(n + 1, n + 20), max_size=3))
    noise = data.draw(st.lists(NOISE, max_size=4))
    body = [x for x, k in zip(lines, keep) if k] + [f"{i}. extra" for i in extras] + noise
    body = data.draw(st.permutations(body))
    got, report = parse_report("\n".join(body), n)
    assert got == [a if k else "" for a, k in zip(answers, keep)]
    assert report == {"missing": n - sum(keep), "extra": len(extras), "duplicate": 0}


# ---------------------------------------------------------------------------------------------- routing
@st.composite
def routings(draw, max_T=7, d=8, R=8, max_L=5):
    """Op inputs (float64) with arbitrary routing: ids in -1..L-1 (repeats allowed), weights incl. 0 and < 0."""
    T, K, L = draw(st.integers(1, max_T)), draw(st.integers(1, 3)), draw(st.integers(1, max_L))
    sentence = draw(st.booleans())
    S = draw(st.integers(1, T)) if sentence else T
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(-1, L - 1), min_size=K, max_size=K), min_size=S, max_size=S)))
    weight = st.one_of(st.just(0.0), st.floats(-2.0, 2.0, allow_nan=False, width=32))
    weights = torch.tensor(draw(st.lists(st.lists(weight, min_size=K, max_size=K), min_size=S, max_size=S)),
                           dtype=torch.float64)
    ranks = torch.tensor(draw(st.lists(st.integers(0, R), min_size=L, max_size=L)))
    seq_ids = torch.tensor(draw(st.lists(st.integers(0, S - 1), min_size=T, max_size=T))) if sentence else None
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return {"x": torch.randn(T, d, generator=g, dtype=torch.float64),
            "base": torch.randn(T, d, generator=g, dtype=torch.float64),
            "A": torch.randn(L, d, R, generator=g, dtype=torch.float64),
            "B": torch.randn(L, R, d, generator=g, dtype=torch.float64),
            "scales": torch.rand(L, generator=g, dtype=torch.float64) + 0.5, "ranks": ranks, "ids": ids,
            "weights": weights, "seq_ids": seq_ids}


def _forward_backward(inp: dict, backend: str, dtype=torch.float64):
    """Output and gradients in x, base, A, B, weights (the differentiable inputs) of one backend; a gradient
    autograd leaves out (nothing routed through that input) is zero."""
    diff = ("x", "base", "A", "B", "weights")
    leaves = {k: (v.to(dtype).clone().requires_grad_(True) if k in diff else v) for k, v in inp.items()}
    out = multi_lora(leaves["x"], leaves["base"], leaves["A"], leaves["B"], inp["scales"], inp["ranks"], inp["ids"],
                     leaves["weights"], inp["seq_ids"], backend=backend)
    grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(dtype)
    out.backward(grad)
    return out.detach().double(), {k: (leaves[k].grad if leaves[k].grad is not None
                                       else torch.zeros_like(leaves[k])).double() for k in diff}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routings())
def test_torch_backend_equals_the_reference_for_any_routing(inp):
    out, grads = _forward_backward(inp, "torch")
    ref_out, ref_grads = _forward_backward(inp, "reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-10, atol=1e-10, msg=k)
    empty_rows = (inp["ids"] < 0).all(1) if inp["seq_ids"] is None else (inp["ids"] < 0).all(1)[inp["seq_ids"]]
    torch.testing.assert_close(out[empty_rows], inp["base"][empty_rows])  # all slots empty: the base output


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(routings(max_T=5, d=16, R=16, max_L=3))
def test_triton_grouped_path_equals_the_reference_for_any_routing(monkeypatch, inp):
    """The grouped path (routing keys, sort, group offsets) for every T: SMALL_T_MAX=0. Interpreted: fp32 dots."""
    from kernels import switches, triton_ops

    monkeypatch.setattr(triton_ops, "SMALL_T_MAX", 0)
    monkeypatch.setattr(switches.state, "forward_path", "grouped")  # kernels.switches.forced_path for the test
    monkeypatch.setattr(switches.state, "poison", True)  # an element no kernel wrote shows up as NaN
    out, grads = _forward_backward(inp, "triton", dtype=torch.float32)
    ref_out, ref_grads = _forward_backward(inp, "reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-4, msg=k)
