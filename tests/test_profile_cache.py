"""partitioner/profile_cache.py: a second plan of a model reads capture and profiling back; a corrupt
entry is detected and recomputed; a changed model misses."""
from __future__ import annotations

import pytest
import torch

import partitioner.plan_model
from partitioner import profile_cache
from partitioner.plan_model import PlanConfig, plan_model
from tests.test_cli_plan import Tiny


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def captures(monkeypatch):
    """How many times the planner captured a model."""
    calls = []
    real = partitioner.plan_model.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(partitioner.plan_model, "capture", counting)
    return calls


def plan(model, devices: int = 2, microbatches: int = 4, need_graph: bool = False):
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    config = PlanConfig(num_ranks=devices, microbatches=microbatches, time_limit_s=5)
    return plan_model(model, (tokens,), {}, config, need_graph=need_graph)


def test_second_plan_hits_the_cache_with_other_devices(cache_dir, captures):
    model = Tiny()
    first = plan(model)
    assert len(captures) == 1 and len(list((cache_dir / "profiles").iterdir())) == 1
    again = plan(model)
    assert len(captures) == 1 and again.captured is None  # neither captured nor profiled
    assert again.costs == first.costs and again.annotated == first.annotated
    assert again.plan.block_stage == first.plan.block_stage
    other = plan(model, devices=4)  # another pipeline, the same microbatch shape
    assert len(captures) == 1 and other.plan.num_ranks == 4
    assert plan(model, need_graph=True).captured is not None  # the runtime still gets its graph


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_entry_is_detected_and_recomputed(cache_dir, captures, damage):
    model = Tiny()
    first = plan(model)
    (entry,) = (cache_dir / "profiles").iterdir()
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    again = plan(model)
    assert len(captures) == 2  # recomputed, not read
    assert again.costs == first.costs
    assert profile_cache.load(entry.stem) is not None  # and written back whole


def test_changed_model_misses(cache_dir, captures):
    plan(Tiny(layers=6))
    plan(Tiny(layers=5))
    plan(Tiny(layers=6, width=48))
    assert len(captures) == 3 and len(list((cache_dir / "profiles").iterdir())) == 3


def test_key_follows_inputs_and_cost_options():
    from partitioner.cost_models.device import get_device_spec

    model, spec = Tiny(), get_device_spec("h100")
    x = torch.zeros(2, 16, dtype=torch.int64)

    def key(inputs=x, device=spec, dtype="float32"):
        return profile_cache.model_key(model, (inputs,), {}, device_spec=device, optimizer="adamw",
                                       options=(dtype, None, False))

    assert key() == key()
    assert len({key(), key(torch.zeros(4, 16, dtype=torch.int64)), key(device=get_device_spec("a100-80gb")),
                key(dtype="bfloat16")}) == 4


@pytest.fixture
def builds(monkeypatch):
    """How many times the CLI built its model."""
    import partitioner.cost_models.profile_command as profile_command

    calls = []
    real = profile_command.load_model_spec

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_command, "load_model_spec", counting)
    import partitioner.plan_command as plan_command
    monkeypatch.setattr(plan_command, "load_model_spec", counting)  # where `partitioner plan` calls it
    return calls


def cli_plan(tmp_path, *argv: str):
    from partitioner.cli import main
    from partitioner.plan import Plan

    path = tmp_path / "plan.json"
    assert main(["plan", "gpt2", "--seq", "32", "--time-limit", "5", "--json", str(path), *argv]) == 0
    return Plan.from_json(path.read_text())


def test_zoo_model_planned_again_is_not_built(cache_dir, captures, builds, tmp_path):
    """A second `partitioner plan gpt2` reads the profile through the zoo recipe: no model, no transformers."""
    first = cli_plan(tmp_path, "--devices", "2")
    profiled = len(captures)  # the model's capture and the loss's
    assert len(builds) == 1 and profiled >= 1
    assert len(list((cache_dir / "profiles").glob("*.recipe"))) == 1
    again = cli_plan(tmp_path, "--devices", "2")
    assert len(builds) == 1 and len(captures) == profiled
    assert again.block_stage == first.block_stage and again.step_time_s == first.step_time_s
    cli_plan(tmp_path, "--devices", "4", "--batch", "16")  # 8 microbatches of 2 again: the same recipe
    assert len(builds) == 1 and len(captures) == profiled
    cli_plan(tmp_path, "--devices", "2", "--seq", "16")  # another shape: built and profiled
    assert len(builds) == 2 and len(captures) == 2 * profiled


def test_corrupt_recipe_is_recomputed(cache_dir, captures, builds, tmp_path):
    first = cli_plan(tmp_path, "--devices", "2")
    profiled = len(captures)
    (recipe,) = (cache_dir / "profiles").glob("*.recipe")
    recipe.write_bytes(recipe.read_bytes()[:-3] + b"zzz")
    again = cli_plan(tmp_path, "--devices", "2")
    assert len(builds) == 2 and len(captures) == profiled  # built again to find its profile, not profiled again
    assert again.block_stage == first.block_stage
    assert profile_cache.load_recipe(recipe.stem) is not None  # written back whole
