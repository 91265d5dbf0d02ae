"""The peer meta-learning libraries as the benchmarks use them: importing them, their versions, and how far two
meta-gradients are apart.

The peers (learn2learn, higher, torchopt) are optional: scripts/install_peers.sh installs them. learn2learn
imports torchvision and gym at import time, which its algorithms never use; install_peers.sh installs
stand-ins for them (scripts/peer_stubs, as the package metakernels-peer-stubs). When that package is not
installed, import_peer puts scripts/peer_stubs on sys.path and tries once more, so a checkout whose venv has
only learn2learn itself still runs the benchmark.

Use:
    from _peers import import_peer, peer_versions, deviation
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent
PEER_STUBS = REPO / "scripts" / "peer_stubs"
PEERS = ("learn2learn", "higher", "torchopt")

_cache: dict[str, tuple[ModuleType | None, str | None]] = {}


def _import(name: str) -> ModuleType:
    with warnings.catch_warnings():  # the peers' own import-time deprecation warnings
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def import_peer(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) if the peer imports, else (None, why). Cached.

    Args:
        name: "learn2learn", "higher" or "torchopt".

    Returns:
        The module or None, and the reason it is missing (None when it imported).
    """
    if name in _cache:
        return _cache[name]
    try:
        result: tuple[ModuleType | None, str | None] = (_import(name), None)
    except ImportError as exc:
        result = (None, f"{type(exc).__name__}: {exc}")
        # learn2learn without the torchvision/gym stand-ins installed: use them from the checkout.
        missing = getattr(exc, "name", "") or ""
        if name == "learn2learn" and missing.split(".")[0] in ("torchvision", "gym") and PEER_STUBS.is_dir():
            sys.path.insert(0, str(PEER_STUBS))
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]  # a half-imported learn2learn
            try:
                result = (_import(name), None)
            except ImportError as exc2:
                result = (None, f"{type(exc2).__name__}: {exc2} (also with scripts/peer_stubs on sys.path)")
    except Exception as exc:  # a peer that is installed but broken is reported, not fatal
        result = (None, f"{type(exc).__name__}: {exc}")
    _cache[name] = result
    return result


def peer_versions() -> dict[str, str | None]:
    """Version of torch and of every peer that imports (None for one that does not)."""
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in PEERS:
        module, _ = import_peer(name)
        if module is None:
            out[name] = None
            continue
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(name)
            except Exception:
                version = "unknown"
        out[name] = str(version)
    return out


def deviation(grads: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> dict[str, float]:
    """How far a meta-gradient is from a reference one.

    The relative deviation is normalised by the largest reference entry over all parameters, not per
    tensor: some entries are zero in exact arithmetic (a conv bias followed by training-mode BatchNorm has a
    zero gradient; float rounding leaves ~1e-17 there), and a per-tensor ratio would report that noise as a
    large relative error.

    Args:
        grads: the meta-gradient, one tensor per parameter.
        reference: the reference meta-gradient, same shapes.

    Returns:
        {"max_abs": max |g - r|, "scale": max |r|, "rel": max_abs / scale}.
    """
    if len(grads) != len(reference):
        raise ValueError(f"deviation: {len(grads)} gradients against {len(reference)} reference tensors")
    max_abs, scale = 0.0, 0.0
    for g, r in zip(grads, reference, strict=True):
        if g.shape != r.shape:
            raise ValueError(f"deviation: gradient of shape {list(g.shape)} against reference {list(r.shape)}")
        r64 = r.detach().double()
        max_abs = max(max_abs, (g.detach().double() - r64).abs().max().item())
        scale = max(scale, r64.abs().max().item())
    return {"max_abs": max_abs, "scale": scale, "rel": max_abs / scale if scale > 0 else float("inf")}
