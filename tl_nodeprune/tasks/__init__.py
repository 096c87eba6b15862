"""Tasks: paired prompts with answers. `PromptTask` for your own, generators for known ones.

The generators are also registered by name (`REGISTRY`, `get`), which is how the command line
and bench/ pick a task.
"""

from .base import PromptTask
from .greater_than import GREATER_THAN_POSITIONS, greater_than, greater_than_independent
from .ioi import IOI_POSITIONS, ioi, ioi_independent
from .labels import label_tokens
from .registry import REGISTRY, get

__all__ = [
    "GREATER_THAN_POSITIONS",
    "IOI_POSITIONS",
    "REGISTRY",
    "PromptTask",
    "get",
    "greater_than",
    "greater_than_independent",
    "ioi",
    "ioi_independent",
    "label_tokens",
]
