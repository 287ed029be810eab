"""DLP's nucleus with a cap (``max_kept``): a fresh router's near-uniform distribution keeps exactly the cap."""

import torch

from models import route_top_p


def test_cap_keeps_the_most_likely_and_renormalises():
    probs = torch.softmax(torch.randn(4, 28, generator=torch.Generator().manual_seed(0)) * 0.01, dim=-1)
    wide, _ = route_top_p(probs, 0.6)
    assert (wide >= 0).sum(1).min() > 10  # near-uniform: a wide nucleus
    ids, w = route_top_p(probs, 0.6, max_kept=2)
    assert ids.shape == (4, 2) and (ids >= 0).all()
    assert torch.equal(ids, probs.argsort(-1, descending=True)[:, :2])
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    ids1, _ = route_top_p(torch.tensor([[0.7, 0.2, 0.1]]), 0.6, max_kept=2)
    assert ids1.tolist() == [[0]]  # the cap never widens a nucleus that p already closed
