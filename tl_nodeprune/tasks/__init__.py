"""Tasks: paired prompts with answers. `PromptTask` for your own, generators for known ones."""

from .base import PromptTask
from .greater_than import greater_than
from .ioi import ioi, ioi_independent

__all__ = ["PromptTask", "greater_than", "ioi", "ioi_independent"]
