"""Moved to `tl_nodeprune.evaluation`: the function `tl_nodeprune.evaluate` took this module's name.

Kept so that `from tl_nodeprune.evaluate import ...` still works; each name warns and forwards.
"""

from .deprecation import forward_module

__getattr__ = forward_module(__name__, "tl_nodeprune.evaluation")
