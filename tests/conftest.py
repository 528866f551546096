"""Shared test settings.

Statistical tests: each uses its own fixed seed and states its threshold (usually p > 1e-3,
or a 5-sigma band). With fixed seeds the outcome is deterministic; the thresholds bound how
often a correct sampler would fail under a fresh seed (a false-alarm budget of about 1e-3 per test).
"""

import os

import torch

# Without a GPU, Triton's CPU interpreter runs the kernels (tests/test_triton_kernels.py); it
# must be chosen before anything imports triton (torch.compile does). With one, the kernels are
# compiled for it (tests/test_cuda.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# pytest-xdist already runs one worker per core; more torch threads per worker only stall.
torch.set_num_threads(1)


@pytest.fixture(params=["auto", "torch"])
def backend(request, monkeypatch):
    """Run a test on the default kernels (fused numba ones where installed) and on the torch path.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("backend")``, so the torch
    fallback stays tested wherever numba is installed.
    """
    monkeypatch.setenv("GUMBELKIT_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same state of torch's default generator (module weights,
    draws without generator=), so an outcome never depends on which tests ran before it."""
    torch.manual_seed(0)
