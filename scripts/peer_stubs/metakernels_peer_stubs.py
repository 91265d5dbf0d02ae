"""Import-time stand-ins for torchvision and gym, installed by scripts/install_peers.sh.

learn2learn imports torchvision and gym when it is imported (for its datasets and RL environments),
but its meta-learning algorithms (MAML, MetaSGD, clone_module, ...) use neither. The real torchvision
needs a torch build of its own, and gym is unmaintained, so the peer cross-checks install these stubs
instead: each module lets learn2learn's module-level imports, subclassing and gym's ``register``
succeed, and every stand-in raises ImportError as soon as it is called or instantiated.

install_peers.sh never stubs a package that is really installed. To install the real torchvision or gym
later, first ``pip uninstall metakernels-peer-stubs`` (its file list would otherwise cover theirs).
"""

from __future__ import annotations

import sys
import types

STUB_MARKER = "__metakernels_peer_stub__"


def _unavailable(package: str, qualname: str) -> type:
    """A class that can be imported and subclassed but not instantiated."""

    def __new__(cls, *args, **kwargs):
        raise ImportError(
            f"{package} is not installed: {qualname} is a stand-in from metakernels-peer-stubs "
            f"(scripts/install_peers.sh), which only lets learn2learn import"
        )

    return type(qualname.rsplit(".", 1)[-1], (), {"__new__": __new__, "__module__": qualname.rsplit(".", 1)[0]})


def _module_getattr(package: str, module_name: str):
    def __getattr__(name: str):
        if name.startswith("__"):  # __path__, __file__, __wrapped__, ...: genuinely absent
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return _unavailable(package, f"{module_name}.{name}")

    return __getattr__


def install(package: str, version: str, submodules: list[str], attrs: dict[str, dict] | None = None) -> None:
    """Registers stub submodules of ``package`` (already being imported) in sys.modules."""
    attrs = attrs or {}
    root = sys.modules[package]
    setattr(root, STUB_MARKER, True)
    root.__version__ = version
    root.__getattr__ = _module_getattr(package, package)
    for name, value in attrs.get(package, {}).items():
        setattr(root, name, value)
    for sub in submodules:
        full = f"{package}.{sub}"
        mod = types.ModuleType(full, f"Stand-in for {full} (metakernels-peer-stubs).")
        setattr(mod, STUB_MARKER, True)
        mod.__getattr__ = _module_getattr(package, full)
        for name, value in attrs.get(full, {}).items():
            setattr(mod, name, value)
        sys.modules[full] = mod
        parent, _, leaf = full.rpartition(".")
        setattr(sys.modules[parent], leaf, mod)
