"""The task generators by name, for the command line and bench/: one table to extend."""

from __future__ import annotations

from collections.abc import Callable

from .base import PromptTask
from .greater_than import greater_than, greater_than_independent
from .ioi import ioi, ioi_independent

# A generator takes the model (for its tokenizer), `n` prompt pairs and a `seed`; the same seed
# gives the same task.
TaskGenerator = Callable[..., PromptTask]

REGISTRY: dict[str, TaskGenerator] = {
    "ioi": ioi,
    "ioi_independent": ioi_independent,
    "greater_than": greater_than,
    "greater_than_independent": greater_than_independent,
}


def get(name: str) -> TaskGenerator:
    """The generator registered as `name`; a ValueError lists the registered ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; choose from {', '.join(REGISTRY)}.") from None

