"""Moved to `tl_nodeprune.sweeps`: the function `tl_nodeprune.sweep` took this module's name.

Kept so that `from tl_nodeprune.sweep import ...` still works; each name warns and forwards.
"""

from .deprecation import forward_module

__getattr__ = forward_module(__name__, "tl_nodeprune.sweeps")
