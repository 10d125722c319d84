"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), checked on load.

A checkpoint's `iteration` is the number of optimizer steps its parameters and optimizer state hold.
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

FORMAT = "mrml-checkpoint-v1"
# key -> types a checkpoint must hold there (a tampered or truncated one is refused in one line)
REQUIRED = {"config": (dict,), "iteration": (int,), "seconds": (int, float), "model": (dict,), "optimizer": (dict,)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or quota) is full; torch.save reports it as a RuntimeError."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text or (
        isinstance(exc, RuntimeError) and "failed writing" in text and "file" in text)


def write_error(path: Path, exc: BaseException) -> UsageError:
    """One-line UsageError for a failed write of `path` (a full disk named as such)."""
    if disk_full(exc):
        return UsageError(f"the disk holding {path} is full: free some space, then continue (nothing else was lost)")
    return UsageError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path` (mode 0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)) and disk_full(e):
            raise write_error(path, e) from None
        raise


def remove_stale_temps(folder: Path, name: str) -> None:
    """Delete temp files `.NAME.*` that a killed `atomic_write` of `folder/NAME` left behind."""
    for tmp in Path(folder).glob(f".{name}.*"):
        tmp.unlink(missing_ok=True)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(finite_or_none(obj), allow_nan=False, **kw)


def atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((strict_dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint of run folder `run_dir`; one-line UsageError when missing, foreign or tampered with."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.pt"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder: pass the --out folder of an mrml train run")
    if not path.is_file():
        raise UsageError(f"no checkpoint.pt in {run_dir}: pass the --out folder of an mrml train run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is not ours
        raise UsageError(f"{path} is not an mrml checkpoint (could not read it: {type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not an mrml checkpoint (expected format {FORMAT})")
    for key, types in REQUIRED.items():
        value = state.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise UsageError(f"{path} is damaged: {key!r} is {'missing' if key not in state else type(value).__name__}")
    if state["iteration"] < 0:
        raise UsageError(f"{path} is damaged: iteration {state['iteration']} < 0")
    return state
