"""Regional compilation of a routed model (models.compile): one graph serves every decoder layer.

A 4-layer tiny LLaMA with three real peft adapters on all 7 projections, trained one step per variant (one adapter
for every row, one adapter per row, MeteoRA gates over the bank) with every decoder layer compiled by a backend that
counts what dynamo hands it. A layer that looked anything up by its own name would compile once per layer (4);
here the first layer compiles once and the others reuse it, plus one recompile for the input that needs no
gradient (layer 0 reads frozen embeddings). No graph break, and the loss equals the eager model's.
"""

import pytest
import torch

from models import MultiLoRAModel, load_base_model
from models.compile import compile_layers, decoder_layers
from models.tiny import save_random_peft_adapter, save_tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    base = save_tiny_llama(root / "base", num_hidden_layers=4)
    adapters = {f"t{i}": save_random_peft_adapter(base, root / f"t{i}", targets=TARGETS, seed=i) for i in range(3)}
    return base, adapters


def _model(four_layers, variant):
    base, adapters = four_layers
    model, _ = load_base_model(base)
    names = ["t0"] if variant == "single" else list(adapters)
    mm = MultiLoRAModel.from_adapters(model, {n: adapters[n] for n in names})
    if variant == "gates":
        torch.manual_seed(0)  # the same fresh gates in the eager and the compiled model
        mm.set_router("meteora", top_k=2)
        mm.set_trainable("gates")
    else:
        mm.set_trainable("adapters")
    mm.train()
    return mm


def _loss(mm, variant):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (3, 12), generator=g)
    task_ids = [0, 0, 0] if variant == "single" else [0, 1, 2]
    return mm(input_ids=ids, labels=ids, task_ids=task_ids).loss


@pytest.mark.parametrize("variant", ["single", "joint", "gates"])
def test_one_graph_serves_every_layer(four_layers, variant):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = _loss(_model(four_layers, variant), variant)
    mm = _model(four_layers, variant)
    assert len(decoder_layers(mm.model)) == 4
    breaks = sum(counters["graph_break"].values())
    assert compile_layers(mm.model, backend=counting) == 4
    loss = _loss(mm, variant)
    loss.backward()
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs for 4 layers: a layer specialised the compiled code"
    assert sum(counters["graph_break"].values()) == breaks
    torch.testing.assert_close(loss, eager)
    trained = [p for p in mm.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("dynamic, compiles", [(None, 2), (True, 1)])
def test_dynamic_compiles_once_for_every_batch_length(four_layers, dynamic, compiles):
    """A stage's batches are padded to their longest row, so their length varies. Compiled with ``dynamic=True``
    (the stages' train_speed.dynamic) the layers compile once for any length; static shapes compile the first length
    and again at the second. Counted in eval mode (one graph per compile: no frozen-input recompile)."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mm = _model(four_layers, "joint")
    mm.eval()
    compile_layers(mm.model, backend=counting, dynamic=dynamic)
    with torch.no_grad():
        for length in (9, 12, 15):
            ids = torch.randint(0, 250, (3, length), generator=torch.Generator().manual_seed(length))
            mm(input_ids=ids, labels=ids, task_ids=[0, 1, 2])  # a loss, as the stages' validation steps
    assert len(graphs) == compiles


def test_gate_counts_per_projection_keep_one_graph_for_every_layer(four_layers):
    """Validation counts MeteoRA's top-1 hits per projection gate (eval mode): each gate adds its hits at the slot
    its own ``projection_index`` tensor names, so the compiled layers still share one graph (a Python index per
    gate would compile one per layer), break no graph, and count what the eager model counts; so do the per-token
    hits (``gate_hits_in``)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(0, 250, (3, 12), generator=torch.Generator().manual_seed(0))
    counts = []
    for compiled in (False, True):
        mm = _model(four_layers, "gates")
        mm.eval()
        breaks = sum(counters["graph_break"].values())
        if compiled:
            compile_layers(mm.model, backend=counting)
        with torch.no_grad():
            mm(input_ids=ids, labels=ids, task_ids=[0, 1, 2])
        counts.append([t.tolist() for t in mm.router.gate_hits_by_projection()])
        answers = torch.zeros(3, 12, dtype=torch.long)
        answers[:, 8:] = 1  # the per-token hits (gate_hits_in: the answer tokens' accuracy) counted in the graph too
        counts.append([t.tolist() for t in mm.router.gate_hits_in(answers)])
    assert counts[1][1] == [4 * 7 * 4] * 3  # 4 answer tokens of each row's task, routed by 4 x 7 gates
    assert len(graphs) == 1, f"{len(graphs)} graphs for 4 layers: a gate's count specialised the compiled code"
    assert sum(counters["graph_break"].values()) == breaks
    assert counts[2:] == counts[:2] and len(counts[0][0]) == 4 * 7 and counts[0][1] == 3 * 12
