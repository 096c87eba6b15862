"""tl_nodeprune: find circuits by learning node masks at several granularities at once."""

from . import (
    baselines,
    comparison,
    evaluation,
    formats,
    granularities,
    metrics,
    planted,
    plot,
    references,
    reporting,
    seeds,
    selection,
    sweeps,
    tasks,
)

# The old module paths (tl_nodeprune.compare, .evaluate, .report, .sweep) are loaded before the
# functions of the same names below take those names in the package namespace; a later
# `from tl_nodeprune.evaluate import ...` then finds its module loaded and leaves them alone.
from . import compare as _compare_module
from . import evaluate as _evaluate_module
from . import report as _report_module
from . import sweep as _sweep_module
from .certificate import certify
from .circuit import Circuit
from .comparison import auc, compare, compare_circuits, roc, roc_auc
from .evaluation import Evaluation, Evaluator, evaluate
from .formats import read_acdc, read_edge_pruning, read_mib, to_mib, write_mib
from .gates import HardConcrete
from .metrics import cmd, completeness, cpr, faithfulness_curve, minimality
from .models import load_model
from .pruner import NodePruner, PruneConfig, PruneResult
from .reporting import report
from .seed_spread import SeedSpread
from .seeds import fit_seeds
from .selection import Selection, select_smallest
from .sites import GRANULARITIES, ModelShape
from .sweeps import granularity_sweep, sweep
from .tasks import PromptTask

# What a researcher types. Everything imported above stays an attribute of the package (and
# importable by name); this is the surface that `from tl_nodeprune import *` and the docs show.
__all__ = [
    "Circuit",
    "NodePruner",
    "PromptTask",
    "PruneConfig",
    "PruneResult",
    "baselines",
    "compare",
    "evaluate",
    "fit_seeds",
    "load_model",
    "plot",
    "references",
    "report",
    "sweep",
    "tasks",
]
