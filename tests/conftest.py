"""Shared test setup: the Triton interpreter, the `backend` fixture and the hypothesis profiles.

TRITON_INTERPRET must be set before metakernels (and triton) is imported: metakernels/_backend.py refuses
the "triton" CPU backend without it, and triton reads it at import. pytest imports this file before any
test module, so setting it here, ahead of every metakernels import, is early enough.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import metakernels  # noqa: E402
from metakernels import _backend  # noqa: E402

# --- hypothesis ----------------------------------------------------------------------------------------
# deadline=None everywhere: a Triton example runs in the interpreter (~5 ms per launch, ~80 ms for the
# largest shapes) and the first example of a shape pays for compilation, so per-example timing is noise.
# The `backend` fixture is function-scoped but holds no per-example state (it only selects which
# kernels serve the ops), so reusing it across a test's examples is correct.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# ci: the default; sized so the whole op suite (three backends, one of them interpreted) runs in about
# a minute on 2 cores. derandomize makes a CI failure reproducible from the log alone.
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
# dev: fresh random examples on each run (failures are kept in .hypothesis/ and replayed first).
settings.register_profile("dev", max_examples=50, **_COMMON)
# thorough: for a long soak before a release, `HYPOTHESIS_PROFILE=thorough pytest tests`.
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- CPU backends ----------------------------------------------------------------------------------------
def available_backends() -> list[str]:
    """The CPU backends this process can run: cpp only with the extension, triton only when interpretable."""
    names = []
    if metakernels.extension_available():
        names.append("cpp")
    names.append("reference")
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Serves the metakernels ops on CPU tensors from one backend for the test; restores the previous one."""
    previous = _backend.cpu_backend()
    _backend.set_cpu_backend(request.param)
    try:
        yield request.param
    finally:
        _backend.set_cpu_backend(previous)


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pytest_report_header(config) -> list[str]:
    why = "" if metakernels.extension_available() else f" ({metakernels.extension_error()})"
    return [
        f"metakernels {metakernels.__version__}: extension_available={metakernels.extension_available()}{why}",
        f"metakernels CPU backends under test: {', '.join(BACKENDS)}",
        f"hypothesis profile: {os.environ.get('HYPOTHESIS_PROFILE', 'ci')}",
    ]
