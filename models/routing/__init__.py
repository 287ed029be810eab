"""Routing strategies: one module per strategy, plus the shared route types (``route``) and checkpoints (``checkpoint``)."""
