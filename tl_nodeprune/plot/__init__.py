"""Plotly figures of circuits, runs and comparisons; each function returns a Figure, never shows it.

`heads`, `neurons` (and `units`, for any granularity drawn as a strip) and `graph` draw one
circuit, `by_position` where a position-aware circuit's nodes work; `history` a
`PruneResult.history`; `overlap`, `frontier` and `roc` compare circuits (their numbers come
from `compare`/`evaluate`).
"""

from .positions import by_position
from .runs import FRONTIER_COLUMNS, frontier, history, overlap, roc
from .views import graph, heads, neurons, units

__all__ = [
    "FRONTIER_COLUMNS",
    "by_position",
    "frontier",
    "graph",
    "heads",
    "history",
    "neurons",
    "overlap",
    "roc",
    "units",
]
