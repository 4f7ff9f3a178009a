"""partitioner/microbatch.py: the batch-size rule and the split into equal microbatches."""
import pytest
import torch

from partitioner.errors import RuntimeConfigError
from partitioner.microbatch import batch_size, split_batch


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
