"""Tasks: paired prompts with answers. `PromptTask` for your own, generators for known ones.

The generators are also registered by name (`REGISTRY`, `get`), which is how the command line
and bench/ pick a task.
"""

from .base import PromptTask
from .greater_than import greater_than
from .ioi import ioi, ioi_independent
from .registry import REGISTRY, get

__all__ = ["REGISTRY", "PromptTask", "get", "greater_than", "ioi", "ioi_independent"]
