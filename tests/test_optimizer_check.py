"""partitioner/optimizer_check.py: an optimizer built on the model given to compile_parallel (which the
ParallelModel does not train: it trains copies) is named at its first step, once; one built on
pm.parameters() is not."""
from __future__ import annotations

import warnings

import pytest
import torch

from partitioner.api import compile_parallel


def test_an_optimizer_of_the_model_given_to_compile_parallel_is_named_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    before = torch.optim.AdamW(model.parameters(), lr=0.1)  # built as a single-device loop builds it
    pm = compile_parallel(model, ["cpu"] * 2, (x,), torch.nn.CrossEntropyLoss(), microbatches=2, time_limit_s=1)
    after = torch.optim.AdamW(pm.parameters(), lr=0.1)
    pm.train_step(x, target=y)
    with pytest.warns(RuntimeWarning, match=r"AdamW steps '0\.weight' of the model given to compile_parallel.*"
                                            r"on pm\.parameters\(\)"):
        before.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before.step()  # once
        after.step()
    assert all(p.grad is None for p in model.parameters())
