"""The backend registry tells the truth: which kernels serve the ops, and why the extension is absent."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import metakernels as mk
from metakernels import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)


def test_extension_available_matches_the_registered_backend():
    if os.environ.get("METAKERNELS_NO_EXTENSION") == "1":
        assert not mk.extension_available()
        assert "METAKERNELS_NO_EXTENSION" in mk.extension_error()
    if mk.extension_available():
        assert mk.extension_error() is None
        assert mk._backend._extension.openmp_enabled()


def test_broken_extension_warns_once_with_the_cause_and_references_serve():
    code = """
        import sys, warnings, importlib.abc
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "metakernels._C":
                    raise ImportError("undefined symbol: _ZN3c10fake (simulated torch ABI mismatch)")
        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, metakernels as mk
            import metakernels  # a second import must not warn again
        msgs = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "undefined symbol" in msgs[0], msgs[0]
        assert not mk.extension_available() and mk.cpu_backend() == "reference"
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        out = mk.inner_step(x, x * 2, 0.1)
        assert torch.allclose(out, x - 0.1 * 2 * x)
        out.sum().backward()  # Python autograd registered in place of the C++ one
        assert torch.allclose(x.grad, torch.full_like(x, 1 - 0.2))
        print("ok")
    """
    result = run_python(code, METAKERNELS_NO_EXTENSION="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_extension_env_disables_without_warning():
    code = """
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            import metakernels as mk
        assert not mk.extension_available() and mk.cpu_backend() == "reference"
        print(mk.extension_error())
    """
    result = run_python(code, METAKERNELS_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "disabled by METAKERNELS_NO_EXTENSION=1" in result.stdout


def test_set_cpu_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.set_cpu_backend("fortran")
    if not mk.extension_available():
        with pytest.raises(ValueError, match="extension is not available"):
            _backend.set_cpu_backend("cpp")


def test_switching_backends_changes_the_kernel_and_restores():
    previous = _backend.cpu_backend()
    x = torch.randn(2, 3, dtype=torch.float64)
    try:
        outs = {}
        for name in ("reference",) + (("cpp",) if mk.extension_available() else ()):
            _backend.set_cpu_backend(name)
            assert _backend.cpu_backend() == name
            outs[name] = mk.inner_step(x, x, 0.5)
        for out in outs.values():
            torch.testing.assert_close(out, 0.5 * x, rtol=1e-15, atol=1e-15)
    finally:
        _backend.set_cpu_backend(previous)


def test_ops_appear_under_their_names_in_the_profiler():
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5, requires_grad=True)  # d_grad is needed, so the fused backward runs
    with torch.profiler.profile() as prof:
        mk.inner_step(x, g, 0.1).sum().backward()
        mk.reptile_update(x.detach()[0], x.detach(), 0.5)
    names = {e.name for e in prof.events()}
    assert {"metakernels::inner_step", "metakernels::inner_step_backward", "metakernels::reptile_update"} <= names


def test_fast_entry_is_the_same_dispatcher_op():
    """With the extension, metakernels.inner_step skips the boxed torch.ops call; results, gradients,
    errors and the profiler record must be those of torch.ops.metakernels.inner_step."""
    module = importlib.import_module("metakernels.ops.inner_step")  # the package exports the function

    if not mk.extension_available():
        assert module._fast_entry is None
        return
    assert module._fast_entry is not None
    theta = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fast = mk.inner_step(theta, grad, lr, weight_decay=0.1)
    boxed = torch.ops.metakernels.inner_step(theta, grad, lr, None, None, 0.0, 0.1)
    assert torch.equal(fast, boxed)
    g_fast = torch.autograd.grad(fast.square().sum(), (theta, grad, lr))
    g_boxed = torch.autograd.grad(boxed.square().sum(), (theta, grad, lr))
    for a, b in zip(g_fast, g_boxed, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="grad must have the shape of theta"):
        mk.inner_step(theta, grad[:2], lr)
    with torch.profiler.profile() as prof:
        mk.inner_step(theta.detach(), grad.detach(), 0.1)
    assert "metakernels::inner_step" in {e.name for e in prof.events()}
