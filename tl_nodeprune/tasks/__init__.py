"""Tasks: paired prompts with answers. `PromptTask` for your own, generators for known ones."""

from .base import PromptTask

__all__ = ["PromptTask"]
