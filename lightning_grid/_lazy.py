"""Names a package exports but loads on first use (PEP 562 ``__getattr__``).

Three packages need it for the same reason: ``import lightning_grid`` runs in every training process
of a user who has us installed (Lightning's entry point), so it must not pull in torch, Lightning or
the Linux-only launcher until one of their names is actually asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str,
    table: Mapping[str, str],
    namespace: dict[str, Any],
    before: Mapping[str, Callable[[], None]] | None = None,
) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` (a module path) and caches the value in
    ``namespace``; ``before[name]`` runs first (a platform check, say)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if before and name in before:
            before[name]()
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
