"""Shared fixtures: small zoo models, built once per test session."""
from __future__ import annotations

import pytest

from partitioner import zoo


@pytest.fixture(scope="session")
def small_zoo():
    """build(name, small=True) with a per-session cache (models are not mutated by capture)."""
    cache: dict[str, zoo.ZooModel] = {}

    def get(name: str) -> zoo.ZooModel:
        if name not in cache:
            cache[name] = zoo.build(name, small=True, batch=2)
        return cache[name]

    return get


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (measured times, profiles) in a directory of this session, not the user's."""
    import os

    old = os.environ.get("PARTITIONER_CACHE")
    os.environ["PARTITIONER_CACHE"] = str(tmp_path_factory.mktemp("partitioner_cache"))
    yield
    if old is None:
        os.environ.pop("PARTITIONER_CACHE", None)
    else:
        os.environ["PARTITIONER_CACHE"] = old
