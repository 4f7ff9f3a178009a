"""benchmarks/plan_quality.py: its pipeline bound is a true lower bound of the simulated step."""
import itertools
import random

import pytest

from benchmarks.plan_quality import pipeline_bound_s
from partitioner.plan import evaluate_assignment
from passes.coarsen import synthetic_block_graph


@pytest.mark.parametrize("seed", range(20))
def test_pipeline_bound_is_below_every_split_and_reached_by_equal_stages(seed):
    rng = random.Random(seed)
    n, p = rng.randint(4, 8), rng.choice([2, 3])
    m = 2 * p
    bg = synthetic_block_graph([rng.uniform(0.5e-3, 3e-3) for _ in range(n)])
    bound = pipeline_bound_s(bg, p, 1, m)
    steps = []
    for cuts in itertools.combinations(range(1, n), p - 1):  # every contiguous split
        starts = (0, *cuts, n)
        assign = [s for s in range(p) for _ in range(starts[s], starts[s + 1])]
        steps.append(evaluate_assignment(bg, assign, p, 1, m, "1f1b", link_bw_bytes_per_s=1e12).step_time_s)
    assert bound <= min(steps) * (1 + 1e-9)
    equal = synthetic_block_graph([1e-3] * (2 * p))  # equal stages: the textbook (m + p - 1) t is exact
    assert pipeline_bound_s(equal, p, 1, m) == pytest.approx((m + p - 1) * 2e-3)


def test_no_bound_off_paths_or_with_interleaving():
    branchy = synthetic_block_graph([1e-3] * 4, edges={(0, 1): 0, (0, 2): 0, (1, 3): 0, (2, 3): 0})
    assert pipeline_bound_s(branchy, 2, 1, 4) is None
    assert pipeline_bound_s(synthetic_block_graph([1e-3] * 4), 2, 2, 4) is None
