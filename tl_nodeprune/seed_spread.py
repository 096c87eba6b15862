"""`SeedSpread`: the results of one discovery per seed and how often each node was kept.

It sits below the pruner (which builds it in `NodePruner.fit_seeds`) and needs `PruneResult`
only for its annotation, so the two modules do not import each other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from .circuit import parse_node

if TYPE_CHECKING:
    from .pruner import PruneResult


@dataclass
class SeedSpread:
    """The result of every seed, in the order run, and views across them."""

    results: dict[int, PruneResult]

    @property
    def seeds(self) -> list[int]:
        return list(self.results)

    def consensus(self) -> pd.DataFrame:
        """One row per node kept by at least one seed: granularity, count, share, per-seed flags.

        Sorted by count (most stable first), then by node name.
        """
        kept = {seed: set(r.circuit.nodes) for seed, r in self.results.items()}
        nodes = sorted(set().union(*kept.values()))
        rows = []
        for node in nodes:
            flags = {f"seed_{seed}": node in kept[seed] for seed in self.results}
            count = sum(flags.values())
            rows.append({"node": node, "granularity": parse_node(node)[0], "kept": count,
                         "share": count / len(self.results), **flags})  # fmt: skip
        columns = ["node", "granularity", "kept", "share", *(f"seed_{s}" for s in self.results)]
        frame = pd.DataFrame(rows, columns=columns)
        return frame.sort_values(["kept", "node"], ascending=[False, True]).reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Per seed: nodes kept per granularity and seconds."""
        rows = []
        for seed, r in self.results.items():
            kept = r.circuit.summary()["kept"].to_dict()
            rows.append({"seed": seed, **kept, "seconds": round(r.seconds, 1)})
        return pd.DataFrame(rows).set_index("seed")

    def stability(self) -> pd.DataFrame:
        """Per granularity, one number for how much the seeds agree: the mean Jaccard index of
        their node sets over pairs of seeds (1: every seed kept the same nodes), with the
        nodes kept by every seed and by some seed."""
        sets: dict[str, list[set[str]]] = {}
        for r in self.results.values():
            for g in r.circuit.granularities:
                sets.setdefault(g, []).append({n for n in r.circuit.nodes
                                               if parse_node(n)[0] == g})  # fmt: skip
        rows = []
        for g, per_seed in sets.items():
            pairs = list(itertools.combinations(per_seed, 2))
            jaccard = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs]
            rows.append({"granularity": g,
                         "jaccard": sum(jaccard) / len(jaccard) if pairs else float("nan"),
                         "every_seed": len(set.intersection(*per_seed)),
                         "some_seed": len(set.union(*per_seed))})  # fmt: skip
        return pd.DataFrame(rows).set_index("granularity")

    def stable(self, share: float = 1.0) -> list[str]:
        """Nodes kept by at least `share` of the seeds (1.0: by every seed)."""
        frame = self.consensus()
        return frame.loc[frame["share"] >= share - 1e-9, "node"].tolist()


__all__ = ["SeedSpread"]
