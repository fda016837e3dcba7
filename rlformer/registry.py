"""Name -> class registries for every swappable part of an encoder.

A variant is one module plus ``@register(kind, name)``; ``available()`` lists what is
registered, and the registry-wide tests loop over it, so a new variant is tested the day
it lands.
"""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

KINDS = ("attention", "position", "memory", "block", "depth")
_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}

T = TypeVar("T", bound=type)


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("attention", "lsh")`` makes ``attention="lsh"`` buildable."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")

    def deco(cls: T) -> T:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is registered twice: {existing.__qualname__} and {cls.__qualname__}")
        _REGISTRY[kind][name] = cls
        cls.registry_name = name
        return cls

    return deco


def lookup(kind: str, name: str) -> type:
    """The class registered as ``name``; a ValueError naming the closest names otherwise."""
    table = _REGISTRY[kind]
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown {kind} {name!r}.{hint} Registered {kind} variants: {sorted(table)}.")
    return table[name]


def available() -> dict[str, list[str]]:
    """Every registered variant name, by kind."""
    return {kind: sorted(table) for kind, table in _REGISTRY.items()}
