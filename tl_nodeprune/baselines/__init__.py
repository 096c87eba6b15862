"""Baselines on the same models, tasks and evaluation as node pruning; each returns a `Circuit`.

Every entry of `BASELINES` is called as `method(model, task, **settings)`.
"""

from collections.abc import Callable

from ..circuit import Circuit
from .acdc import acdc, estimate_forward_passes
from .activation_patching import activation_patching, node_effects
from .eap import eap, eap_ig, eap_scores
from .edge_eval import EdgeEvaluator, evaluate_edges
from .edge_pruning import EdgePruneConfig, edge_pruning
from .graph import EdgeGraph, edge_forward

BASELINES: dict[str, Callable[..., Circuit]] = {
    "edge_pruning": edge_pruning,
    "activation_patching": activation_patching,
    "acdc": acdc,
    "eap": eap,
    "eap_ig": eap_ig,
}

__all__ = [
    "BASELINES",
    "EdgeEvaluator",
    "EdgeGraph",
    "EdgePruneConfig",
    "acdc",
    "estimate_forward_passes",
    "activation_patching",
    "node_effects",
    "eap",
    "eap_ig",
    "eap_scores",
    "edge_forward",
    "edge_pruning",
    "evaluate_edges",
]
