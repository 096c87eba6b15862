"""Moved to `tl_nodeprune.reporting`: the function `tl_nodeprune.report` took this module's name.

Kept so that `from tl_nodeprune.report import ...` still works; each name warns and forwards.
"""

from .deprecation import forward_module

__getattr__ = forward_module(__name__, "tl_nodeprune.reporting")
