import pytest
import torch
from torch import nn

from partitioner.errors import CaptureError
from partitioner import zoo
from partitioner.passes import capture as capture_mod
from partitioner.passes.capture import capture

FAMILIES = ["mlp", "cnn", "gpt2", "llama-8b", "bert-base", "t5-base"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check_conventions(c, model):
    gm = c.graph_module
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in phs] == c.input_names
    canonical = c.canonical_fqn()
    fqns = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    for n in gm.graph.nodes:
        assert n.op != "call_module"
        if n.op == "get_attr":
            assert n.target in fqns and canonical.get(n.target, n.target) == n.target
        if n.op != "output":
            assert "val" in n.meta, n.name
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert isinstance(out.args[0], (tuple, list))


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_equals_model(small_zoo, name):
    zm = small_zoo(name)
    c = capture(zm.model, zm.example_args, zm.example_kwargs)
    assert c.method == "export"
    _check_conventions(c, zm.model)
    flat = c.flatten_inputs(zm.example_args, zm.example_kwargs)
    with torch.no_grad():
        got = c.unflatten_outputs(c.graph_module(*flat))
        ref = zm.model(*zm.example_args, **zm.example_kwargs)
    assert type(got) is type(ref)
    got_leaves, ref_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)
    assert len(got_leaves) == len(ref_leaves)
    for g, r in zip(got_leaves, ref_leaves):
        assert g.shape == r.shape and _rel_err(g, r) < 1e-6
    assert torch.allclose(zm.loss_fn(got, zm.target), zm.loss_fn(ref, zm.target), rtol=1e-6)


def test_graph_shares_parameters_and_gradients(small_zoo):
    zm = small_zoo("gpt2")
    c = capture(zm.model, zm.example_args)
    params = dict(zm.model.named_parameters())
    for n in c.graph_module.graph.nodes:
        if n.op == "get_attr" and n.target in params:
            assert c.graph_module.get_parameter(n.target) is params[n.target]
    zm.model.zero_grad()
    zm.loss_fn(c.unflatten_outputs(c.graph_module(*c.flatten_inputs(zm.example_args))), zm.target).backward()
    g_graph = {k: p.grad.clone() for k, p in params.items()}
    zm.model.zero_grad()
    zm.loss_fn(zm.model(*zm.example_args), zm.target).backward()
    for k, p in params.items():
        assert _rel_err(g_graph[k], p.grad) < 1e-5, k
    zm.model.zero_grad(set_to_none=True)


def test_tied_weights_gpt2_and_t5(small_zoo):
    c = capture(small_zoo("gpt2").model, small_zoo("gpt2").example_args)
    assert c.tied == [["transformer.wte.weight", "lm_head.weight"]]
    zm = small_zoo("t5-base")
    c = capture(zm.model, zm.example_args, zm.example_kwargs)
    assert c.tied == [["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]]
    targets = [n.target for n in c.graph_module.graph.nodes if n.op == "get_attr"]
    assert "shared.weight" in targets and "lm_head.weight" not in targets
    assert len(targets) == len(set(targets))


def test_capture_on_meta_allocates_nothing():
    zm = zoo.build("llama-8b", small=True, device="meta")
    c = capture(zm.model, zm.example_args)
    gm = c.graph_module
    assert all(t.is_meta for t in list(gm.parameters()) + list(gm.buffers()))
    logits = next(n for n in gm.graph.nodes if n.op == "output").args[0][0].meta["val"]
    assert tuple(logits.shape) == (8, 16, 100)


def test_non_tensor_kwargs_are_baked_in_and_checked(small_zoo):
    zm = small_zoo("gpt2")
    c = capture(zm.model, zm.example_args, {"use_cache": False})
    assert c.input_names == ["input_ids"] and c.const_inputs == {1: False}
    assert len(c.flatten_inputs(zm.example_args, {"use_cache": False})) == 1
    with pytest.raises(CaptureError, match="input 'use_cache' is True but the graph was captured with False baked in"):
        c.flatten_inputs(zm.example_args, {"use_cache": True})
    with pytest.raises(CaptureError, match="calling convention"):
        c.flatten_inputs(zm.example_args, {})


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, batch, scale=None):
        h = self.a(batch["x"]) * scale
        return {"y": self.b(h), "pair": (h, batch["z"] + 1)}


class _TwoKwargs(nn.Module):
    def forward(self, x, a=None, b=None):
        return x + 2 * a + 3 * b


def test_kwargs_follow_capture_order_and_any_call_order_works():
    m, x, a, b = _TwoKwargs(), torch.ones(2), torch.full((2,), 10.0), torch.full((2,), 100.0)
    c = capture(m, (x,), {"b": b, "a": a})
    assert c.input_names == ["x", "b", "a"]
    for kwargs in ({"b": b, "a": a}, {"a": a, "b": b}):
        (got,) = c.graph_module(*c.flatten_inputs((x,), kwargs))
        torch.testing.assert_close(got, m(x, a=a, b=b))


def test_nested_inputs_and_outputs_round_trip():
    m = _DictModel()
    args = ({"x": torch.randn(2, 4), "z": torch.randn(3)},)
    kwargs = {"scale": torch.tensor(2.0)}
    c = capture(m, args, kwargs)
    assert len(c.input_names) == 3
    got = c.unflatten_outputs(c.graph_module(*c.flatten_inputs(args, kwargs)))
    ref = m(*args, **kwargs)
    assert set(got) == {"y", "pair"}
    torch.testing.assert_close(got["y"], ref["y"])
    torch.testing.assert_close(got["pair"][1], ref["pair"][1])


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x):
        return self.inner(x)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


def test_data_dependent_control_flow_is_named():
    with pytest.raises(CaptureError) as e:
        capture(_DataDependent(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "data-dependent" in msg and "'inner'" in msg and "_Branchy" in msg
    assert "at test_capture.py:" in msg and "(`if x.sum() > 0:`)" in msg  # the model's own line


class _Asserting(nn.Module):
    """Checks its input's values with an assert, as ProphetNet checks the labels it shifts."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        assert (x > -1e9).all().item(), "finite inputs"
        return self.lin(x)


@pytest.mark.timeout(120)
def test_a_data_dependent_assert_says_python_O_drops_it():
    """The hint is true: under -O the same model captures."""
    import subprocess
    import sys
    with pytest.raises(CaptureError, match=r"\(`assert \(x > -1e9\).*The line is an assert.*run Python with -O"):
        capture(_Asserting(), (torch.randn(2, 4),))
    code = ("import torch, test_capture\n"
            "print(test_capture.capture(test_capture._Asserting(), (torch.randn(2, 4),)).method)\n")
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=100, env=env)
    assert run.returncode == 0 and run.stdout.split()[-1] == "export", run.stderr[-2000:]


def test_wrong_input_shape_names_the_input():
    zm = zoo.build("mlp", small=True, batch=2)
    with pytest.raises(CaptureError) as e:
        capture(zm.model, (torch.randn(2, 5),))
    msg = str(e.value)
    assert "'x'" in msg and "(2, 5)" in msg and "layers.0" in msg


def test_wrong_input_dtype_names_the_input():
    zm = zoo.build("gpt2", small=True, batch=2)
    with pytest.raises(CaptureError) as e:
        capture(zm.model, (torch.randn(2, 8),))
    assert "input_ids" in str(e.value) and "float32" in str(e.value)


def test_hf_cache_output_says_use_cache_false():
    """use_cache=True passed as an input is the caller's (a config's use_cache=True is captured without the
    cache, tests/test_hf_call_patterns.py): the cache in the output is refused, naming use_cache=False."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, use_cache=True)
    with pytest.raises(CaptureError, match="DynamicCache.*pass use_cache=False or leave it out"):
        capture(transformers.GPT2LMHeadModel(cfg), (torch.randint(0, 50, (1, 4)),), {"use_cache": True})


def test_symbolic_trace_fallback(monkeypatch, small_zoo):
    def broken_export(*a, **k):
        raise RuntimeError("export unavailable")
    monkeypatch.setattr(capture_mod, "_export", broken_export)
    for name in ("mlp", "cnn"):
        zm = small_zoo(name)
        c = capture(zm.model, zm.example_args)
        assert c.method == "symbolic_trace"
        _check_conventions(c, zm.model)
        with torch.no_grad():
            got = c.unflatten_outputs(c.graph_module(*c.flatten_inputs(zm.example_args)))
            assert _rel_err(got, zm.model(*zm.example_args)) < 1e-6
        stacks = [n.meta.get("nn_module_stack") for n in c.graph_module.graph.nodes if n.op == "call_function"]
        assert any(s and list(s.values())[-1][0].startswith(("layers.", "blocks.")) for s in stacks)


def test_a_failed_export_leaves_the_models_running_statistics_and_random_state(monkeypatch):
    """After torch.export fails, the model runs once on the example inputs (to name a bad input): that
    run must not move a batch norm's running statistics or draw from torch's generator."""
    def broken_export(*a, **k):
        raise RuntimeError("export unavailable")
    monkeypatch.setattr(capture_mod, "_export", broken_export)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    x = torch.randn(8, 4) + 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(CaptureError):  # symbolic_trace cannot trace BatchNorm1d's input check either
        capture(model, (x,))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_both_tracers_failing_names_both(monkeypatch):
    monkeypatch.setattr(capture_mod, "_export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))

    class Weird(nn.Module):
        def forward(self, x):
            return torch.tensor(x.shape[0] + len(str(x)))  # str() of a proxy cannot be traced

    with pytest.raises(CaptureError, match="torch.export failed.*symbolic_trace failed"):
        capture(Weird(), (torch.randn(2),))


class _RegionModel(torch.nn.Module):
    """autocast / no_grad regions, which torch.export wraps into higher-order ops on CUDA."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        with torch.autocast("cpu", enabled=False):
            y = h.float().sin() * 2
        with torch.no_grad():
            z = h * 3
        return self.b(y + z)


def test_autocast_and_no_grad_regions_are_inlined_with_same_grads():
    from partitioner.passes.capture import capture
    torch.manual_seed(0)
    m, x = _RegionModel(), torch.randn(2, 8)
    c = capture(m, (x,))
    targets = {str(n.target) for n in c.graph_module.graph.nodes}
    assert not any("wrap_with" in t for t in targets)
    out = c.unflatten_outputs(c.graph_module(*c.flatten_inputs((x,))))
    out.sum().backward()
    got = m.a.weight.grad.clone()
    m.zero_grad()
    ref = m(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, m.a.weight.grad, rtol=1e-6, atol=0)


def test_symbolic_trace_fallback_keeps_no_grad_regions_and_refuses_autocast(monkeypatch):
    """symbolic_trace runs `with torch.no_grad():` as Python and records its ops as any others: without
    the regions applied, gradients would flow where the model has none (a.weight through `z`)."""
    monkeypatch.setattr(capture_mod, "_export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no export")))
    torch.manual_seed(0)
    m, x = _RegionModel(), torch.randn(2, 8)
    c = capture(m, (x,))
    assert c.method == "symbolic_trace"
    out = c.unflatten_outputs(c.graph_module(*c.flatten_inputs((x,))))
    out.sum().backward()
    got = m.a.weight.grad.clone()
    m.zero_grad()
    m(x).sum().backward()
    torch.testing.assert_close(got, m.a.weight.grad, rtol=1e-6, atol=0)

    class Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            with torch.autocast("cpu", torch.bfloat16):
                return self.proj(x).float()

    with pytest.raises(CaptureError, match=r"Linear \(proj\) runs under torch.autocast\('cpu', torch.bfloat16\)"):
        capture(Autocast(), (x,))


def test_no_grad_inside_an_autocast_region_is_refused_by_name():
    """torch.export splits an autocast region around a no_grad region inside it and drops the no_grad
    (torch 2.5-2.13): the captured ops would get gradients the model's do not. Refused, naming the module."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, h):
            with torch.no_grad():
                g = self.b(h)
            return self.a(h) * g

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            with torch.autocast("cpu", torch.bfloat16):
                return self.gate(x).float()

    with pytest.raises(CaptureError, match=r"module 'gate' \(Gate\) turns gradients off .* inside a torch.autocast"):
        capture(Model(), (torch.randn(2, 8),))


def _graph_equals_eager(c, m: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The captured graph's output equals the module's on x; the parameters' gradients of the graph's
    output summed (the module's own are left in .grad, to compare against)."""
    out = c.unflatten_outputs(c.graph_module(*c.flatten_inputs((x,))))
    out.sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = m(x)
    ref.sum().backward()
    assert torch.equal(out, ref)
    return got


class _Bf16Region(torch.nn.Module):
    """An fp32 model that turns autocast on around one block, which turns it off inside."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", torch.bfloat16):
            h = torch.relu(self.b(h))
            with torch.autocast("cpu", enabled=False):
                h = torch.nn.functional.normalize(h.float(), dim=-1) + self.c(h.float())
            h = self.b(h) * self.c(h).abs().mean()
        return self.head(h.float())


def test_a_region_under_autocast_computes_in_its_dtype():
    """The ops of a `with torch.autocast(..., bfloat16):` region run in bf16 in the graph, as in the model,
    with nested regions kept (they ran in fp32, autocast dropped when the region was inlined)."""
    from partitioner.passes.capture import capture
    torch.manual_seed(0)
    m, x = _Bf16Region(), torch.randn(4, 8)
    c = capture(m, (x,))
    assert not any("wrap_with" in str(n.target) for n in c.graph_module.graph.nodes)
    mms = [n for n in c.graph_module.graph.nodes if n.op == "call_function"
           and getattr(n.target, "overloadpacket", None) in (torch.ops.aten.linear, torch.ops.aten.addmm)]
    assert [n.meta["val"].dtype for n in mms] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16,
                                                  torch.bfloat16, torch.float32]
    assert mms[1].meta["nn_module_stack"] and list(mms[1].meta["nn_module_stack"].values())[-1][0] == "b"
    got = _graph_equals_eager(c, m, x)
    for n, p in m.named_parameters():  # b's weight is cast once per use, where eager autocast caches one cast
        torch.testing.assert_close(got[n], p.grad, rtol=1e-2, atol=1e-2 * p.grad.abs().max().item())


class _NestedRegions(torch.nn.Module):
    """A no_grad region around an autocast region: export nests the second's body in the first's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            s = self.b(h)
            with torch.autocast("cpu", torch.bfloat16):
                s = self.b(s).float()
        return self.a(h * s.mean())


@pytest.mark.timeout(60)
def test_nested_regions_are_inlined():
    """The inner region's body is an attribute of the outer's: inlining it named gm's attribute of that
    name instead (its own region again), and capture inlined it forever."""
    from partitioner.passes.capture import capture
    torch.manual_seed(0)
    m, x = _NestedRegions(), torch.randn(4, 8)
    c = capture(m, (x,))
    assert c.method == "export" and not any("wrap_with" in str(n.target) for n in c.graph_module.graph.nodes)
    out = c.unflatten_outputs(c.graph_module(*c.flatten_inputs((x,))))
    out.sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    ref = m(x)
    ref.sum().backward()
    assert torch.equal(out, ref)
    assert set(got) == {"a.weight", "a.bias"} and all(torch.equal(got[n], p.grad) for n, p in m.a.named_parameters(
        prefix="a"))


class _ConvertsItself(torch.nn.Module):
    """Converts a submodule to the dtype it already has in forward, as SwitchTransformers' router does
    (`self.classifier = self.classifier.to(self.dtype)`), then calls a function symbolic_trace cannot
    (torch.finfo of a proxy's dtype), so only export captures it."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        self.lin = self.lin.to(torch.float32)
        self.out.float()
        h = torch.relu(self.lin(x)).clamp(max=torch.finfo(x.dtype).max)
        return self.out(h)


@pytest.mark.timeout(60)
def test_a_conversion_that_changes_nothing_is_traced_as_a_no_op():
    """Module.to() on export's FakeTensor parameters swapped them even when nothing changed and the swap
    failed ("_apply(): Couldn't swap Linear.weight"); a no-op now, and the parameters keep their gradients."""
    torch.manual_seed(0)
    m, x = _ConvertsItself(), torch.randn(4, 8)
    c = capture(m, (x,))
    assert c.method == "export"
    got = _graph_equals_eager(c, m, x)
    assert all(torch.equal(got[n], p.grad) for n, p in m.named_parameters())


class _VmappedLookup(torch.nn.Module):
    """A mask from lookups into an input, vmapped over query and key positions, as Hugging Face's
    masking_utils builds Gemma3's bidirectional image-token mask: export calls the lookups through
    flat_apply, whose TreeSpecs the graph loads as plain attributes (get_attr of no tensor)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, types):
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
        positions = torch.arange(x.shape[1])
        with TransformGetItemToIndex():
            same = torch.vmap(torch.vmap(lambda q, k: types[0, q] == types[0, k], in_dims=(None, 0)),
                              in_dims=(0, None))(positions, positions)
        return self.lin(x) * same.float().sum(-1, keepdim=True)


@pytest.mark.timeout(60)
def test_attributes_that_are_not_tensors_are_kept():
    """The unlifted module copied parameters, buffers, constants and subgraphs but not the TreeSpecs
    (AttributeError: 'Module' object has no attribute 'torch__dynamo__trace_wrapped_higher_order_op_ModIndex0')."""
    torch.manual_seed(0)
    m, x, types = _VmappedLookup(), torch.randn(2, 4, 8), torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    c = capture(m, (x, types))
    assert c.method == "export"
    got = c.unflatten_outputs(c.graph_module(*c.flatten_inputs((x, types))))
    torch.testing.assert_close(got, m(x, types))


class _StatefulModel(nn.Module):
    """Every kind of state export lifts: parameters (one tied), buffers written in place (persistent and
    not), a tensor constant, and an input written in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("steps", torch.zeros(1))
        self.register_buffer("scale", torch.ones(4), persistent=False)
        self.const = torch.arange(4.0)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.lin.weight

    def forward(self, x, y):
        self.steps.add_(1)
        y.mul_(2)
        h = self.norm(self.lin(x)) * self.scale + self.const
        return {"out": self.head(h) + y, "steps": self.steps * 1}


def _graph_facts(c):
    gm = c.graph_module
    nodes = [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), sorted(set(n.meta) - {"from_node"}),
              n.meta.get("nn_module_stack"), str(getattr(n.meta.get("val"), "shape", n.meta.get("val"))))
             for n in gm.graph.nodes]
    return (gm.code, nodes, [(k, id(p)) for k, p in gm.named_parameters(remove_duplicate=False)],
            list(gm.state_dict(keep_vars=True)), [k for k, _ in gm.named_buffers()], [k for k, _ in gm.named_modules()],
            c.input_names, c.tied, str(c.out_spec))


@pytest.mark.parametrize("name", ["stateful", "gpt2", "t5-base"])
def test_unlifting_matches_torch(monkeypatch, small_zoo, name):
    """capture unlifts export's graph itself (passes/capture.py _unlift): the same graph, node names,
    attributes and buffers as through torch's ep.module()."""
    if name == "stateful":
        model, args, kwargs = _StatefulModel(), (torch.randn(3, 4), torch.randn(3, 4)), {}
    else:
        zm = small_zoo(name)
        model, args, kwargs = zm.model, zm.example_args, zm.example_kwargs
    ours = _graph_facts(capture(model, args, kwargs))
    monkeypatch.setattr(capture_mod, "_unlift", lambda ep: ep.module())
    assert ours == _graph_facts(capture(model, args, kwargs))


class _StraightThroughRound(torch.autograd.Function):
    """Rounds in forward; passes the gradient through unchanged (quantisation-aware training)."""

    @staticmethod
    def forward(ctx, x, offset, scale):  # offset: None here (a None argument is not a tensor's place)
        return (x * scale).round() / scale if offset is None else (x * scale + offset).round() / scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(_StraightThroughRound.apply(self.inner(x), None, 2.0))


@pytest.mark.parametrize("compile", [False, True])
def test_a_custom_autograd_function_runs_its_own_backward(compile):
    """Export traces an autograd.Function's forward and drops its backward: 'inner' got no gradient through
    round(), silently. The Function is kept whole (passes/autograd_functions.py): the pipeline's gradients
    are the model's, eager and compiled."""
    import copy
    import warnings

    from partitioner import compile_parallel
    torch.manual_seed(0)
    model, x, target = _Quantised(), torch.randn(8, 4) * 3, torch.randn(8, 2)
    loss_fn = nn.functional.mse_loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, example_target=target,
                              microbatches=2, compile=compile)
    loss = pm.train_step(x, target=target)
    want_loss = 0.0
    for xm, tm in zip(x.chunk(2), target.chunk(2)):
        mb = loss_fn(model(xm), tm) / 2
        mb.backward()
        want_loss += mb.item()
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    got = dict(pm.named_parameters())
    assert model.inner.weight.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-4 if compile else 1e-5, atol=1e-6, msg=n)


class _AppendsToAList(torch.autograd.Function):
    """Given a list it appends to: an effect an op cannot carry, so it is traced, and said."""

    @staticmethod
    def forward(ctx, x, seen):
        seen.append(1)
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradientReversal(torch.autograd.Function):
    """Domain adaptation's layer: the identity forward (a view of its input), the negated gradient back."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _ScaleInPlace(torch.autograd.Function):
    """Writes into its input (mark_dirty): not something an op may do, so traced, and said."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_a_gradient_reversal_layer_reverses_and_an_in_place_function_is_named():
    class Model(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.inner, self.head, self.fn = nn.Linear(4, 4), nn.Linear(4, 2), fn

        def forward(self, x):
            return self.head(self.fn.apply(torch.relu(self.inner(x))))

    torch.manual_seed(0)
    model, x = Model(_GradientReversal), torch.randn(4, 4)
    c = capture(model, (x,))
    c.unflatten_outputs(c.graph_module(*c.flatten_inputs((x,)))).sum().backward()
    got = model.inner.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(got, model.inner.weight.grad)
    with pytest.warns(RuntimeWarning, match=r"_ScaleInPlace .*writes into an input"):
        capture(Model(_ScaleInPlace), (x,))


def test_a_custom_function_given_a_list_is_traced_and_named_in_a_warning():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return _AppendsToAList.apply(self.inner(x), [])

    with pytest.warns(RuntimeWarning, match=r"Model applies torch.autograd.Function .*_AppendsToAList "
                                            r"\(in module '<root>'\).*its own backward does not run"):
        capture(Model(), (torch.randn(2, 4),))


def test_reentrant_checkpoint_is_not_named_as_a_custom_function():
    """Its Function is inlined (the same gradients): nothing to say."""
    import warnings

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.lin, x, use_reentrant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        capture(Checkpointed(), (torch.randn(2, 4),))
