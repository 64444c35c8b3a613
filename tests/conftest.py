"""Shared test configuration: markers, hypothesis profiles, GPU skipping."""

import os

import pytest
from hypothesis import HealthCheck, settings

from diffusion_np.backend import gpu_available

# "ci" is the default: enough examples to find bugs, no per-example deadline
# (a 2-core machine under load makes deadlines flaky). HYPOTHESIS_PROFILE=thorough for more.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _keep_this_process_malloc(monkeypatch):
    """The command tunes glibc's malloc for its whole process (diffusion_np/malloc.py); tests that
    call it in-process leave pytest's malloc as it was (tests/test_malloc.py checks the call)."""
    import diffusion_np.cli

    monkeypatch.setattr(diffusion_np.cli, "tune_malloc", lambda: False)
