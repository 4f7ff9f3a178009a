"""A model's `torch.no_grad()` and `torch.autocast(...)` regions, carried into the captured graph.

The stages run as one flat graph, with gradients on and without autocast, so what a region
changes must become ops of the graph. torch.export wraps regions into higher-order ops
(wrap_with_set_grad_enabled, wrap_with_autocast): inline_region_ops inlines them, detaching
what a grad-disabled region reads and returns, and tracing an autocast region again under its
autocast so that its casts are ops (_autocast_applied). export drops a no_grad region nested in an
autocast region (torch 2.5-2.13): grad_off_in_autocast_recorded names where a model does so, and
capture refuses it. symbolic_trace records a region's ops as any others: RegionMarkingTracer marks
them and regions_applied detaches what a grad-disabled op computes, and refuses an autocast region.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx

from partitioner.errors import CaptureError
from partitioner.passes.capture_errors import ModuleTracker
from partitioner.passes.graph_nodes import fake_mode_of, get_attr, module_named, mutates, provenance, written_values

AUTOCAST_DEVICES = ("cpu", "cuda")


def inline_region_ops(gm: torch.fx.GraphModule,
                       kinds: tuple[str, ...] = ("wrap_with_autocast", "wrap_with_set_grad_enabled")) -> None:
    """Inline the subgraphs of export's region HOPs (wrap_with_autocast, wrap_with_set_grad_enabled).

    export wraps `with torch.autocast(...)` / `with torch.no_grad()` regions (HF Llama's rotary
    embedding on CUDA) into higher-order ops whose body is a submodule; later passes want one
    flat graph. The stages do not run under autocast, so a region that turns autocast off inlines
    as it is, and one that turns it on is traced again under it first (_autocast_applied: its
    casts become ops of the graph); the inputs it reads and the outputs of a grad-disabled region
    are detached, which keeps autograd's semantics. `kinds`: the HOPs to inline (default both).
    """
    hops = {getattr(torch.ops.higher_order, n) for n in kinds if hasattr(torch.ops.higher_order, n)}
    changed, inlined = True, False
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in hops:
                continue
            i, sub = next((i, get_attr(gm, a.target)) for i, a in enumerate(node.args)
                          if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                          and isinstance(get_attr(gm, a.target), torch.fx.GraphModule))
            grad_off = node.target.__name__ == "wrap_with_set_grad_enabled" and not node.args[0]
            if node.target.__name__ == "wrap_with_autocast" and node.args[2]:  # (device, dtype, enabled, cache, ...)
                sub = _autocast_applied(sub, node.args[0], node.args[1], node.args[i + 1:])
            sub_ph = [n for n in sub.graph.nodes if n.op == "placeholder"]
            val_map = dict(zip(sub_ph, node.args[i + 1:]))
            stack = node.meta.get("nn_module_stack")
            with gm.graph.inserting_before(node):
                if grad_off:  # what the region reads is detached too: its ops run with grad on now, and an
                    # out= op on a parameter's value (spectral_norm's power iteration) refuses inputs that
                    # require grad. What it writes stays as it is, for the writes to be seen (mutates).
                    written = {w for sn in sub.graph.nodes if mutates(sn) for w in written_values(sn)}
                    for ph in sub_ph:
                        outer = val_map[ph]
                        if ph not in written and isinstance(outer, torch.fx.Node) and isinstance(
                                outer.meta.get("val"), torch.Tensor):
                            d = gm.graph.call_function(torch.ops.aten.detach.default, (outer,))
                            d.meta = {**outer.meta, "val": outer.meta["val"].detach()}
                            val_map[ph] = d
                for sn in sub.graph.nodes:
                    if sn.op in ("placeholder", "output"):
                        continue
                    if sn.op == "get_attr":  # a nested region's body, an attribute of `sub`: now one of gm's
                        name = _free_attr_name(gm, str(sn.target))
                        setattr(gm, name, get_attr(sub, str(sn.target)))
                        val_map[sn] = gm.graph.get_attr(name)
                        val_map[sn].meta = dict(sn.meta)
                        continue
                    new = gm.graph.node_copy(sn, lambda n: val_map[n])
                    if stack and not new.meta.get("nn_module_stack"):
                        new.meta["nn_module_stack"] = dict(stack)
                    val_map[sn] = new
                out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                results = []
                for o in outs:
                    r = val_map[o] if isinstance(o, torch.fx.Node) else o
                    if grad_off and isinstance(r, torch.fx.Node):
                        d = gm.graph.call_function(torch.ops.aten.detach.default, (r,))
                        d.meta = {**r.meta, "val": r.meta["val"].detach() if hasattr(r.meta.get("val"), "detach")
                                  else r.meta.get("val")}
                        r = d
                    results.append(r)
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(results[user.args[1]])
                    gm.graph.erase_node(user)
            if node.users:  # used as a whole: not produced by export, refuse loudly
                raise CaptureError(f"internal: cannot inline {node.target} at node '{node.name}'; please report this model.")
            attr = node.args[i]
            gm.graph.erase_node(node)
            if not attr.users:
                gm.graph.erase_node(attr)
            changed = inlined = True
    if inlined:
        gm.graph.lint()
        gm.recompile()


def _free_attr_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, k = base.replace(".", "_"), 0
    while hasattr(gm, name):
        k += 1
        name = f"{base.replace('.', '_')}_{k}"
    return name


def _autocast_applied(sub: torch.fx.GraphModule, device_type: str, dtype: torch.dtype | None,
                      inputs: tuple) -> torch.fx.GraphModule:
    """The body of a `with torch.autocast(device_type, dtype):` region traced again under that autocast
    (make_fx on the FakeTensors it reads), so that the casts autocast makes at each op are ops of the
    graph; each op keeps its module path. Its grad-disabled regions are inlined first (their detaches
    traced as ops); a region inside that turns autocast off runs under make_fx as the model ran it."""
    from torch.fx import traceback as fx_traceback  # lazy, as dynamo's modules are
    from torch.fx.experimental.proxy_tensor import make_fx
    inline_region_ops(sub, ("wrap_with_set_grad_enabled",))
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in inputs]
    fake = next((v for v in vals if getattr(v, "fake_mode", None) is not None), None)
    dtype = dtype or torch.get_autocast_dtype(device_type)
    with fake_mode_of(fake), torch.autocast(device_type, dtype), fx_traceback.preserve_node_meta():
        traced = make_fx(torch.fx.Interpreter(sub).run)(*vals)
    traced.graph.eliminate_dead_code()  # the detaches make_fx records for autograd's saved values
    return traced


@contextlib.contextmanager
def grad_off_in_autocast_recorded(tracker: ModuleTracker, found: list[str]):
    """Around torch.export: names the module where the model turns gradients off inside an autocast region
    it entered (export splits such a region and drops the no_grad, torch 2.5-2.13), into `found`.
    torch.no_grad and the set_grad_enabled decorator both go through set_grad_enabled's __init__, which is
    wrapped; torch._C._set_grad_enabled is not (export recognises the regions by that function)."""
    grad_mode = torch.autograd.grad_mode.set_grad_enabled
    original = grad_mode.__init__
    at_start = {d: torch.is_autocast_enabled(d) for d in AUTOCAST_DEVICES}

    def init(self, mode: bool) -> None:
        if not mode and torch.is_grad_enabled() and any(
                torch.is_autocast_enabled(d) and not at_start[d] for d in AUTOCAST_DEVICES):
            name, typ, _ = tracker.stack[-1] if tracker.stack else ("", "", ())
            found.append(f"module '{name}' ({typ})" if name else "the model's forward")
        original(self, mode)

    grad_mode.__init__ = init
    try:
        yield
    finally:
        grad_mode.__init__ = original


class RegionMarkingTracer(torch.fx.Tracer):
    """A symbolic_trace tracer that marks the ops a model's regions change.

    symbolic_trace runs a model's `with torch.no_grad():` / `torch.autocast(...)` regions as Python
    but records their ops as any others: the graph would compute gradients where the model has none
    and skip autocast's casts, silently. So each op records the grad mode and autocast it was traced
    under (meta "grad_disabled" / "autocast", against the modes tracing started in), for
    regions_applied."""

    def trace(self, root, concrete_args=None):
        self._grad_at_start = torch.is_grad_enabled()
        self._autocast_at_start = {d: torch.is_autocast_enabled(d) for d in AUTOCAST_DEVICES}
        return super().trace(root, concrete_args)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind in ("call_function", "call_method"):
            if self._grad_at_start and not torch.is_grad_enabled():
                proxy.node.meta["grad_disabled"] = True
            on = [d for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d) and not self._autocast_at_start[d]]
            if on:
                proxy.node.meta["autocast"] = (on[0], torch.get_autocast_dtype(on[0]))
        return proxy


def regions_applied(gm: torch.fx.GraphModule) -> None:
    """What a symbolic_trace graph's grad-disabled regions mean, applied: each tensor an op computed
    under no_grad is detached (no gradient flows through it, as in the model). An op traced under
    autocast is refused: its casts cannot be recovered from symbolic_trace's graph."""
    for node in list(gm.graph.nodes):
        if "autocast" in node.meta:
            device, dtype = node.meta["autocast"]
            raise RuntimeError(
                f"{module_named(node)} runs under torch.autocast({device!r}, {dtype}), which symbolic_trace does "
                "not record (its ops would run uncast); make torch.export work on the model (the error above), "
                "or drop the autocast region and pass mixed_precision='bf16' to compile_parallel")
        if not node.meta.get("grad_disabled") or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        with gm.graph.inserting_after(node):
            d = gm.graph.call_method("detach", (node,))
        d.meta = {**provenance(node), "val": node.meta["val"].detach()}
        node.replace_all_uses_with(d, delete_user_cb=lambda user: user is not d)
    gm.graph.lint()
    gm.recompile()
