"""``base``: no adapter at all, the base model alone (the lower bound of every table)."""

from __future__ import annotations

from models.routing.registry import strategy
from models.routing.route import Router


@strategy("base")
class BaseRouter(Router):
    """Routes nothing: every wrapped projection returns its base output (``route`` is None)."""

    keeps_decode_graph = True

    shares_route = True
