"""Models placed by a device_map: what one CPU can check of the path (bench/gpu_device_map.py
checks the rest on GPUs).

Here every module is dispatched to "cpu", so accelerate's AlignDevicesHook runs around every
block, as on a split model, but never moves a tensor between devices: a bug that mixes devices
cannot show on one device, and is the GPU script's to catch.
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.models import load_model, wrap_dispatched
from tl_nodeprune.planted import PlantedProblem, available_flavours, planted_problem

pytestmark = pytest.mark.skipif(
    "bridge-llama" not in available_flavours(), reason="needs TransformerBridge"
)
CONFIG = tnp.PruneConfig(steps=30, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlantedProblem, Path]:
    """A planted Llama problem, and its transformers model saved with a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    problem = planted_problem("bridge-llama", seed=0)
    inner = problem.model.original_model
    # The bridge sits inside the transformers module tree; its weights keep their HF names
    # once the wrappers' segment is dropped.
    weights = {k.replace("._original_component", ""): v for k, v in inner.state_dict().items()}
    hf_model = LlamaForCausalLM(inner.config)
    hf_model.load_state_dict(weights, strict=False)
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(inner.config.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="t0", eos_token="t0", unk_token="t0"
    )
    tokenizer.save_pretrained(folder)
    return problem, folder


def _dispatched(folder: Path):
    """The saved model with an accelerate hook on every module of its device map."""
    import accelerate
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(folder).eval()
    layers = [f"model.layers.{i}" for i in range(hf_model.config.num_hidden_layers)]
    names = ["model.embed_tokens", *layers, "model.norm", "model.rotary_emb", "lm_head"]
    accelerate.dispatch_model(hf_model, {n: "cpu" for n in names}, force_hooks=True)
    assert hasattr(hf_model.model.layers[0], "_hf_hook")  # the hooked path, not a no-op
    return wrap_dispatched(hf_model, str(folder), compatibility=False)


def test_device_and_device_map_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        load_model("gpt2", device="cpu", device_map="auto")


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_discovery_through_accelerate_hooks_matches_the_plain_model(saved, checkpoint):
    problem, folder = saved
    cfg = replace(CONFIG, checkpoint=checkpoint)
    plain = tnp.NodePruner(problem.model, CONFIG).fit(problem.task)
    hooked = tnp.NodePruner(_dispatched(folder), cfg).fit(problem.task)
    assert plain.circuit.nodes == problem.circuit.nodes  # the run is not trivially empty
    for g, la in plain.log_alpha.items():
        torch.testing.assert_close(hooked.log_alpha[g], la, rtol=0, atol=1e-5)
    assert hooked.circuit.nodes == plain.circuit.nodes


@pytest.mark.filterwarnings("ignore:This circuit was found on")
def test_evaluation_through_accelerate_hooks_gives_the_same_numbers(saved):
    problem, folder = saved
    plain = tnp.evaluate(problem.model, problem.circuit, problem.task)
    hooked = tnp.evaluate(_dispatched(folder), problem.circuit, problem.task)
    assert plain.metric_full != pytest.approx(plain.metric_empty, abs=1e-3)
    for field in ("metric_full", "metric_circuit", "metric_empty", "kl", "kl_empty"):
        assert getattr(hooked, field) == pytest.approx(getattr(plain, field), abs=1e-5), field


@pytest.mark.skipif(
    "hooked" in available_flavours(),
    reason="on TransformerLens < 4, load_model(folder, device=...) loads a HookedTransformer by "
    "hub name only, so there is no plain load of a local folder to compare with",
)
def test_load_model_with_a_device_map_matches_load_model_on_a_device(saved):
    problem, folder = saved
    on_device = load_model(str(folder), device="cpu")
    mapped = load_model(str(folder), device_map={"": "cpu"})
    assert mapped.compatibility_mode and not mapped.training
    tokens = problem.task.clean[:4]
    with torch.no_grad():
        torch.testing.assert_close(mapped(tokens), on_device(tokens), rtol=1e-5, atol=1e-5)
    a = tnp.NodePruner(on_device, CONFIG).fit(problem.task)
    b = tnp.NodePruner(mapped, CONFIG).fit(problem.task)
    for g, la in a.log_alpha.items():
        torch.testing.assert_close(b.log_alpha[g], la, rtol=0, atol=1e-5)
