"""Circuits against references and against each other: precision/recall, ROC, one table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import Tensor

from .ablation import AblationKind
from .circuit import Circuit
from .evaluation import Evaluator
from .granularities import SPECS
from .metrics import node_values
from .references import Reference
from .sites import ModelShape
from .tasks.base import PromptTask

ReferenceLike = Reference | Circuit


@dataclass
class Comparison:
    """`scores`: precision, recall, F1 per granularity; `by_class`: recovered heads per class."""

    scores: pd.DataFrame
    by_class: pd.DataFrame

    def __repr__(self) -> str:
        return f"{self.scores.round(3)}\n\n{self.by_class}"


def _reference(reference: ReferenceLike, shape: ModelShape) -> tuple[Circuit, tuple[str, ...]]:
    """The reference as a circuit of `shape` and the granularities it makes claims about."""
    if isinstance(reference, Circuit):
        shape.check_same(reference.shape)
        grans = tuple(
            g for g in SPECS if g in reference.gates or g in reference.shape.blocks()
        )
        return reference, grans
    if (shape.n_layers, shape.n_heads) != (12, 12):
        raise ValueError(
            f"Reference {reference.name!r} was found on {reference.model!r} (12 layers, 12 heads);"
            f" this circuit's model {shape.name!r} has {shape.n_layers} layers, "
            f"{shape.n_heads} heads."
        )
    return reference.to_circuit(shape), reference.granularities


def _prf(pred: Tensor, true: Tensor) -> dict[str, float]:
    tp, fp = int((pred & true).sum()), int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def _aligned(a: Circuit, b: Circuit, granularity: str) -> tuple[Tensor, Tensor]:
    """Both circuits' kept-at masks over the union of their position names, by name (a node
    counts as not kept at a position its circuit does not have)."""
    assert a.positions is not None and b.positions is not None
    names = list(dict.fromkeys((*a.positions.names, *b.positions.names)))

    def spread(c: Circuit, axis: tuple[str, ...]) -> Tensor:
        kept = c.kept_at(granularity)
        out = kept.new_zeros((len(names), *kept.shape[1:]))
        for i, name in enumerate(axis):
            out[names.index(name)] = kept[i]
        return out

    return spread(a, a.positions.names), spread(b, b.positions.names)


def compare(circuit: Circuit, reference: ReferenceLike) -> Comparison:
    """Precision = |C & R| / |C|, recall = |C & R| / |R|, F1 = 2|C & R| / (|C| + |R|).

    Computed per granularity the reference speaks for (kept nodes, hierarchy applied; when
    both are position-aware circuits, also per node and position, rows "head@position"), plus
    a table of the reference's heads by class: how many the circuit keeps and which it misses,
    and a last row counting the circuit's heads outside the reference.
    """
    ref, grans = _reference(reference, circuit.shape)
    rows = [{"granularity": g, **_prf(circuit.kept(g), ref.kept(g))} for g in grans]
    if circuit.positions is not None and ref.positions is not None:
        rows += [{"granularity": f"{g}@position", **_prf(*_aligned(circuit, ref, g))}
                 for g in grans]  # fmt: skip
    scores = pd.DataFrame(rows).set_index("granularity")
    if isinstance(reference, Reference):
        classes = reference.head_class()
    else:
        classes = {(int(a), int(b)): "reference" for a, b in ref.kept("head").nonzero().tolist()}
    kept = set(circuit.heads)
    table = []
    for cls in dict.fromkeys(classes.values()):
        heads = sorted(h for h, c in classes.items() if c == cls)
        found = [h for h in heads if h in kept]
        missed = " ".join(f"{a}.{b}" for a, b in heads if (a, b) not in kept)
        table.append({"class": cls, "n": len(heads), "kept": len(found),
                      "recall": len(found) / len(heads), "missed": missed})  # fmt: skip
    extra = sorted(kept - set(classes))
    table.append({"class": "not in reference", "n": 0, "kept": len(extra), "recall": math.nan,
                  "missed": ""})  # fmt: skip
    return Comparison(scores, pd.DataFrame(table).set_index("class"))


def roc(
    source: Circuit | Sequence[Circuit], reference: ReferenceLike, granularity: str = "head"
) -> pd.DataFrame:
    """Node-level ROC at one granularity: true- and false-positive rates against `reference`.

    From one circuit, nodes are ranked by `node_values` (scores, else gates) and every distinct
    value is a threshold; from a sequence (a sweep), each circuit's kept set is one point.
    (0, 0) and (1, 1) close the curve. TPR = TP / |R|, FPR = FP / (N - |R|).
    """
    circuits = [source] if isinstance(source, Circuit) else list(source)
    if not circuits:
        raise ValueError("roc needs a circuit or a non-empty sequence of circuits.")
    ref, _ = _reference(reference, circuits[0].shape)
    true = ref.kept(granularity).flatten()
    pos, neg = int(true.sum()), int((~true).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"The reference keeps {pos} of {true.numel()} {granularity} nodes; "
                         "ROC needs both kept and pruned nodes.")  # fmt: skip
    if isinstance(source, Circuit):
        values = node_values(source, granularity).flatten()
        kept_sets = [values >= t for t in values.unique(sorted=True).flip(0)]
    else:
        kept_sets = [c.kept(granularity).flatten() for c in circuits]
    points = [(0.0, 0.0), (1.0, 1.0)] + [
        (int((k & ~true).sum()) / neg, int((k & true).sum()) / pos) for k in kept_sets
    ]
    return pd.DataFrame(sorted(set(points)), columns=["fpr", "tpr"])


def auc(curve: pd.DataFrame) -> float:
    """Area under an ROC curve (columns fpr, tpr), trapezoid rule."""
    x, y = curve["fpr"].tolist(), curve["tpr"].tolist()
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def roc_auc(
    source: Circuit | Sequence[Circuit],
    reference: ReferenceLike,
    granularities: Sequence[str] | None = None,
) -> pd.DataFrame:
    """AUC per granularity the reference speaks for (the evaluation of the ACDC paper)."""
    first = source if isinstance(source, Circuit) else source[0]
    grans = granularities or _reference(reference, first.shape)[1]
    return pd.DataFrame(
        [{"granularity": g, "auc": auc(roc(source, reference, g))} for g in grans]
    ).set_index("granularity")


def _jaccard(a: Tensor, b: Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def compare_circuits(
    circuits: Mapping[str, ReferenceLike],
    model: Any,
    task: PromptTask,
    ablation: AblationKind = "corrupted",
    batch_size: int = 32,
) -> pd.DataFrame:
    """One row per circuit: kept nodes per granularity, edges (where known), f and KL on `task`
    (pass held-out prompts) under one shared evaluation, and Jaccard overlaps |A & B| / |A | B|
    of kept heads, MLP blocks and neurons with every other circuit (column `J_head[other]`).

    A circuit without neuron gates keeps every neuron of its kept MLP blocks.
    """
    shape = ModelShape.from_model(model)
    named = {k: _reference(v, shape)[0] for k, v in circuits.items()}
    grans = tuple(g for g in SPECS if any(g in c.gates for c in named.values()))
    evaluator = Evaluator(model, task, ablation, batch_size, grans or None)
    counted = tuple(dict.fromkeys((*shape.available(), *grans)))
    # Overlaps at every counted granularity but attention blocks (the union of their heads).
    units = [g for g in counted if g != "attn"]
    rows = []
    for name, c in named.items():
        result = evaluator(c)
        row: dict[str, Any] = {"circuit": name}
        row.update({g: c.n_kept(g) for g in counted})
        row["edges"] = c.n_edges if c.n_edges is not None else math.nan
        row.update({"faithfulness": result.faithfulness, "kl": result.kl})
        for g in units:
            for other, d in named.items():
                if other != name:
                    row[f"J_{g}[{other}]"] = _jaccard(c.kept(g), d.kept(g))
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("circuit")
    frame.attrs.update({"metric_full": result.metric_full, "metric_empty": result.metric_empty,
                        "n_prompts": len(task), "ablation": ablation})  # fmt: skip
    return frame


__all__ = ["Comparison", "auc", "compare", "compare_circuits", "roc", "roc_auc"]
