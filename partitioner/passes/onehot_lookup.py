"""Contended lookups of constant indices, rewritten as one-hot matmuls.

An embedding whose indices the graph computes from constants alone (T5's relative position
buckets: every query-key pair into one of 32 buckets) has a backward that sums many gradient
rows into few table rows. Inductor lowers it to atomic adds, which serialise on the hottest row
(14 ms of a t5-base microbatch's 32 ms of kernels on an H100, benchmarks/RESULTS.md); eager
PyTorch sorts the indices first. The same lookup written as one_hot(indices) @ table is a matmul
both ways: its backward, one_hot^T @ grad, is a GEMM with no contention. Values are equal (a
one-hot row picks one table row exactly); the table's gradient sums the same terms in another
order.

Applied where the hottest row receives at least MIN_HOT_HITS of the indices and the one-hot
matrix takes at most ONEHOT_BUDGET_BYTES; tables with a padding row or frequency scaling (whose
gradients differ from a matmul's) are left as they are.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.fx

from partitioner.passes.graph_nodes import fake_mode_of, provenance
from partitioner.passes.constants import constant_value, val

log = logging.getLogger(__name__)

aten = torch.ops.aten
MIN_HOT_HITS = 1024  # indices on the hottest row: below, the atomics' serial chain is short
ONEHOT_BUDGET_BYTES = 256 * 2**20  # the one-hot matrix a forward materialises (the backward recomputes it)


class EmbeddingCall(NamedTuple):
    """The arguments of an aten.embedding node, defaults filled in."""
    weight: torch.fx.Node
    indices: torch.fx.Node
    padding_idx: int
    scale_grad_by_freq: bool
    sparse: bool


def embedding_call(node: torch.fx.Node) -> EmbeddingCall | None:
    """`node`'s arguments if it is an aten.embedding call, else None."""
    if node.op != "call_function" or node.target is not aten.embedding.default:
        return None
    names = EmbeddingCall._fields
    defaults = (None, None, -1, False, False)
    return EmbeddingCall(*(node.args[i] if len(node.args) > i else node.kwargs.get(names[i], defaults[i])
                           for i in range(len(names))))


def lookups_as_matmuls(gm: torch.fx.GraphModule) -> int:
    """Rewrite every contended constant-index aten.embedding of `gm` as a one-hot matmul; returns
    how many were rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        call = embedding_call(node)
        if call is None:
            continue
        weight, indices = call.weight, call.indices
        w, idx = val(weight), val(indices)
        if call.padding_idx not in (None, -1) or call.scale_grad_by_freq or call.sparse \
                or not _static(w) or not _static(idx) or w.dim() != 2 or idx.is_floating_point():
            continue
        rows, numel = w.shape[0], math.prod(idx.shape)
        if numel * rows * w.element_size() > ONEHOT_BUDGET_BYTES:
            continue
        values = constant_value(gm, indices, allow_writes=True)
        if values is None or values.numel() == 0 or int(values.min()) < 0 or int(values.max()) >= rows:
            continue
        if int(torch.bincount(values.flatten(), minlength=rows).max()) < MIN_HOT_HITS:
            continue
        _rewrite(gm.graph, node, weight, indices, w, idx)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
        log.debug("rewrote %d contended constant-index lookups as one-hot matmuls", rewritten)
    return rewritten


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, weight: torch.fx.Node, indices: torch.fx.Node,
             w: torch.Tensor, idx: torch.Tensor) -> None:
    """embedding(weight, indices) -> view(mm(onehot, weight)), onehot = (indices[..., None] == arange(rows))
    as a [numel, rows] matrix in the table's dtype.

    Where every use permutes the table's column dim to the front (T5: (L, S, H) -> (H, L, S)), the
    matmul is written transposed instead, table^T @ onehot^T, so the permuted view the uses read is
    contiguous: as an attention mask it then takes SDPA's fused kernels (which need stride 1 in the
    mask's last dim) without the copy passes/attention_mask_layout.py would otherwise make."""
    rows, cols, numel = w.shape[0], w.shape[1], math.prod(idx.shape)
    meta = provenance(node)

    def call(target, *args, **kwargs) -> torch.fx.Node:
        method = isinstance(target, str)
        new = graph.call_method(target, args, kwargs) if method else graph.call_function(target, args, kwargs)
        vals = [val(a) if isinstance(a, torch.fx.Node) else a for a in args]
        with fake_mode_of(w):
            new.meta = {**meta, "val": getattr(vals[0], target)(*vals[1:], **kwargs) if method else target(*vals, **kwargs)}
        return new

    with graph.inserting_before(node):
        classes = call(aten.arange.default, rows, dtype=idx.dtype, device=idx.device)
        # the table's dtype when the step runs: a mixed-precision pass may cast the table later
        if _columns_first(node, idx.dim()):
            hits = call(aten.eq.Tensor, call(aten.unsqueeze.default, classes, 1),
                        call(aten.view.default, indices, [1, numel]))
            out_t = call(aten.mm.default, call(aten.t.default, weight), call("type_as", hits, weight))
            out = call(aten.permute.default, call(aten.view.default, out_t, [cols, *idx.shape]),
                       [*range(1, idx.dim() + 1), 0])
        else:
            hits = call(aten.eq.Tensor, call(aten.unsqueeze.default, indices, -1), classes)
            onehot = call(aten.view.default, call("type_as", hits, weight), [numel, rows])
            out = call(aten.view.default, call(aten.mm.default, onehot, weight), [*idx.shape, cols])
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _columns_first(node: torch.fx.Node, index_dims: int) -> bool:
    """Whether every use of the lookup `node` is a permute that puts its column dim (the last) first."""
    def columns_first(user: torch.fx.Node) -> bool:
        if user.op != "call_function" or user.target not in (aten.permute.default, torch.permute) \
                or user.args[0] is not node:
            return False
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dims")
        return dims is not None and len(dims) == index_dims + 1 and dims[0] % (index_dims + 1) == index_dims
    return bool(node.users) and all(columns_first(u) for u in node.users)


def _static(t) -> bool:
    return isinstance(t, torch.Tensor) and all(isinstance(d, int) for d in t.shape)

