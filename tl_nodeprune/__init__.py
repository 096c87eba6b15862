"""tl_nodeprune: find circuits by learning node masks at several granularities at once."""

from . import baselines, formats, metrics, planted, plot, references, selection, tasks
from .circuit import Circuit
from .compare import auc, compare, compare_circuits, roc, roc_auc
from .evaluate import Evaluation, Evaluator, evaluate
from .formats import read_acdc, read_edge_pruning, read_mib, to_mib, write_mib
from .gates import HardConcrete
from .metrics import cmd, completeness, cpr, faithfulness_curve, minimality
from .models import load_model
from .pruner import NodePruner, PruneConfig, PruneResult
from .report import report
from .seeds import SeedSpread, fit_seeds
from .selection import Selection, select_smallest
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
    "SeedSpread",
    "Selection",
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
    "fit_seeds",
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
    "select_smallest",
    "selection",
    "tasks",
    "to_mib",
    "write_mib",
]
