"""partitioner/microbatch.py: the batch-size rule and the split into equal microbatches."""
import pytest
import torch

from partitioner.errors import RuntimeConfigError
from partitioner.microbatch import BatchDims, batch_size, resolve_batch_dims, split_batch, split_target


def test_batch_size_is_dim0_of_the_first_tensor_with_a_dimension():
    assert batch_size(((torch.tensor(3.0), torch.zeros(6, 2)), {"m": torch.zeros(6)})) == 6
    assert batch_size(((1, "a"), {})) is None


def test_split_keeps_non_batch_inputs_whole_and_rejoins_exactly():
    x, pos, flag = torch.arange(24).reshape(6, 4), torch.arange(4).reshape(1, 4), True
    parts = split_batch(((x, pos), {"flag": flag}), 3, "input", batch=6)
    assert len(parts) == 3
    assert torch.equal(torch.cat([p[0][0] for p in parts]), x)
    assert all(p[0][1] is pos and p[1]["flag"] is True for p in parts)


def test_split_refuses_a_batch_that_does_not_divide():
    with pytest.raises(RuntimeConfigError, match="target has batch size 5, which cannot be split into 2"):
        split_batch(torch.zeros(5), 2, "target")


def test_the_batch_and_the_split_follow_each_leafs_batch_dim():
    x, mask, shared = torch.arange(48).reshape(6, 4, 2), torch.arange(24).reshape(4, 6), torch.zeros(6, 6)
    inputs, dims = ((x,), {"mask": mask, "shared": shared}), [1, 0, 1]
    assert batch_size(inputs, dims) == 4
    parts = split_batch(inputs, 2, "input", batch=4, dims=dims)
    assert torch.equal(torch.cat([p[0][0] for p in parts], 1), x) and parts[0][0][0].shape == (6, 2, 2)
    assert torch.equal(torch.cat([p[1]["mask"] for p in parts]), mask)
    assert all(p[1]["shared"] is shared for p in parts)  # (6, 6): its dim 1 is no batch of 4


def test_batch_dims_resolve_by_name_to_every_leaf():
    leaves = [torch.zeros(6, 4, 2), torch.zeros(4, 6), torch.zeros(4, 6), 3]
    names = ["x", "batch[0]", "batch[1]", "n"]
    assert resolve_batch_dims(None, names, leaves) == BatchDims()
    assert resolve_batch_dims({"x": -2, "target": 1}, names, leaves) == BatchDims((1, 0, 0, 0), 1)
    assert resolve_batch_dims({"batch": 1}, names, leaves).inputs == (0, 1, 1, 0)
    assert resolve_batch_dims(1, names, leaves) == BatchDims((1, 1, 1, 0), 1)
    with pytest.raises(RuntimeConfigError, match=r"'y', which is no input.*\['x', 'batch\[0\]', 'batch\[1\]', 'n'\]"):
        resolve_batch_dims({"y": 1}, names, leaves)
    with pytest.raises(RuntimeConfigError, match="input 'n' on dim 0, but it is not a tensor"):
        resolve_batch_dims({"n": 0}, names, leaves)


def test_the_target_is_cut_where_it_holds_the_batch_and_other_leaves_go_whole():
    """A loss's class weights or a 0-dim margin beside the labels go whole to every microbatch, as an
    unbatched input does; labels flattened sample-major are cut; a target with no leaf of the inputs'
    batch is refused, and so is one with the batch on another dim where the inputs have it there."""
    labels, flat, weight, margin = torch.arange(6), torch.arange(24), torch.ones(5), torch.tensor(0.5)
    parts = split_target({"labels": labels, "flat": flat, "weight": weight, "margin": margin}, 3, batch=6)
    assert torch.equal(torch.cat([p["labels"] for p in parts]), labels)
    assert torch.equal(parts[1]["flat"], flat[8:16])
    assert all(p["weight"] is weight and p["margin"] is margin for p in parts)
    with pytest.raises(RuntimeConfigError, match=r"target \(4,\) has 4 samples along its batch dim 0, but the inputs' "
                                                 r"batch is 6.*same batch as the inputs"):
        split_target(torch.zeros(4), 2, batch=6)
    with pytest.raises(RuntimeConfigError, match=r"target \(12, 6\) has 12 along its batch dim 0 but the inputs' batch 6 "
                                                 r"along dim 1.*'target': 1"):
        split_target(torch.zeros(12, 6), 2, batch=6, dims=BatchDims(1, 0))
    assert split_target(torch.zeros(12, 6), 2, batch=6)[0].shape == (6, 6)  # (batch x 2, 6 classes), flattened
