"""tl_nodeprune: find circuits by learning node masks at several granularities at once."""

from . import baselines, formats, metrics, planted, plot, references, tasks
from .circuit import Circuit
from .compare import auc, compare, compare_circuits, roc, roc_auc
from .evaluate import Evaluation, Evaluator, evaluate
from .formats import read_acdc, read_edge_pruning, read_mib, to_mib, write_mib
from .gates import HardConcrete
from .metrics import cmd, completeness, cpr, faithfulness_curve, minimality
from .models import load_model
from .pruner import NodePruner, PruneConfig, PruneResult
from .report import report
from .sites import GRANULARITIES, ModelShape
from .sweep import granularity_sweep, sweep
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
    "auc",
    "baselines",
    "cmd",
    "compare",
    "compare_circuits",
    "completeness",
    "cpr",
    "evaluate",
    "faithfulness_curve",
    "formats",
    "granularity_sweep",
    "load_model",
    "metrics",
    "minimality",
    "planted",
    "plot",
    "read_acdc",
    "read_edge_pruning",
    "read_mib",
    "references",
    "report",
    "roc",
    "roc_auc",
    "sweep",
    "tasks",
    "to_mib",
    "write_mib",
]
