"""Crash-safe checkpoints: a checkpoint file is either the previous complete one or the new complete one.

The state is written to a temporary file in the same directory, flushed and fsync'ed, then moved over the
checkpoint with os.replace (atomic on POSIX), and the directory is fsync'ed so the rename itself survives a
power loss. A process killed at any instant (SIGKILL included) leaves a loadable checkpoint behind, plus at
worst a stale temporary file, which the next save in that directory removes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
#: Bumped when the layout of the saved dictionary changes incompatibly.
CHECKPOINT_FORMAT = 1
_TMP_MARK = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems / platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes temporary files that an interrupted save of ``path`` left behind; returns what it removed."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``state`` (torch.save-able: tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, of another format, or from an incompatible run."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint written by save_checkpoint (tensors on the CPU, no arbitrary code: weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / foreign file: say which file and why
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a metakernels checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
    return state
