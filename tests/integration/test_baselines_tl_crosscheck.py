"""Our edge graph and EAP scores against TransformerLens's own attribution patching (>= 4.3)."""

import pytest
import torch

from tl_nodeprune.baselines.eap import eap_scores
from tl_nodeprune.baselines.graph import EdgeGraph
from tl_nodeprune.tasks.base import PromptTask

ap = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")

WRITER = {"embed": lambda n: "input", "attn_head_out": lambda n: f"a{n.layer}.h{n.head}",
          "mlp_out": lambda n: f"m{n.layer}"}  # fmt: skip
READER = {"q_input": "q", "k_input": "k", "v_input": "v"}


def _name(writer, reader) -> str:
    if reader.kind == "logits":
        end = "logits"
    elif reader.kind == "mlp_in":
        end = f"m{reader.layer}"
    else:
        end = f"a{reader.layer}.h{reader.head}<{READER[reader.kind]}>"
    return f"{WRITER[writer.kind](writer)}->{end}"


def test_edges_and_eap_scores_match_transformer_lens_attribution_patching():
    # TransformerLens has no public way to bridge a model built in memory.
    from transformer_lens.model_bridge.sources._bridge_builder import (  # noqa: PLC2701
        build_bridge_from_module,
    )
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = build_bridge_from_module(GPT2LMHeadModel(cfg).eval(), "GPT2LMHeadModel",
                                     hf_config=cfg, model_name="tiny-gpt2").eval()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randint(0, 64, (2, 3, 6), generator=gen)
    task = PromptTask.from_tokens(clean, corrupted, [3, 3, 3], [5, 5, 5])
    try:
        edge_config = ap.EdgeAttributionConfig(granularity="edge")
    except NotImplementedError:  # TransformerLens 3.x ships the module with node scoring only
        pytest.skip("this TransformerLens's attribution patching has no edge granularity")
    result = ap.attribution_patch(
        model, clean, corrupted, lambda logits: logits[0, -1, 3] - logits[0, -1, 5],
        edge_config,
    )  # fmt: skip
    theirs: dict[str, float] = {}
    for (writer, reader), score in result.edge_scores.items():  # per position: sum them
        name = _name(writer, reader)
        theirs[name] = theirs.get(name, 0.0) + score
    graph = EdgeGraph.from_model(model)
    assert set(theirs) == set(graph.edge_names) and graph.n_edges == 110
    ours = eap_scores(model, task, corrupted_gradient=True)
    expected = torch.tensor([theirs[name] for name in graph.edge_names])
    assert expected.abs().max() > 0.01
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-3)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result
