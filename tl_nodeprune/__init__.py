"""tl_nodeprune: find circuits by learning node masks at several granularities at once."""

from . import formats, planted, references, tasks
from .circuit import Circuit
from .evaluate import Evaluation, Evaluator, evaluate
from .formats import read_acdc, read_edge_pruning, read_mib, to_mib, write_mib
from .gates import HardConcrete
from .models import load_model
from .pruner import NodePruner, PruneConfig, PruneResult
from .sites import GRANULARITIES, ModelShape
from .tasks import PromptTask

__all__ = [
    "GRANULARITIES",
    "Circuit",
    "Evaluation",
    "Evaluator",
    "HardConcrete",
    "ModelShape",
    "NodePruner",
    "PromptTask",
    "PruneConfig",
    "PruneResult",
    "evaluate",
    "formats",
    "load_model",
    "planted",
    "read_acdc",
    "read_edge_pruning",
    "read_mib",
    "references",
    "tasks",
    "to_mib",
    "write_mib",
]
