"""The multi-LoRA model on CUDA, where kernels.multi_lora dispatches to the Triton kernels (skipped without a GPU)."""

import pytest
import torch
from peft import PeftModel

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets

pytestmark = pytest.mark.gpu
PROMPTS = ["[INST] count the apples [/INST]\n", "hello there, a longer prompt than the others", "q"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="module")
def qv_assets(assets, tmp_path_factory):
    """DLP-LoRA-style adapters (q and v only; c: q only) on the same tiny model: k_proj joins q / v's group plain."""
    from models.tiny import save_random_peft_adapter

    base, root = assets[0], tmp_path_factory.mktemp("gpu_qv")
    specs = {"a": {"r": 8}, "b": {"r": 4, "lora_alpha": 8}, "c": {"r": 8, "lora_alpha": 32, "targets": ("q_proj",)}}
    return base, {n: save_random_peft_adapter(base, root / n, seed=i + 7, **spec) for i, (n, spec) in
                  enumerate(specs.items())}


def _mm(assets, dtype="float32", **kw):
    base, dirs = assets
    model, tok = load_base_model(base, dtype=dtype, device="cuda")
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, tokenizer=tok, **kw)


@torch.no_grad()
def test_cuda_oracle_and_merge_equal_peft(assets):
    base, dirs = assets
    mm = _mm(assets, router="oracle")
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    pm = PeftModel.from_pretrained(load_base_model(base, device="cuda")[0], str(dirs["a"]), adapter_name="a")
    for n in ("b", "c"):
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    real = batch["attention_mask"].bool()  # left-padding positions attend to nothing: on CUDA their logits are
    for name in ("a", "b", "c"):            # whatever the attention kernel leaves there, run to run
        pm.set_adapter(name)
        torch.testing.assert_close(mm(**batch, task_ids=[name] * 3).logits[real], pm(**batch).logits[real],
                                   atol=2e-3, rtol=0)
    pm.add_weighted_adapter(["a", "b", "c"], [1 / 3] * 3, "avg", combination_type="cat")
    pm.set_adapter("avg")
    mm.set_router("merge")
    torch.testing.assert_close(mm(**batch).logits[real], pm(**batch).logits[real], atol=2e-3, rtol=0)


def test_cuda_meteora_and_dlp_train_and_generate(assets):
    mm = _mm(assets, router="meteora", top_k=2)
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    params = mm.set_trainable("gates+adapters")
    out = mm(**batch, labels=batch["input_ids"], task_ids=[0, 1, 2])
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params if p.dim() == 2) > 0  # gate gradients
    for name, kw in [("meteora", {"top_k": 1}), ("dlp", {"hidden": 32}), ("dlp_segments", {"hidden": 32}),
                     ("oracle", {}), ("merge", {}), ("base", {})]:
        mm.set_router(name, **kw)
        g = mm.generate(**batch, task_ids=[2, 0, 1], max_new_tokens=4, do_sample=False)
        assert g.shape == (3, batch["input_ids"].shape[1] + 4)


@torch.no_grad()
def test_cuda_bf16_close_to_fp32(assets):
    ref = _mm(assets, router="oracle")
    bf = _mm(assets, dtype="bfloat16", router="oracle")
    batch = ref.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    real = batch["attention_mask"].bool()  # left-padding positions attend to nothing: their logits are noise
    a = ref(**batch, task_ids=[0, 1, 2]).logits[real]
    b = bf(**batch, task_ids=[0, 1, 2]).logits.float()[real]
    assert (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_a_nan_in_an_unrouted_adapter_changes_no_logit(assets, dtype):
    """tests/test_models_poison.py on CUDA: inference (Triton: bank path at L * R = 48) and a training step (the
    torch forms), with a NaN in adapter c's lora_B and an Inf in adapter b's rank padding, nobody routed to c."""
    runs = []
    for poison in (False, True):  # the compared logits leave out left-padding positions, whose values on CUDA are
        # whatever the attention kernel leaves for a row that attends to nothing (they differ run to run); the
        # training step pads on the right (as training batches do): a left-padded row's backward through that
        # kernel is as arbitrary and reaches the adapters' gradients, which would compare the kernel, not the op
        torch.manual_seed(0)  # the same fresh gates in both runs: their aux loss reaches the adapters' gradients
        mm = _mm(assets, dtype=dtype, router="meteora", top_k=1)
        mm.set_routing(force_gates=True)
        if poison:
            A, B, _, _ = mm.bank.tensors("model.layers.0.self_attn.q_proj")
            with torch.no_grad():
                B[2, 3, 7] = float("nan")
                A[1, 5, 9] = float("inf")
        batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            logits = mm(**batch, task_ids=["a", "b", "a"]).logits[real]
        params = mm.set_trainable("adapters")
        mm.tokenizer.padding_side = "right"
        train = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
        labels = train["input_ids"].masked_fill(~train["attention_mask"].bool(), -100)
        mm(**train, labels=labels, task_ids=["a", "b", "a"]).loss.backward()
        runs.append((logits, [p.grad.clone() for p in params]))
    (clean, clean_grads), (got, grads) = runs
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean, atol=1e-5 if dtype == "float32" else 1e-2, rtol=0)
    for g, g_c in zip(grads, clean_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_c)  # the dtype's default tolerances


@pytest.mark.parametrize("router, kw, task_ids", [("oracle", {}, ["a", "b", "c"]), ("meteora", {"top_k": 2}, None),
                                                   ("dlp", {"hidden": 32, "layers": 1}, None), ("merge", {}, None)])
def test_cuda_graph_decode_equals_generate(assets, router, kw, task_ids):
    """models.graph_generate with the decode step captured as a CUDA graph: generate's tokens (fp32)."""
    from models.graph_generate import graph_generate

    torch.manual_seed(0)
    mm = _mm(assets, router=router, **kw).eval()
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    route = {"task_ids": task_ids} if task_ids else {}
    want = mm.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, **route)
    got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], max_new_tokens=24,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, task_ids=task_ids, capture=True)
    assert torch.equal(got, want)


def test_cuda_graph_decode_under_bf16_autocast(assets):
    """As evaluate runs it (Lightning's bf16-mixed predict: autocast): the boolean decode mask in a bf16 attention;
    the same first tokens as generate (bf16 near-ties may part a row later)."""
    from models.graph_generate import graph_generate

    torch.manual_seed(0)
    mm = _mm(assets, router="meteora", top_k=2).eval()
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = mm.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
        got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], max_new_tokens=8,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, capture=True)
    n = min(got.shape[1], want.shape[1])
    assert int((got[:, :n] == want[:, :n]).all(dim=1).sum()) >= 2


@pytest.mark.parametrize("router, kw, task_ids", [("oracle", {}, ["a", "a", "a"]), ("oracle", {}, ["a", "b", "c"]),
                                                   ("dlp", {"hidden": 32, "layers": 1}, None),
                                                   ("meteora", {"top_k": 2}, None)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["all7", "qv"])
def test_cuda_grouped_projections_decode_as_the_ungrouped_model(assets, qv_assets, router, kw, task_ids, dtype,
                                                                which):
    """models.projection_groups on CUDA: the uniform route's shrink in the base GEMM (cuBLAS), the packed bank
    through the Triton kernels at decode, each under a captured CUDA graph: the ungrouped model's tokens (bf16: the
    first 8 of them; a near-tie may part a row later) and close prefill logits. ``qv``: adapters on q and v only,
    k in their group as a plain member (models.plain_member)."""
    from models.graph_generate import graph_generate

    assets = qv_assets if which == "qv" else assets
    runs = []
    for grouped in (False, True):
        torch.manual_seed(0)
        mm = _mm(assets, dtype=dtype, router=router, group_projections=grouped, **kw).eval()
        tok = mm.tokenizer
        batch = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
        route = {"task_ids": task_ids} if task_ids else {}
        with torch.no_grad():
            logits = mm(**batch, **route).logits[batch["attention_mask"].bool()]
        ids = graph_generate(mm, batch["input_ids"], batch["attention_mask"], max_new_tokens=16, eos_token_id=None,
                             pad_token_id=tok.pad_token_id, task_ids=task_ids, capture=True)
        runs.append((logits, ids))
    (want_logits, want), (got_logits, got) = runs
    torch.testing.assert_close(got_logits, want_logits, atol=2e-3 if dtype == "float32" else 5e-2, rtol=0)
    n = want.shape[1] if dtype == "float32" else want.shape[1] - 8
    if dtype == "bfloat16" and router == "meteora":
        # fresh gates' top-2 picks flip wherever two logits lie within bf16 rounding, which the packed GEMM and the
        # member's own matmul round apart (210 projections x every token: some flip, and a flip may change the
        # next token). The logits above and the fp32 tokens hold the grouped form to the ungrouped one; here
        # only the prompt, and tokens of the vocabulary.
        n = batch["input_ids"].shape[1]
        assert int(got.min()) >= 0 and int(got.max()) < mm.model.config.vocab_size
    assert torch.equal(got[:, :n], want[:, :n])


@pytest.mark.parametrize("mode", ["warm_start", "keep_graph"])
@pytest.mark.parametrize("grouped", [False, True], ids=["ungrouped", "grouped"])
def test_cuda_warm_graph_calls_decode_as_generate_across_routers_and_prompts(assets, grouped, mode):
    """graph_generate's warm calls (a signature a warm-up left: captured at once, no eager first step; with
    ``keep_graph`` the graph kept from an earlier call replayed, no capture either) give generate's tokens, call
    after call on one model while the router, the task ids and the prompts change between them (as the e2e benchmark
    interleaves strategies); a repeated call is warm, a changed one warms up again."""
    from models.graph_generate import graph_generate, release_graphs

    torch.manual_seed(0)
    mm = _mm(assets, router="oracle", group_projections=grouped).eval()
    tok = mm.tokenizer
    routers = {"oracle": mm.router, "meteora": mm.build_router("meteora", top_k=2),
               "dlp": mm.build_router("dlp", hidden=32, layers=1, max_kept=2)}
    prompts = [PROMPTS, [p[::-1] + " ok" for p in PROMPTS]]
    plan = [("oracle", ["a", "a", "a"], 0), ("dlp", None, 0), ("oracle", ["a", "a", "a"], 1), ("meteora", None, 0),
            ("dlp", None, 1), ("oracle", ["b", "b", "b"], 0), ("meteora", None, 1), ("dlp", None, 0),
            ("oracle", ["a", "b", "c"], 1), ("oracle", ["a", "a", "a"], 0), ("oracle", ["a", "a", "a"], 0),
            ("dlp", None, 0), ("dlp", None, 0)]
    warm = []
    for name, task_ids, which in plan:
        mm.set_router(routers[name])
        batch = tok(prompts[which], return_tensors="pt", padding=True).to("cuda")
        route = {"task_ids": task_ids} if task_ids else {}
        want = mm.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=None, min_new_tokens=12, **route)
        phases: dict = {}
        got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, eos_token_id=None,
                             pad_token_id=tok.pad_token_id, task_ids=task_ids, capture=True, phases=phases,
                             **{mode: True})
        assert torch.equal(got, want), (name, task_ids, which)
        warm.append("first_step" not in phases and (mode == "warm_start" or "capture" not in phases))
    # the first call warms up; a call repeated with nothing changed between is warm (a sentence router's decision
    # shapes and the task ids are in the signature, the prompt text is not)
    assert warm[0] is False and warm[10] and warm[12], warm
    release_graphs(mm)
    assert "_lmx_kept_graphs" not in mm.__dict__
