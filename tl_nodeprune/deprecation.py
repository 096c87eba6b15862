"""Old import paths that keep working for a while: they warn once per name and forward."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forward_module(old: str, new: str) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `old` that finds each name in `new` and warns.

    Old modules keep no names of their own, so every attribute read goes through here and says
    where the name lives now (STYLE.md: moved names keep working, with a warning first).
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(new), name)
        warnings.warn(
            f"{old}.{name} has moved to {new}.{name}; the old path will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
