"""runtime/rank_random.py: under torchrun each rank's stages draw from their own stream, the script's
draws stay in step across ranks, and the generators are put back (CPU here; CUDA where a GPU is)."""
from __future__ import annotations

import pytest
import torch

from partitioner.runtime.rank_random import ranked_random_draws


def _draws(rank: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(what a stage draws inside, what the script draws next after) from one seeded start."""
    torch.manual_seed(0)
    with ranked_random_draws(rank, device):
        inside = torch.rand(4, device=device)
    return inside.cpu(), torch.rand(4)


def _check(device: torch.device) -> None:
    rank0, after0 = _draws(0, device)
    rank1, after1 = _draws(1, device)
    again, _ = _draws(0, device)
    assert not torch.equal(rank0, rank1)  # ranks seeded alike draw apart inside
    assert torch.equal(rank0, again)  # deterministic under torch.manual_seed
    assert torch.equal(after0, after1)  # the script's own stream is the same on every rank afterwards
    torch.manual_seed(0)
    torch.randint(0, 2 ** 62, (), dtype=torch.int64)  # the one draw the context takes
    assert torch.equal(after0, torch.rand(4))
    torch.manual_seed(0)
    plain = torch.rand(4, device=device).cpu()
    none, _ = _draws(None, device)  # one process: the default stream, untouched
    assert torch.equal(none, plain)


def test_each_rank_draws_its_own_stream_and_the_script_stays_in_step():
    _check(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_generator_is_forked_per_rank_and_put_back():
    device = torch.device("cuda", 0)
    _check(device)
    torch.manual_seed(0)
    state = torch.cuda.get_rng_state(device)
    with ranked_random_draws(1, device):
        torch.nn.functional.dropout(torch.ones(8, device=device), 0.5)
    assert torch.equal(torch.cuda.get_rng_state(device), state)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_the_stages_device_is_seeded_not_the_current_one():
    torch.cuda.set_device(0)
    _check(torch.device("cuda", 1))
    torch.manual_seed(0)
    current = torch.cuda.get_rng_state(0)
    with ranked_random_draws(1, torch.device("cuda", 1)):
        pass
    assert torch.equal(torch.cuda.get_rng_state(0), current)
