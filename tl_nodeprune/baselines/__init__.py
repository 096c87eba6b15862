"""Baselines on the same models, tasks and evaluation as node pruning; each returns a `Circuit`."""

from .graph import EdgeGraph, edge_forward

__all__ = ["EdgeGraph", "edge_forward"]
