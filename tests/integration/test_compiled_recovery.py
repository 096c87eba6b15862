"""Issue 20, item 1: discovery returns exactly the compiled circuit, every seed 0-4.

Every compiled model (tl_nodeprune.compiled), every flavour this TransformerLens builds;
default PruneConfig (a KL budget, a faithfulness band, one noise draw per prompt) except the
granularities (blocks and heads, what the truth gates). Every needed node's lone removal costs
KL >= 0.2 (test_compiled_models), 7x a head's price and more, so a circuit that misses one is
wrong, not a trade-off. With one draw shared by the batch (`gate_noise="batch"`, the compact
setting) 11 of these 55 runs lose needed nodes for good (docs/lab/quality.md, section 8);
`python -m bench.compiled_recovery [--set gate_noise=batch --set target_kl=None --set
target_faithfulness=None]` prints which nodes and their log_alpha.
"""

import pytest

import tl_nodeprune as tnp
from tl_nodeprune.circuit import parse_node
from tl_nodeprune.compiled import COMPILED, FLAVOURS, GRANULARITIES, compiled_problem, differences
from tl_nodeprune.planted import available_flavours

BUILT = [f for f in FLAVOURS if f in available_flavours()]
SEEDS = range(5)
N_PROMPTS = 64  # as bench.compiled_recovery, so its table describes this test


@pytest.mark.parametrize("flavour", BUILT)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", COMPILED)
def test_discovery_with_the_defaults_recovers_the_exact_compiled_circuit(name, seed, flavour):
    problem = compiled_problem(name, flavour, seed=seed, n_prompts=N_PROMPTS)
    config = tnp.PruneConfig(progress=False, seed=seed, granularities=GRANULARITIES)
    result = tnp.NodePruner(problem.model, config).fit(problem.task)
    missed, extra = differences(problem.circuit, result.circuit)
    log_alpha = {
        n: round(float(result.log_alpha[g][i]), 1) for n in missed for g, i in [parse_node(n)]
    }
    assert not missed and not extra, f"missed (final log_alpha) {log_alpha}, extra {extra}"
