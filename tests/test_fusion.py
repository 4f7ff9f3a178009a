"""partitioner/cost_models/fusion.py: compiled stages keep their matmuls' times, fuse the light nodes between them
(each external input read once, only values read later written) and pay no per-op dispatch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from dist_utils import build

from partitioner.cost_models.device import get_device_spec
from partitioner.cost_models.fusion import is_heavy
from partitioner.cost_models.profile import profile
from partitioner.passes.capture import capture


class Chain(nn.Module):
    def __init__(self, d: int = 256):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h * 2.0 + 1.0).sigmoid())


def costs_of(model, x, compiled):
    return profile(capture(model, (x,)), device="h100", progress=False, compiled=compiled)


def test_a_pointwise_chain_reads_once_and_writes_once():
    x = torch.randn(64, 256)
    eager, fused = costs_of(Chain(), x, False), costs_of(Chain(), x, True)
    traces = {n: c for n, c in eager.nodes.items() if c.fwd_flops}
    assert traces, "the chain has matmuls"
    for name in traces:  # heavy nodes keep their device time
        assert fused.nodes[name].fwd_time_s == eager.nodes[name].fwd_time_s
    light = [n for n, c in eager.nodes.items() if not c.fwd_flops and c.fwd_time_s > 0]
    assert len(light) >= 4  # mul, add, relu, sigmoid
    eager_light = sum(eager.nodes[n].fwd_time_s for n in light)
    fused_light = sum(fused.nodes[n].fwd_time_s for n in light)
    # four kernels each reading and writing 64 x 256 floats -> one reading and one writing them
    assert fused_light < eager_light / 2.5
    # the host launches kernels: the fused chain's one, each linear's, no per-op dispatch
    launch = get_device_spec("h100").compiled_launch_overhead_s
    assert launch > 0 and sum(fused.nodes[n].host_fwd_time_s for n in light) == launch
    assert all(fused.nodes[n].host_fwd_time_s == launch for n in traces)


class ViewedChain(nn.Module):
    """A GELU chain between two matmuls, reached and left through views (as GPT-2's MLP is)."""

    def __init__(self, d: int = 256):
        super().__init__()
        self.a, self.b = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.a(x).view(x.shape[0], -1)
        g = 0.5 * h * (1.0 + torch.tanh(0.79788 * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.b(g.view(x.shape[0], -1))


def test_a_chain_between_views_reads_its_input_once_and_writes_its_output_once():
    x = torch.randn(512, 256)
    fused = costs_of(ViewedChain(), x, True)
    spec = get_device_spec("h100")
    light = [c for c in fused.nodes.values() if not c.fwd_flops and c.output_bytes and c.fwd_time_s > 0]
    hidden = 512 * 1024 * 4
    one_kernel = 2 * hidden / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency) + spec.per_kernel_s
    assert light, "the chain's reads and its write are costed through the views"
    assert sum(c.fwd_time_s for c in light) == pytest.approx(one_kernel)


def test_each_trainable_parameter_accumulates_its_gradient():
    model = Chain()
    model.a.requires_grad_(False)
    costs = costs_of(model, torch.randn(8, 256), False)
    spec = get_device_spec("h100")
    by_target = {name: c for name, c in costs.nodes.items() if name.startswith(("a_", "b_"))}
    weight = 3 * 256 * 256 * 4 / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
    assert by_target["b_weight"].bwd_time_s == pytest.approx(weight + spec.per_kernel_s)  # eager: a launch each
    compiled = {name: c for name, c in costs_of(model, torch.randn(8, 256), True).nodes.items()
                if name.startswith(("a_", "b_"))}
    # compiled: its share of a foreach add's launches, one of the 64 tensors a launch takes, at the
    # foreach add's bandwidth
    foreach = weight * spec.mem_bw_efficiency / spec.foreach_bw_efficiency
    assert spec.foreach_bw_efficiency < spec.mem_bw_efficiency
    assert compiled["b_weight"].bwd_time_s == pytest.approx(foreach + spec.per_kernel_s / 64)
    assert compiled["b_weight"].host_bwd_time_s == pytest.approx(spec.compiled_launch_overhead_s / 64)
    assert by_target["a_weight"].bwd_time_s == 0.0  # frozen: no gradient


def test_compiled_matmuls_are_padded_to_aligned_shapes():
    from partitioner.cost_models.flops import OpKernel
    from partitioner.cost_models.memory import DtypeScale
    from partitioner.cost_models.profile import op_kernel
    spec = get_device_spec("h100")
    mm = OpKernel("mm", 2 * 64 * 1600 * 50257, ((64 * 1600, torch.bfloat16, 1600), (1600 * 50257, torch.bfloat16, 50257),
                                                (64 * 50257, torch.bfloat16, 50257)), reduction=1600)
    scale = DtypeScale(torch.bfloat16, torch.bfloat16)
    assert op_kernel(mm, spec, scale).flops_efficiency == spec.misaligned_matmul_efficiency  # eager: slow kernels
    assert op_kernel(mm, spec, scale, padded=True).flops_efficiency == spec.matmul_efficiency


def test_compiled_gpt2_costs_less_and_keeps_its_matmuls():
    zm = build("gpt2")
    captured = capture(zm.model, (zm.example_args[0][:1],))
    eager = profile(captured, device="h100", progress=False)
    fused = profile(captured, device="h100", progress=False, compiled=True)
    assert fused.total("fwd_time_s") + fused.total("bwd_time_s") < eager.total("fwd_time_s") + eager.total("bwd_time_s")
    assert fused.total("fwd_flops") == eager.total("fwd_flops")
    for name, c in eager.nodes.items():
        if c.fwd_flops:
            assert fused.nodes[name].fwd_time_s == c.fwd_time_s and fused.nodes[name].bwd_time_s == c.bwd_time_s
        assert fused.nodes[name].fwd_time_s <= c.fwd_time_s + 1e-12


def test_heavy_means_matmul_or_attention():
    from partitioner.cost_models.flops import trace_nodes
    captured = capture(Chain(), (torch.randn(4, 256),))
    traces = trace_nodes(captured.graph_module)
    heavy = {n for n, t in traces.items() if is_heavy(t)}
    targets = {str(n.target) for n in captured.graph_module.graph.nodes if n.name in heavy}
    assert targets and all("addmm" in t or "linear" in t or "mm" in t for t in targets)


def test_the_math_attention_paths_pointwise_passes_fuse_between_its_matmuls():
    """T5's attention (a trainable bias as the mask: SDPA's math path) under compile: the casts,
    scaling, mask add and softmax between the two batched matmuls are one kernel each run."""
    from partitioner.cost_models.attention import AttentionCall
    from partitioner.cost_models.fusion import fuse_pointwise_runs
    from partitioner.cost_models.time import math_attention_kernels

    call = AttentionCall("math", 24, 1024, 1024, 64, 64, torch.bfloat16, mask_numel=12 * 1024 * 1024,
                         mask_dtype=torch.bfloat16, mask_requires_grad=True)
    for eager in math_attention_kernels(call):
        fused = fuse_pointwise_runs(eager)
        assert sum(k.flops for k in fused) == sum(k.flops for k in eager)
        assert all(a.flops or b.flops for a, b in zip(fused, fused[1:]))  # no two pointwise kernels in a row
        assert sum(k.launches for k in fused) < sum(k.launches for k in eager)
        assert max(k.bytes_moved for k in eager) <= sum(k.bytes_moved for k in fused) < sum(k.bytes_moved for k in eager)


class SwiGLU(nn.Module):
    """silu(gate(x)) * up(x), the up projection between the silu and the product in graph order (Llama's MLP)."""

    def __init__(self, d: int = 256):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        g = torch.nn.functional.silu(self.gate(x))
        return self.down(g * self.up(x))


def test_light_nodes_fuse_across_an_unrelated_matmul_between_them():
    costs = costs_of(SwiGLU(), torch.randn(64, 256), True)
    light = {n: c for n, c in costs.nodes.items() if not c.fwd_flops and c.fwd_time_s > 0}
    silu = next(c for n, c in light.items() if n.startswith("silu"))
    mul = next(c for n, c in light.items() if n.startswith("mul"))
    # one kernel: the product reads the two projections and writes once; the silu is never written
    assert silu.host_fwd_time_s == 0 and mul.host_fwd_time_s > 0
    spec = get_device_spec("h100")
    one_tensor_s = 64 * 4 * 256 * 4 / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
    assert silu.fwd_time_s == pytest.approx(one_tensor_s)  # reads gate's output only


class Lookup(nn.Module):
    def __init__(self, vocab: int = 50000, d: int = 256):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, ids):
        return self.head(self.emb(ids) * 2.0)


def test_a_compiled_lookup_reads_the_rows_it_gathers_not_its_table():
    costs = costs_of(Lookup(), torch.randint(0, 50000, (8, 32)), True)
    emb = next(c for n, c in costs.nodes.items() if n.startswith("embedding"))
    spec = get_device_spec("h100")
    table_s = 50000 * 256 * 4 / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
    assert 0 < emb.fwd_time_s < table_s / 50


class Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("compiled", [False, True])
def test_causal_fused_attention_costs_less_than_its_noncausal_count_says(compiled):
    q = torch.randn(2, 4, 1024, 64, dtype=torch.bfloat16)
    times = {}
    for causal in (False, True):
        model = Attention()
        model.causal = causal
        costs = profile(capture(model, (q, q.clone(), q.clone())), device="h100", progress=False,
                        compiled=compiled, dtype=torch.bfloat16)
        times[causal] = next(c for n, c in costs.nodes.items() if "attention" in n)
    speedup = get_device_spec("h100").causal_attention_speedup
    assert speedup > 1
    assert times[True].fwd_time_s < times[False].fwd_time_s
    assert times[True].fwd_flops == times[False].fwd_flops  # counted alike, run faster


class BroadcastBias(nn.Module):
    """A bias computed once, (1, H, L, L), broadcast over the batch into each layer's scores (T5's)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 3):
        super().__init__()
        self.bias = nn.Linear(d, heads)
        self.layers = layers

    def forward(self, x, rel):  # x: (B, L, d); rel: (L, L, d)
        b = self.bias(rel).permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)
        out = x.new_zeros(())
        for i in range(self.layers):
            scores = torch.where(x[:, None, :, :1] > 0.1 * i, b, 0.0)  # (B, H, L, L), a mask per layer
            out = out + scores.softmax(-1).sum()
        return out


def test_a_broadcast_activation_s_gradient_is_a_reduction_of_its_own(monkeypatch):
    """The backward of a light node that broadcast an activation over outer dims sums the gradient back
    to its shape: a kernel of its own (inductor's bias-gradient kernel in t5-base's backward)."""
    import partitioner.cost_models.fusion as fusion
    model, x, rel = BroadcastBias(), torch.randn(2, 32, 64), torch.randn(32, 32, 64)
    captured = capture(model, (x, rel))
    wheres = [n.name for n in captured.graph_module.graph.nodes if "where" in str(n.target)]
    assert len(wheres) == 3
    spec = get_device_spec("h100")
    with_it = profile(captured, device=spec, progress=False, compiled=True)
    monkeypatch.setattr(fusion, "broadcast_grad", lambda *a: False)
    without = profile(captured, device=spec, progress=False, compiled=True)
    b, h, l = 2, 4, 32
    grad_bytes = 4 * (b * h * l * l + h * l * l)  # fp32: read the (B, H, L, L) gradient, write (1, H, L, L)
    for name in wheres:  # one more launch, and the reduction's bytes
        extra = with_it.nodes[name].bwd_time_s - without.nodes[name].bwd_time_s
        assert extra == pytest.approx(grad_bytes / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
                                      + spec.per_kernel_s, rel=1e-6)
        assert (with_it.nodes[name].host_bwd_time_s - without.nodes[name].host_bwd_time_s
                == pytest.approx(spec.compiled_launch_overhead_s))


class CatOuter(nn.Module):
    """An activation concatenated along the batch: a larger output, not a broadcast."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        return torch.cat([h, h * 2]).softmax(-1).sum()


def test_a_larger_output_that_is_not_a_broadcast_adds_no_reduction(monkeypatch):
    """A cat along an outer dim makes a larger output from an activation, but its backward slices
    the gradient: no reduction kernel is added."""
    import partitioner.cost_models.fusion as fusion
    captured = capture(CatOuter(), (torch.randn(2, 32, 64),))
    cats = [n.name for n in captured.graph_module.graph.nodes if "cat" in str(n.target)]
    assert cats
    spec = get_device_spec("h100")
    with_it = profile(captured, device=spec, progress=False, compiled=True)
    monkeypatch.setattr(fusion, "broadcast_grad", lambda *a: False)
    without = profile(captured, device=spec, progress=False, compiled=True)
    assert all(with_it.nodes[n] == without.nodes[n] for n in cats)


class Norms(nn.Module):
    """A residual add, a layer norm and an RMSNorm-style scale by a parameter, between linears."""

    def __init__(self, d: int = 64, cast: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.scale = nn.Parameter(torch.ones(d))
        self.cast = cast

    def forward(self, x):
        h = self.a(x) + x
        scale = self.scale.double().float() if self.cast else self.scale  # casts, as mixed precision's
        return self.b(self.norm(h) * scale + h).sum()


@pytest.mark.parametrize("cast", [False, True])
def test_a_broadcast_parameter_s_gradient_is_a_split_reduction_of_its_own(monkeypatch, cast):
    """The weight gradient of a light node that broadcasts a trainable parameter over the rows (a
    norm's weight and bias, `x * weight`) is a reduction inductor runs apart, in two launches
    (partial sums, then their sum), reading the output's gradient and the full-size inputs; also
    where the parameter reaches the node through casts."""
    import partitioner.cost_models.fusion as fusion
    b, l, d = 2, 32, 64
    captured = capture(Norms(d, cast), (torch.randn(b, l, d),))
    nodes = {str(n.target): n.name for n in captured.graph_module.graph.nodes}
    norm, mul = nodes["aten.layer_norm.default"], nodes["aten.mul.Tensor"]
    adds = [n.name for n in captured.graph_module.graph.nodes if str(n.target) == "aten.add.Tensor"]
    spec = get_device_spec("h100")
    with_it = profile(captured, device=spec, progress=False, compiled=True)
    monkeypatch.setattr(fusion, "parameter_grad_bytes", lambda *a: 0)
    without = profile(captured, device=spec, progress=False, compiled=True)
    bw = spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency
    full = 4 * b * l * d  # one fp32 activation
    for name in (norm, mul):  # the gradient and the one full-size input (h; norm(h))
        extra = with_it.nodes[name].bwd_time_s - without.nodes[name].bwd_time_s
        assert extra == pytest.approx(2 * full / bw + 2 * spec.per_kernel_s, rel=1e-6)
        assert (with_it.nodes[name].host_bwd_time_s - without.nodes[name].host_bwd_time_s
                == pytest.approx(2 * spec.compiled_launch_overhead_s))
    for name in adds:  # adds of activations only
        assert with_it.nodes[name] == without.nodes[name]


class RepeatedMask(nn.Module):
    """The same where(mask, bias, min) in every layer, as T5 masks its position bias."""

    def __init__(self, d: int = 64, layers: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.layers = layers

    def forward(self, x, bias):
        h = self.lin(x)
        for _ in range(self.layers):
            masked = torch.where(x > 0, bias, -1e4)
            h = self.lin(h + masked)
        return h.sum()


def test_a_repeated_light_node_is_computed_once():
    """Inductor's common-subexpression elimination runs a repeated pure op once: the first costs what
    it costs, its repeats nothing; a random op (dropout) is never a repeat."""
    from partitioner.cost_models.fusion import repeats
    captured = capture(RepeatedMask(), (torch.randn(4, 64), torch.randn(4, 64)))
    gm = captured.graph_module
    wheres = [n.name for n in gm.graph.nodes if "where" in str(n.target)]
    assert len(wheres) == 3
    costs = profile(captured, device="h100", progress=False, compiled=True)
    first, *rest = wheres
    assert costs.nodes[first].fwd_time_s > 0
    assert all(costs.nodes[n].fwd_time_s == costs.nodes[n].bwd_time_s == 0 for n in rest)
    light = {n.name for n in gm.graph.nodes if n.op == "call_function"}
    from partitioner.cost_models.flops import trace_nodes
    repeated = {n: r.name for n, r in repeats(gm, light, trace_nodes(gm)).items() if n in wheres}
    assert repeated == {n: first for n in rest}

    class Drop(nn.Module):
        def forward(self, x):
            return (nn.functional.dropout(x, 0.5) + nn.functional.dropout(x, 0.5)).sum()
    gm = capture(Drop(), (torch.randn(4, 64),)).graph_module
    traces = trace_nodes(gm)
    drops = [n.name for n in gm.graph.nodes if "dropout" in str(n.target)]
    assert len(drops) == 2 and not set(drops) & set(repeats(gm, set(traces), traces))

    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            y.add_(1)  # the same call on the same input, but it writes again
            return y.sum()
    gm = capture(InPlace(), (torch.randn(4, 64),)).graph_module
    traces = trace_nodes(gm)
    adds = [n.name for n in gm.graph.nodes if "add_" in str(n.target)]
    assert len(adds) == 2 and not set(adds) & set(repeats(gm, set(traces), traces))


class SplitQKV(nn.Module):
    """GPT-2's fused projection split three ways: read by a matmul each (attention), or by pointwise ops."""

    def __init__(self, d: int = 256, heavy_readers: bool = True):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.heavy_readers = heavy_readers

    def forward(self, x):
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        h = (q @ k.transpose(-1, -2)) @ v if self.heavy_readers else q * k + v
        return self.out(h)


@pytest.mark.parametrize("heavy_readers", [True, False])
def test_a_split_s_backward_copies_gradients_that_library_kernels_made(heavy_readers):
    """The split writes no kernel forward; backward, its `cat` of the three gradients runs as a kernel of
    its own where matmuls made them (a 9.5 us kernel a layer in gpt2-xl), and inside the pointwise
    gradient kernels that write them otherwise."""
    x = torch.randn(4, 64, 256)
    costs = costs_of(SplitQKV(heavy_readers=heavy_readers), x, True)
    split = next(c for n, c in costs.nodes.items() if n.startswith("split"))
    assert split.fwd_time_s == 0.0 and split.host_fwd_time_s == 0.0
    if heavy_readers:
        spec = get_device_spec("h100")
        moved = 2 * 4 * 64 * 3 * 256 * 4  # reads the three gradients, writes the input's
        assert split.bwd_time_s == pytest.approx(moved / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
                                                 + spec.per_kernel_s)
        assert split.host_bwd_time_s == spec.compiled_launch_overhead_s
    else:
        assert split.bwd_time_s == 0.0
