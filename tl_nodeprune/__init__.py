"""tl_nodeprune: find circuits by learning node masks at several granularities at once."""

from . import planted, selection, tasks
from .circuit import Circuit
from .evaluate import Evaluation, evaluate
from .gates import HardConcrete
from .models import load_model
from .pruner import NodePruner, PruneConfig, PruneResult
from .seeds import SeedSpread, fit_seeds
from .selection import Selection, select_smallest
from .sites import GRANULARITIES, ModelShape
from .tasks import PromptTask

__all__ = [
    "GRANULARITIES",
    "Circuit",
    "Evaluation",
    "HardConcrete",
    "ModelShape",
    "NodePruner",
    "PromptTask",
    "PruneConfig",
    "PruneResult",
    "SeedSpread",
    "Selection",
    "evaluate",
    "fit_seeds",
    "load_model",
    "planted",
    "select_smallest",
    "selection",
    "tasks",
]
