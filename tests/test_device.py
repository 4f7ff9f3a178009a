"""DeviceSpec table, JSON round trip, errors and the calibrated CPU."""
from __future__ import annotations

import pytest
import torch

import partitioner.cost_models.device
from partitioner.cost_models.device import DEVICE_SPECS, DeviceSpec, calibrate_cpu, get_device_spec
from partitioner.errors import CostModelError


@pytest.mark.parametrize("name", ["h100", "h200", "a100-40gb", "a100-80gb", "l4"])
def test_table_entries_are_consistent(name):
    spec = get_device_spec(name)
    assert spec.name == name
    assert spec.flops_per_s(torch.bfloat16) > spec.flops_per_s(torch.float32) > 0
    assert spec.flops_per_s(torch.float32, tf32=True) >= spec.flops_per_s(torch.float32)
    assert spec.mem_bw_bytes_per_s > spec.intra_node_bw_bytes_per_s >= spec.inter_node_bw_bytes_per_s > 0
    assert spec.mem_bytes > 16 * 2 ** 30


def test_names_are_case_insensitive_and_h200_has_more_memory_and_bandwidth():
    assert get_device_spec("H100") is DEVICE_SPECS["h100"]
    h100, h200 = get_device_spec("h100"), get_device_spec("h200")
    assert h200.mem_bytes > h100.mem_bytes and h200.mem_bw_bytes_per_s > h100.mem_bw_bytes_per_s


def test_json_round_trip_and_user_file(tmp_path):
    spec = get_device_spec("a100-80gb")
    assert DeviceSpec.from_json(spec.to_json()) == spec
    mine = DeviceSpec("my-gpu", {"float32": 1e13, "bfloat16": 4e13}, 1e12, 8 * 2 ** 30, 1e11, 1e10, 1e-5)
    path = tmp_path / "my-gpu.json"
    path.write_text(mine.to_json())
    loaded = get_device_spec(str(path))
    assert loaded == mine
    assert loaded.flops_per_s(torch.float16) == 1e13  # no entry: the fp32 rate stands in


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(CostModelError) as err:
        get_device_spec("tpu-v9")
    for name in ("h100", "h200", "a100-40gb", "a100-80gb", "l4", "cpu"):
        assert name in str(err.value)
    with pytest.raises(CostModelError, match="does not exist"):
        get_device_spec("/nonexistent/spec.json")


def test_bad_json_says_which_fields(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x", "peak_flops": {}}')
    with pytest.raises(CostModelError, match="mem_bw_bytes_per_s"):
        get_device_spec(str(path))


def test_cpu_is_calibrated_once_per_process(monkeypatch):
    # count the measurements instead of timing them: a busy machine makes any time limit flaky
    calls = []
    monkeypatch.setattr(partitioner.cost_models.device, "_time_it", lambda fn, min_time_s=0.05: calls.append(fn) or 1e-3)
    calibrate_cpu.cache_clear()
    try:
        spec = get_device_spec("cpu")
        measured = len(calls)
        assert measured == 5  # matmul in fp32, bf16 and fp16, a copy, the per-kernel overhead
        assert get_device_spec("cpu") is spec is calibrate_cpu() and len(calls) == measured
        assert spec.flops_per_s(torch.float32) == 2 * 512 ** 3 / 1e-3 and spec.kernel_overhead_s == 1e-3 / 33
    finally:
        calibrate_cpu.cache_clear()  # the next caller measures for real


def test_the_calibrated_cpu_is_plausible():
    spec = calibrate_cpu()
    assert spec.flops_per_s(torch.float32) > 1e8 and spec.mem_bw_bytes_per_s > 1e8
    assert 0 < spec.kernel_overhead_s < 1.0  # seconds per kernel; its real size depends on the load