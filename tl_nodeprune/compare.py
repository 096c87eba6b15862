"""Moved to `tl_nodeprune.comparison`: the function `tl_nodeprune.compare` took this module's name.

Kept so that `from tl_nodeprune.compare import ...` still works; each name warns and forwards.
"""

from .deprecation import forward_module

__getattr__ = forward_module(__name__, "tl_nodeprune.comparison")
