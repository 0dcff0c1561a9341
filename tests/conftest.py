"""Shared fixtures: the tiny models are built once into the user cache and reused across the suite."""

import os

import kimi_local  # noqa: F401  (sets the OpenMP wait policy before torch starts its thread pool)
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir():
    from kimi_local.tiny import ensure_tiny
    return ensure_tiny(seed=0)


@pytest.fixture(scope="session")
def shared_dir():
    """The shared/ folder laid beside the repository (fixtures such as Moonshot's real chat templates)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "..", "shared"), os.path.join(here, "..", "shared")):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    pytest.skip("shared/ fixtures not found beside the repository")
