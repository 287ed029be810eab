"""Strategy names -> builders: how ``MultiLoRAModel.set_router("meteora")`` and a router checkpoint find a strategy.

A strategy module registers its builder with a decorator; every module of this package is imported on the first
lookup, so adding a strategy is adding its file (and its ``conf/router/<name>.yaml``):

    @strategy("meteora")                        # a Router subclass: the builder is the class, name set on it
    class MeteoraRouter(Router): ...

    @strategy("dlp_segments", builds=DLPRouter) # a function composing one: name what it builds
    def dlp_segments(ctx, **knobs): ...

A builder takes the shared ``RouteContext`` (bank, tokenizer, input embedding) and the strategy's knobs. The stages
do not go through names: ``conf/router/<name>.yaml`` names the builder by ``_target_``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

_BUILDERS: dict[str, tuple[Callable, type]] = {}  # name -> (builder, the Router class it builds)


def strategy(name: str, builds: type | None = None):
    """Register the decorated Router subclass (or builder function, with ``builds``) as strategy ``name``."""

    def register(builder):
        cls = builds or builder
        if builds is None:
            builder.name = name
        _BUILDERS[name] = (builder, cls)
        return builder

    return register


def _discover() -> None:
    from models import routing  # lazy: models.routing imports this registry, so the package is read after it

    for module in pkgutil.iter_modules(routing.__path__):
        importlib.import_module(f"{routing.__name__}.{module.name}")


def names() -> list[str]:
    """Every registered strategy name, sorted."""
    _discover()
    return sorted(_BUILDERS)


def builder(name: str) -> Callable:
    """The builder of strategy ``name``; an unknown name is one ValueError line listing the known ones."""
    if name not in _BUILDERS:
        _discover()
    if name not in _BUILDERS:
        raise ValueError(f"router={name!r} is not known; choose one of {names()}")
    return _BUILDERS[name][0]


def router_class(build) -> type:
    """The Router class a builder (or a strategy name) makes: the class itself, or what a builder function names."""
    if isinstance(build, str):
        builder(build)
        return _BUILDERS[build][1]
    _discover()
    for fn, cls in _BUILDERS.values():
        if fn is build:
            return cls
    return build  # an unregistered Router subclass (a strategy built by _target_ alone)


def strategy_name(build) -> str:
    """The name a builder registered under (a class's ``name`` when unregistered)."""
    _discover()
    for name, (fn, _) in _BUILDERS.items():
        if fn is build:
            return name
    return getattr(build, "name", getattr(build, "__name__", str(build)))
