import torch
from torch import nn

from partitioner import zoo
from partitioner.passes.annotate import annotate
from partitioner.passes.graph_nodes import normalise_module_path
from partitioner.passes.capture import capture


def _annotated(zm):
    return annotate(capture(zm.model, zm.example_args, zm.example_kwargs))


def test_mlp_linear_nodes_owned_by_their_layers():
    zm = zoo.build("mlp", small=True, batch=2)
    ag = _annotated(zm)
    linears = [n for n in ag.nodes if n.op == "call_function" and "linear" in n.target]
    assert [n.module_path for n in linears] == ["layers.0", "layers.1", "layers.2", "layers.3", "head"]
    assert all(n.module_type == "torch.nn.modules.linear.Linear" for n in linears)
    assert linears[0].params == ("layers.0.weight", "layers.0.bias")
    # (batch, hidden) float32 output
    assert linears[0].shapes == ((2, 32),) and linears[0].dtypes == ("float32",)
    assert linears[0].output_bytes == 2 * 32 * 4
    assert ag.param_numel == {k: p.numel() for k, p in zm.model.named_parameters()}
    assert ag.param_bytes["layers.0.weight"] == 32 * 16 * 4


def test_get_attr_nodes_owned_by_parameter_module():
    zm = zoo.build("gpt2", small=True, batch=2)
    ag = _annotated(zm)
    p = next(n for n in ag.nodes if n.is_param and n.target == "transformer.h.1.attn.c_attn.weight")
    assert p.op == "get_attr" and p.module_path == "transformer.h.1.attn.c_attn"
    assert p.module_type.endswith("Conv1D")


def test_gpt2_tied_and_module_paths():
    zm = zoo.build("gpt2", small=True, batch=2)
    ag = _annotated(zm)
    assert ag.tied == [["transformer.wte.weight", "lm_head.weight"]]
    assert "lm_head.weight" not in ag.param_bytes
    assert sum(ag.param_numel.values()) == sum(p.numel() for p in zm.model.parameters())
    paths = {n.module_path for n in ag.nodes if n.op == "call_function"}
    assert {"transformer.h.0.attn", "transformer.h.1.mlp.c_fc", "transformer.wte"} <= paths
    embedding = next(n for n in ag.nodes if "embedding" in n.target and n.module_path == "transformer.wte")
    assert embedding.params == ("transformer.wte.weight",)
    out = ag.nodes[-1]
    assert out.op == "output" and out.shapes == ((2, 16, 100),)
    names = {n.name for n in ag.nodes}
    assert all(set(n.inputs) <= names for n in ag.nodes)


def test_nodes_without_stack_inherit_from_producer():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)

        def forward(self, x):
            a, b = self.proj(x).chunk(2, dim=-1)  # getitem nodes carry no module stack in some traces
            return a * b

    c = capture(TwoOut(), (torch.randn(3, 4),))
    for n in c.graph_module.graph.nodes:
        if n.target.__class__.__name__ == "builtin_function_or_method" or "getitem" in str(n.target):
            n.meta.pop("nn_module_stack", None)
    ag = annotate(c)
    getitems = [n for n in ag.nodes if "getitem" in n.target]
    assert getitems and all(n.module_path == ag.by_name()[n.inputs[0]].module_path for n in getitems)


def test_normalise_module_path_forms():
    assert normalise_module_path("L['self'].transformer.h[0].attn") == "transformer.h.0.attn"
    assert normalise_module_path("getattr(L['self'].transformer.h, '0').attn") == "transformer.h.0.attn"
    assert normalise_module_path("transformer.h.0") == "transformer.h.0"
    assert normalise_module_path("L['self']") == ""
