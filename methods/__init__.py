"""The method registry: name -> Method subclass. `kvbench methods` lists it."""

from __future__ import annotations

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}


def register(method_class: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under its ``name``."""
    REGISTRY[method_class.name] = method_class
    return method_class


def get_method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KvbenchError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}") from None


def build_method(name: str, capacity: int | None = None, **options) -> Method:
    """Instantiate a registered method; options left at None take the method's defaults."""
    method_class = get_method_class(name)
    relevant = {key: value for key, value in options.items() if key in {o.name for o in method_class.options}}
    return method_class(capacity=capacity, **relevant)


# Importing a method module registers it.
from kvbench.methods import elastic, fullkv, prefixkv, pyramidkv, snapkv, windowkv  # noqa: E402,F401
