"""Which kernels serve the metakernels ops.

CPU: the C++ extension (default), the pure-PyTorch references (METAKERNELS_NO_EXTENSION=1, or when the
extension is missing or fails to load: a warning names the cause once), or, for tests only, the Triton
kernels through the interpreter (METAKERNELS_TRITON_ON_CPU=1 with TRITON_INTERPRET=1, or
set_cpu_backend("triton")). CUDA: the Triton kernels.

Autograd of inner_step is the C++ kernel when the extension is loaded (it wraps whichever CPU kernel is
registered, so the Triton path is differentiated by the same code) and the Python one otherwise.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from . import ops
from .ops.inner_step import register_python_autograd as _register_inner_step_python_autograd
from .ops.inner_step import set_fast_entry as _set_inner_step_fast_entry

_BACKENDS = ("cpp", "reference", "triton")

_extension: ModuleType | None = None
_extension_error: str | None = None
_python_cpu_kernels: torch.library.Library | None = None
_python_autograd: torch.library.Library | None = None
_cuda_kernels: torch.library.Library | None = None
_cpu_backend: str | None = None


def _load_extension() -> None:
    global _extension, _extension_error
    if os.environ.get("METAKERNELS_NO_EXTENSION", "0") == "1":
        _extension_error = "disabled by METAKERNELS_NO_EXTENSION=1"
        return
    try:
        _extension = importlib.import_module("metakernels._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch ABI mismatch
        _extension_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"metakernels: the C++ extension could not be loaded ({_extension_error}); the pure-PyTorch "
            "reference kernels serve every op on the CPU (correct, slower). Rebuild with "
            "`pip install --no-build-isolation -e .` against torch==2.13.0.",
            RuntimeWarning,
            stacklevel=3,
        )


def extension_available() -> bool:
    """True when the compiled C++ CPU kernels are loaded and registered."""
    return _extension is not None


def extension_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    return _extension_error


def _kernel_table(module_name: str) -> dict[str, Callable]:
    """Op name -> kernel function, from metakernels.reference or metakernels.triton."""
    table: dict[str, Callable] = {}
    for op in ops.OP_NAMES:
        file = op.removesuffix("_backward").removesuffix("_out")
        module = importlib.import_module(f"metakernels.{module_name}.{file}")
        table[op] = getattr(module, op)
    return table


def set_cpu_backend(name: str) -> None:
    """Selects the kernels that serve CPU tensors: "cpp", "reference" or "triton" (interpreter; tests).

    Raises:
        ValueError: unknown name, "cpp" without the extension, or "triton" without TRITON_INTERPRET=1.
    """
    global _python_cpu_kernels, _cpu_backend
    if name not in _BACKENDS:
        raise ValueError(f"metakernels: backend must be one of {_BACKENDS}, got {name!r}")
    if name == "cpp" and _extension is None:
        raise ValueError(f"metakernels: the C++ extension is not available ({_extension_error})")
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("metakernels: the Triton kernels run on CPU tensors only with TRITON_INTERPRET=1 set "
                         "before metakernels is imported")
    if name == _cpu_backend:
        return
    if _python_cpu_kernels is not None:
        _python_cpu_kernels._destroy()
        _python_cpu_kernels = None
    if _extension is not None:
        _extension.unregister_cpu_kernels()
    if name == "cpp":
        _extension.register_cpu_kernels()
    else:
        lib = torch.library.Library("metakernels", "IMPL")
        for op, kernel in _kernel_table(name).items():
            lib.impl(op, kernel, "CPU")
        _python_cpu_kernels = lib
    _cpu_backend = name


def cpu_backend() -> str:
    """The name of the backend serving CPU tensors now."""
    assert _cpu_backend is not None
    return _cpu_backend


def _register_cuda_kernels() -> None:
    """Triton launchers for CUDA tensors, imported on first use so import metakernels needs no triton."""
    global _cuda_kernels
    lib = torch.library.Library("metakernels", "IMPL")

    def lazy(op: str) -> Callable:
        def kernel(*args, **kwargs):
            try:
                table = _kernel_table("triton")
            except ImportError as exc:
                raise RuntimeError(f"metakernels: CUDA tensors need triton==3.8.0 ({exc})") from exc
            return table[op](*args, **kwargs)

        return kernel

    for op in ops.OP_NAMES:
        lib.impl(op, lazy(op), "CUDA")
    _cuda_kernels = lib


def _initialise() -> None:
    global _python_autograd
    _load_extension()
    if _extension is not None:
        _extension.register_autograd_kernels()
        _set_inner_step_fast_entry(_extension.inner_step)
    else:
        _python_autograd = torch.library.Library("metakernels", "IMPL")
        _register_inner_step_python_autograd(_python_autograd)
    _register_cuda_kernels()
    if os.environ.get("METAKERNELS_TRITON_ON_CPU", "0") == "1":
        set_cpu_backend("triton")
    else:
        set_cpu_backend("cpp" if _extension is not None else "reference")


_initialise()
