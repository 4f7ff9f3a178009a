"""This host's compiled launch and call costs (cost_models/compiled_host.py) and the GPU spec that carries them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from partitioner.cost_models import compiled_host
from partitioner.cost_models import device as device_module
from partitioner.cost_models.device import spec_for_gpu_name
from partitioner.cost_models.host_calibration import host_bound_encoder
from partitioner.passes.capture import capture

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def cuda_h100(monkeypatch):
    """torch.cuda as on an H100 machine whose eager dispatch matches the table (no GPU needed)."""
    table = spec_for_gpu_name(H100)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: H100)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(device_module, "host_overheads_s", lambda d: (table.cpu_fwd_overhead_s, table.cpu_bwd_overhead_s))


def test_the_fit_takes_the_slope_per_launch_and_half_the_rest_per_call():
    per_launch, per_call = 20e-6, 150e-6
    points = [(n, n * per_launch + 2 * per_call) for n in (50, 150, 250)]
    launch, call = compiled_host.fit_launch_and_call(points)
    assert launch == pytest.approx(per_launch) and call == pytest.approx(per_call)
    assert compiled_host.fit_launch_and_call([(50, 1e-3), (150, 1e-3)]) == (0.0, pytest.approx(5e-4))  # no slope: all per call
    assert compiled_host.fit_launch_and_call([(50, 1e-3), (150, 4e-3)])[1] == 0.0  # negative intercept: none
    with pytest.raises(ValueError, match="two graphs"):
        compiled_host.fit_launch_and_call([(50, 1e-3), (50, 2e-3)])


def test_the_modelled_launches_grow_by_the_same_count_per_layer():
    """Every encoder layer adds the same kernels (forward, backward, its parameters' share of the
    foreach gradient accumulation: 1/64 of a launch each, for parameters this small)."""
    spec = spec_for_gpu_name(H100)
    counts = []
    for depth in (1, 2, 3):
        model, x = host_bound_encoder(depth)
        counts.append(compiled_host.modelled_launches(capture(model, (x,)).graph_module, spec))
    per_layer = counts[1] - counts[0]
    assert per_layer > 20 and counts[2] - counts[1] == per_layer
    params = sum(1 for _ in host_bound_encoder(1)[0].parameters())
    assert per_layer - params / 64 == int(per_layer - params / 64)


def test_the_calibration_times_steps_of_two_depths_once_per_device(monkeypatch):
    """Run eagerly here (torch.compile patched to the identity: no compiler needed): positive costs,
    the launch cost in milliseconds at most, and a second call reuses the first."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    monkeypatch.setattr(compiled_host, "_CALIBRATION", {})
    launch, call = compiled_host.compiled_host_overheads_s("cpu", rounds=3, per_round=4, progress=False)
    assert 0 < launch < 1e-2 and call >= 0  # a positive per-launch cost, not its size: a loaded CPU reads several ms
    assert compiled_host.compiled_host_overheads_s("cpu") == (launch, call)


def test_a_gpu_spec_for_compiled_stages_carries_the_hosts_compiled_costs(monkeypatch, cuda_h100):
    table = spec_for_gpu_name(H100)
    monkeypatch.setattr(compiled_host, "compiled_host_overheads_s", lambda d: (21e-6, 90e-6))
    spec = device_module.spec_for_torch_device("cuda:0", compiled=True)
    assert (spec.compiled_launch_overhead_s, spec.compiled_stage_pass_s) == (21e-6, 90e-6)
    eager = device_module.spec_for_torch_device("cuda:0")
    assert (eager.compiled_launch_overhead_s, eager.compiled_stage_pass_s) == (
        table.compiled_launch_overhead_s, table.compiled_stage_pass_s)
    uncalibrated = device_module.spec_for_torch_device("cuda:0", calibrate_host=False, compiled=True)
    assert uncalibrated == table


def test_a_host_that_cannot_compile_plans_with_the_tables_launch_cost(monkeypatch, cuda_h100):
    table = spec_for_gpu_name(H100)

    def fail(device):
        raise RuntimeError("no triton here")
    monkeypatch.setattr(compiled_host, "compiled_host_overheads_s", fail)
    with pytest.warns(RuntimeWarning, match="no triton here.*h100 table's compiled launch cost"):
        spec = device_module.spec_for_torch_device("cuda:0", compiled=True)
    assert spec.compiled_launch_overhead_s == table.compiled_launch_overhead_s


@pytest.mark.gpu
def test_this_gpu_hosts_compiled_launch_cost():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    launch, call = compiled_host.compiled_host_overheads_s(torch.device("cuda:0"))
    assert 2e-6 < launch < 1e-4 and 0 <= call < 2e-3
