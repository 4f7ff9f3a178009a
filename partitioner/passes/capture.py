"""Capture an nn.Module as one flat torch.fx graph.

torch.export (non-strict) first, torch.fx.symbolic_trace as fallback. Both run
on FakeTensors / meta tensors, so a 70B model is traced without allocating its
weights. The result is normalised to the calling convention of capture_io.py
(tensor inputs as flat placeholders, non-tensor ones baked in, a tied weight
loaded through its first FQN, a flat output tuple), and every node carries
meta["val"] (a FakeTensor or a python value).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from typing import Any, Iterator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from partitioner.dataclass_trees import outputs_registered, register_dataclasses
from partitioner.errors import CaptureError
from partitioner.passes.capture_errors import (ModuleTracker, capture_error, check_inputs_eagerly, first_line,
                                   is_data_dependent, model_name, packed_sequence_error)
from partitioner.passes.autograd_functions import kept_whole, warn_traced
from partitioner.passes.hooks import check_no_module_backward_hooks, tensor_hook_error, tensor_hooks_recorded
from partitioner.passes.capture_io import Captured, find_tied, input_leaf_names, normalise
from partitioner.passes.kv_cache import without_kv_cache
from partitioner.passes.module_kinds import check_traceable_modules
from partitioner.passes.python_state import python_state_watched, warn_python_state
from partitioner.passes.transformer_masks import causal_mask_detection_off
from partitioner.passes.graph_nodes import get_attr, mutates
from partitioner.passes.regions import (RegionMarkingTracer, grad_off_in_autocast_recorded, inline_region_ops,
                                       regions_applied)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _random_draws_checked(model: torch.nn.Module):
    """Around symbolic_trace: a draw from torch's default generators while tracing is said (the state is
    restored), and refused where the model skips layers at random.

    symbolic_trace records tensor ops on its proxies; a random draw that depends on no input (layerdrop's
    `torch.rand([]) < p`, noise of a fixed shape) runs once while tracing instead, and the graph replays
    that one draw every step: with layerdrop > 0 a layer skipped for good, a silent difference."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    before = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else [])
    yield
    after = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else [])
    if torch.equal(before[0], after[0]) and all(torch.equal(a, b) for a, b in zip(before[1], after[1])):
        return
    torch.set_rng_state(before[0])
    if cuda:
        torch.cuda.set_rng_state_all(before[1])
    from partitioner.passes.capture_errors import random_layer_skips  # lazy: it imports from here
    if random_layer_skips(None, model):
        raise RuntimeError("forward skips layers at random (layerdrop): traced, one draw would be replayed every step")
    warnings.warn(f"{model_name(model)}'s forward drew random numbers that depend on no input while it was traced "
                  "(torch.fx.symbolic_trace, after torch.export failed): the graph replays that one draw every "
                  "step. If it decides anything (layerdrop or stochastic depth above 0, noise of a fixed shape), "
                  "the pipeline differs from the model: make it 0, or draw with torch.rand_like on an input.",
                  RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def _distribution_checks_off() -> Iterator[None]:
    """Trace with torch.distributions' argument validation off (the default of `python -O`): it branches
    on tensor values (Normal's scale > 0, a probability vector's sum), which no graph can hold, so a VAE's
    rsample or a policy's Categorical would fail to capture as data-dependent control flow."""
    from torch.distributions import Distribution
    old = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(old)


@contextlib.contextmanager
def _noop_conversions_skipped() -> Iterator[None]:
    """Trace a Module.to() / .float() that changes nothing (SwitchTransformers' router runs
    `self.classifier = self.classifier.to(self.dtype)` in its forward) as the no-op it is in eager.

    Export holds the parameters as FakeTensors, which Module._apply swaps into new tensors even when the
    conversion returns the same tensor, and the swap fails ("_apply(): Couldn't swap Linear.weight"). The
    probe runs with proxy tracing off: traced, its aliases would replace the parameters in the graph."""
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
    apply = torch.nn.Module._apply

    def skip_noop(module: torch.nn.Module, fn, recurse: bool = True):
        with disable_proxy_modes_tracing():
            noop = all(fn(t) is t for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)))
        return module if noop else apply(module, fn, recurse)

    torch.nn.Module._apply = skip_noop
    try:
        yield
    finally:
        torch.nn.Module._apply = apply


# --------------------------------------------------------------------------- export / symbolic_trace

_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                  "torch.export", "torch._export", "torch._dynamo")


@contextlib.contextmanager
def _quiet_on_failure():
    """Keep torch's failure chatter (partial graphs on stderr, fake-tensor tracebacks) out of the
    terminal: our CaptureError says what failed. On success, whatever was printed is passed on."""
    buf = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    sys.stderr.write(buf.getvalue())


@contextlib.contextmanager
def _fast_export():
    """Trace without recording each node's Python stack (node.meta["stack_trace"], read by no pass of
    ours: extracting and symbolising it was a fifth of export's time on llama-8b), with lazy graph
    modules (export's passes recompile the whole graph's Python code about ten times; lazily, only
    the module we keep is compiled, when first called: another sixth), the ExportedProgram's own
    graph module included (_unlift builds the one we keep: 0.2 s on llama-70b). Each switch is
    skipped by a torch without it."""
    import torch.export.exported_program as exported_program
    config = getattr(torch.fx, "config", None)
    old = getattr(config, "do_not_emit_stack_traces", None)
    make_ep_module = getattr(exported_program, "_create_graph_module_for_export", None)
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule, _use_lazy_graph_module  # private, may be absent
        lazy = _use_lazy_graph_module(True)
    except ImportError:
        lazy, make_ep_module = contextlib.nullcontext(), None
    if old is not None:
        config.do_not_emit_stack_traces = True
    if make_ep_module is not None:
        exported_program._create_graph_module_for_export = _LazyGraphModule
    try:
        with lazy:
            yield
    finally:
        if old is not None:
            config.do_not_emit_stack_traces = old
        if make_ep_module is not None:
            exported_program._create_graph_module_for_export = make_ep_module


@contextlib.contextmanager
def _reentrant_checkpoint_inlined():
    """Trace torch.utils.checkpoint(..., use_reentrant=True) as a plain call of its function.

    The reentrant form is an autograd.Function whose forward runs the function under no_grad and
    whose backward runs it again; export traces only the forward, so the graph would cut the
    gradient of everything before each checkpointed layer (HF's gradient_checkpointing_enable()
    with use_reentrant=True). Inlined, the graph computes the same values and gradients; what to
    keep or recompute is the plan's business, not the model's."""
    from torch.utils import checkpoint as ckpt
    own = ckpt.CheckpointFunction.__dict__.get("apply")  # None: inherited from autograd.Function
    ckpt.CheckpointFunction.apply = staticmethod(lambda function, preserve_rng_state, *args: function(*args))
    try:
        yield
    finally:
        if own is None:
            del ckpt.CheckpointFunction.apply
        else:
            ckpt.CheckpointFunction.apply = own


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, pytree.TreeSpec]:
    with _quiet_on_failure(), _fast_export(), _reentrant_checkpoint_inlined(), _distribution_checks_off(), \
            _noop_conversions_skipped(), causal_mask_detection_off():
        ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
        out_spec = ep.call_spec.out_spec
        gm = _unlift(ep)
    inline_region_ops(gm)
    return gm, out_spec


def _unlift(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """ep.module() as far as capture needs it, consuming `ep`: lifted parameters, buffers and constants
    become get_attr nodes again (same names, same attributes, same order), and writes into buffers or
    inputs become copy_ nodes. Left out: the copy of the graph, the provenance meta, the guards and
    input checks (flatten_inputs checks inputs) and the Python code (the module is lazy: generated
    when first called), together most of ep.module()'s 1.5 s on llama-70b. Torch's own unlifting
    serves a graph with effect tokens (not training IR) and a torch without lazy graph modules."""
    from torch.export.graph_signature import InputKind, OutputKind
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule  # private: absent from some torch versions
    except ImportError:
        return ep.module()
    sig = ep.graph_signature
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)
    if ep.verifiers[0].dialect != "TRAINING" or any(
            s.kind not in lifted + (InputKind.USER_INPUT,) for s in sig.input_specs):
        return ep.module()
    graph, old = ep.graph, ep.graph_module
    _fresh_names(graph)
    non_persistent = set(sig.non_persistent_buffers)
    root = torch.nn.Module()  # holds every attribute the get_attr nodes load, the module copies them
    for name, sub in old.named_children():  # subgraphs of higher-order ops
        root.add_module(name, sub)
    detached: dict[int, torch.Tensor] = {}
    by_name: dict[str, torch.fx.Node] = {}
    for ph, spec in zip(graph.find_nodes(op="placeholder"), sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            by_name[ph.name] = ph
            continue
        from_state = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER
                                                          and spec.target not in non_persistent)
        value = (ep.state_dict if from_state else ep.constants)[spec.target]
        _put_attr(root, spec.target, value, detached if spec.kind == InputKind.CONSTANT_TENSOR else None)
        with graph.inserting_after(ph):  # not graph.get_attr: it warns, the attribute is not on a module yet
            node = graph.create_node("get_attr", spec.target)
        ph.replace_all_uses_with(node)
        node.meta = ph.meta
        graph.erase_node(ph)
        by_name[spec.target] = node
    for node in graph.find_nodes(op="get_attr"):  # plain attributes: flat_apply's TreeSpecs (a vmapped mask function)
        if not _has_attr(root, node.target) and _has_attr(old, node.target):
            _put_attr(root, node.target, get_attr(old, node.target), None)
            node.meta.setdefault("val", get_attr(old, node.target))
    out = graph.output_node()
    written = (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION, OutputKind.PARAMETER_MUTATION)
    user_outputs = []
    for value, spec in zip(pytree.tree_leaves(out.args), sig.output_specs):
        if spec.kind not in written:
            user_outputs.append(value)
            continue
        with graph.inserting_before(out):
            graph.call_function(torch.ops.aten.copy_.default, (by_name[spec.target], value))
    out.args = (tuple(user_outputs),)
    gm = _LazyGraphModule(root, graph)  # copies what the get_attr nodes load, in graph order, as ep.module()
    gm.meta.update(old.meta)
    # the copy turns every tensor into a buffer: constants are plain attributes again, and non-persistent
    # buffers are not saved in a state_dict
    for spec in sig.input_specs:
        if spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ) or spec.target in non_persistent:
            prefix, _, field = spec.target.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            value = getattr(owner, field)
            delattr(owner, field)
            if spec.target in non_persistent:
                owner.register_buffer(field, value, persistent=False)
            else:
                setattr(owner, field, value)
    for name, value in ep.constants.items():  # constants no node loads (torch keeps them too)
        if not _has_attr(gm, name):
            _put_attr(gm, name, value, detached)
    return gm


def _fresh_names(graph: torch.fx.Graph) -> None:
    """Forget the names export's passes gave up (as ep.module()'s copy of the graph does), so that
    new nodes are named as they were there: a lifted constant `c_const` loads as `const`."""
    namespace = type(graph._graph_namespace)()
    for node in graph.nodes:
        if namespace.create_name(node.name, None) != node.name:
            return  # not a name the copy would keep: leave the namespace as it is
        namespace.associate_name_with_obj(node.name, node)
    graph._graph_namespace = namespace


def _put_attr(root: torch.nn.Module, fqn: str, value: Any, detached: dict[int, torch.Tensor] | None) -> None:
    """Set `value` at `fqn` of `root`, creating plain submodules on the way. With `detached` (a
    constant), a tensor that requires grad is detached, once per tensor so that aliases stay
    aliases, as torch.export does."""
    *path, field = fqn.split(".")
    for part in path:
        if not hasattr(root, part):
            setattr(root, part, torch.nn.Module())
        root = getattr(root, part)
    if detached is not None and isinstance(value, torch.Tensor) and value.requires_grad:
        value = detached.setdefault(id(value), value.detach())
    setattr(root, field, value)


def _has_attr(root: torch.nn.Module, fqn: str) -> bool:
    try:
        get_attr(root, fqn)
    except AttributeError:
        return False
    return True


class _DeepTracer(RegionMarkingTracer):
    """symbolic_trace through every module (no call_module nodes): weights become get_attr; the ops of
    the model's no_grad and autocast regions are marked (regions.py)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(model: torch.nn.Module, in_spec: pytree.TreeSpec,
                    leaves: list[Any]) -> tuple[torch.fx.GraphModule, pytree.TreeSpec]:
    """Trace a flat-input wrapper, then re-root the graph on `model` (FQNs without a prefix)."""
    n = len(leaves)
    const = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
    spec_box: list[pytree.TreeSpec] = []

    def call(inner: torch.nn.Module, flat: list[Any]) -> tuple:
        flat = [const.get(i, v) for i, v in enumerate(flat)]
        a, kw = pytree.tree_unflatten(flat, in_spec)
        out_leaves, out_spec = pytree.tree_flatten(inner(*a, **kw))
        spec_box.append(out_spec)
        return tuple(out_leaves)

    params = ", ".join(f"in{i}" for i in range(n))
    ns: dict[str, Any] = {"_call": call}
    exec(f"def forward(self, {params}):\n    return _call(self.m, [{params}{',' if n == 1 else ''}])\n", ns)
    wrapper_cls = type("FlatInputs", (torch.nn.Module,), {"forward": ns["forward"]})
    wrapper = wrapper_cls()
    wrapper.m = model
    concrete = {f"in{i}": v for i, v in const.items()}
    with _quiet_on_failure(), _distribution_checks_off(), causal_mask_detection_off():
        graph = _DeepTracer().trace(wrapper, concrete_args=concrete or None)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and isinstance(node.target, str):
            node.target = node.target.removeprefix("m.")
        stack = node.meta.get("nn_module_stack")
        if stack:  # drop the wrapper (""), re-root "m.x" -> "x"
            node.meta["nn_module_stack"] = {k: ("" if path == "m" else path.removeprefix("m."), typ)
                                            for k, (path, typ) in stack.items() if path != ""}
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    _fake_propagate(gm, leaves, const)
    regions_applied(gm)
    return gm, spec_box[-1]


def _fake_propagate(gm: torch.fx.GraphModule, leaves: list[Any], const: dict[int, Any]) -> None:
    """Fill meta["val"] with FakeTensors (symbolic_trace gives none)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = []
    for i, (ph, v) in enumerate(zip(placeholders, leaves)):
        if i in const:
            ph.meta["val"] = v
            fake_inputs.append(v)
        else:
            fake_inputs.append(mode.from_tensor(v))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "val" not in node.meta:
            node.meta["val"] = mode.from_tensor(get_attr(gm, node.target))


# --------------------------------------------------------------------------- entry point

def capture(model: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None) -> Captured:
    """Trace `model` called as model(*example_args, **example_kwargs) into a Captured graph.

    Raises CaptureError naming the module and operation that failed, with what to try.
    """
    if not isinstance(example_args, tuple):
        example_args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    kwargs = dict(example_kwargs or {})
    check_traceable_modules(model, model_name(model))
    register_dataclasses((example_args, kwargs))
    leaves, in_spec = pytree.tree_flatten((example_args, kwargs))
    names = input_leaf_names(model, example_args, kwargs)
    tensor_leaf = [isinstance(v, torch.Tensor) for v in leaves]
    tied = find_tied(model)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:  # weights on meta (a model built without memory): trace inputs and buffers there too
        example_args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (example_args, kwargs))
        leaves = pytree.tree_leaves((example_args, kwargs))

    check_no_module_backward_hooks(model, model_name(model))
    with _buffers_on_meta(model) if on_meta else contextlib.nullcontext(), without_kv_cache(model, kwargs):
        tracker = ModuleTracker(model)
        running = lambda: tracker.stack[-1][0] if tracker.stack else ""  # noqa: E731
        grad_off_in_autocast: list[str] = []
        tensor_hooks: list[str] = []
        python_state: list[str] = []
        try:
            with tracker, outputs_registered(model), python_state_watched(model, python_state), \
                    tensor_hooks_recorded(running, tensor_hooks), \
                    grad_off_in_autocast_recorded(tracker, grad_off_in_autocast), \
                    kept_whole(running) as traced_functions:
                gm, out_spec = _export(model, example_args, kwargs)
            method = "export"
            warn_traced(model_name(model), traced_functions)
        except Exception as export_err:
            export_where, export_failed = tracker.where(), tracker.failed_module
            packed = packed_sequence_error(model, tracker.failed)
            if packed is not None:
                raise packed from export_err
            if not is_data_dependent(export_err):
                check_inputs_eagerly(model, example_args, kwargs, names, leaves)
            tracker = ModuleTracker(model)
            try:
                python_state.clear()
                with tracker, outputs_registered(model), python_state_watched(model, python_state), \
                        _random_draws_checked(model):
                    gm, out_spec = _symbolic_trace(model, in_spec, leaves)
                method = "symbolic_trace"
                log.warning("torch.export failed on %s in %s (%s); captured with torch.fx.symbolic_trace instead",
                            model_name(model), export_where, first_line(export_err))
            except Exception as trace_err:
                raise capture_error(model, export_err, export_where, trace_err, tracker.where(),
                                    export_failed) from export_err

        if method == "export" and tensor_hooks:
            raise tensor_hook_error(model_name(model), tensor_hooks[0])
        if method == "export" and grad_off_in_autocast:
            raise CaptureError(
                f"cannot capture {model_name(model)}: {grad_off_in_autocast[0]} turns gradients off (torch.no_grad or "
                "set_grad_enabled(False)) inside a torch.autocast region, which torch.export does not keep: its ops "
                "would get gradients that the model's do not. Move the no_grad region out of the autocast region, "
                "write it as .detach() of what it reads and of what it returns, or drop the model's autocast region "
                "and pass mixed_precision='bf16' to compile_parallel.")
        warn_python_state(model_name(model), python_state)
        keep, const = normalise(gm, tied, tensor_leaf)
        from partitioner.passes.writes import (inference_writes_per_call, order_writes,  # lazy: they read
                                               snapshot_state_reads)  # mutates() from here
        if not model.training:
            inference_writes_per_call(gm)  # a write into a weight in eval forward: once per call, in a copy
        order_writes(gm)  # a split must see which readers come after an in-place write
        snapshot_state_reads(gm)  # a buffer written in forward is read as of its own microbatch
        from partitioner.passes.causal_mask import fold_causal_masks  # lazy: it reads constants with get_attr (here)
        fold_causal_masks(gm)  # before any cost model or stage sees the graph: flash attention needs no mask
        from partitioner.passes.onehot_lookup import lookups_as_matmuls  # lazy, as above
        lookups_as_matmuls(gm)  # contended constant-index lookups: matmuls, not serialised atomics
        from partitioner.passes.attention_mask_layout import contiguous_attention_masks  # lazy, as above
        contiguous_attention_masks(gm)  # a strided mask would keep SDPA off its fused kernels
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    _check_vals(gm)
    return Captured(graph_module=gm, in_spec=in_spec, out_spec=out_spec, input_names=input_names,
                    tied=tied, method=method, input_leaf_indices=keep, const_inputs=const,
                    module_types={name: f"{type(m).__module__}.{type(m).__qualname__}"
                                  for name, m in model.named_modules()})


@contextlib.contextmanager
def _buffers_on_meta(model: torch.nn.Module) -> Iterator[None]:
    """The model's real buffers swapped for meta copies while it is traced, then put back.

    A model built with its parameters on meta keeps real buffers (their values are needed when it
    is materialised); traced as they are, the first op mixing one with a meta activation fails
    (cpu vs meta). Tracing needs only their shapes. A buffer shared by modules stays shared.
    """
    meta_of: dict[int, torch.Tensor] = {}
    swapped: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                meta_of.setdefault(id(buf), buf.to("meta"))
                swapped.append((module, name, buf))
    try:
        for module, name, buf in swapped:
            module._buffers[name] = meta_of[id(buf)]
        yield
    finally:
        for module, name, buf in swapped:
            module._buffers[name] = buf


def _check_vals(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "output" and "val" not in node.meta:
            raise CaptureError(f"internal: node '{node.name}' ({node.op} {node.target}) has no meta['val'] "
                               "after capture; please report this model.")
