"""Checkpoints and run files: written atomically (temp file in the same folder, fsync, rename), checked on load.

A checkpoint's `iteration` is the number of optimizer steps its parameters and optimizer state hold.
No write follows a symlink: temp files are created exclusively (O_EXCL|O_NOFOLLOW) and renamed over the
final name, which replaces a symlink placed there rather than writing through it; appends open with
O_NOFOLLOW and refuse anything but a regular file.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

FORMAT = "mrml-checkpoint-v1"
# key -> types a checkpoint must hold there (a tampered or truncated one is refused in one line)
# the files `mrml train` writes in its --out folder; a new run refuses a folder holding any of them
RUN_FILES = ("config.json", "final.json", "metrics.jsonl", "checkpoint.pt")
REQUIRED = {"config": (dict,), "iteration": (int,), "seconds": (int, float), "model": (dict,), "optimizer": (dict,)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def serializer_write_failed(exc: BaseException) -> bool:
    """Whether `exc` is torch.save's own report of a failed write (it gives no errno; on a full disk it says
    `PytorchStreamWriter failed writing file ...` or `[enforce fail at inline_container.cc:N] . unexpected pos ...`)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("PytorchStreamWriter failed" in text or (
        "inline_container.cc" in text and "unexpected pos" in text) or ("failed writing" in text and "file" in text))


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or quota) is full, or is a failed write of torch.save (most likely a full disk)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text or serializer_write_failed(exc)


def write_error(path: Path, exc: BaseException) -> UsageError:
    """One-line UsageError for a failed write of `path` (a full disk named as such)."""
    if serializer_write_failed(exc):
        return UsageError(f"writing {path} failed: the disk holding it is full (or failing): free some space, "
                          "then continue (the file it replaces is kept, nothing else was lost)")
    if disk_full(exc):
        return UsageError(f"the disk holding {path} is full: free some space, then continue (nothing else was lost)")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return UsageError(f"{path} is a symbolic link: mrml does not write through links; remove it "
                          "or choose another --out")
    return UsageError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path` (mode 0666 less the umask).

    The temp file is created exclusively and never through a link (mkstemp: O_EXCL|O_NOFOLLOW); the
    rename replaces whatever entry `path` is, a symlink included, so the file a link points to is never
    written. A failed write (a full disk, whatever the serializer says) is a one-line UsageError with
    `path` as it was.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and disk_full(e)):
            raise write_error(path, e) from None
        raise


# open flags that refuse a symlink and never block on a FIFO (POSIX; absent flags are 0 elsewhere)
_NO_LINK_NO_WAIT = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def append_bytes(path: Path, data: bytes) -> None:
    """Append `data` to `path` (created 0666 less the umask); a symlink, FIFO or other non-regular file
    there is refused in one line rather than written through (O_NOFOLLOW, O_NONBLOCK, fstat)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NO_LINK_NO_WAIT, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UsageError(f"{path} is not a regular file: remove it, then continue") from None
        raise write_error(path, e) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file: remove it, then continue")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        os.close(fd)


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


def load_tagged(path: Path, what: str, fmt: str, hint: str = "") -> dict[str, Any]:
    """One of mrml's own files read with `torch.load(weights_only=True)` (tensors and plain data only): its
    dict, or a one-line UsageError when it cannot be read or does not carry the format tag `fmt` (`what`
    names the kind of file, `hint` is added to that message)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is not ours
        raise UsageError(f"{path} is not an mrml {what} (could not read it: {type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UsageError(f"{path} is not an mrml {what} (expected format {fmt}{hint})")
    return data


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint of run folder `run_dir`; one-line UsageError when missing, foreign or tampered with."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.pt"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder: pass the --out folder of an mrml train run")
    if not path.is_file():
        from .runlock import holder

        pid = holder(run_dir)
        if pid is not None:  # alive, not stopped: it has not reached its first checkpoint yet
            raise UsageError(f"no checkpoint.pt in {run_dir} yet: its run is still going (pid {pid}) and writes one "
                             "every --checkpoint-every iterations and at its end; wait for it")
        if (run_dir / "config.json").is_file():  # killed before its first checkpoint, or the file went
            raise UsageError(f"no checkpoint.pt in {run_dir}: its run stopped before its first checkpoint (or the file "
                             f"was removed), so there is nothing to continue or load; start it afresh with "
                             f"`mrml train --config {run_dir / 'config.json'} --out NEW_FOLDER`")
        raise UsageError(f"no checkpoint.pt in {run_dir}: pass the --out folder of an mrml train run")
    state = load_tagged(path, "checkpoint", FORMAT)
    for key, types in REQUIRED.items():
        value = state.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise UsageError(f"{path} is damaged: {key!r} is {'missing' if key not in state else type(value).__name__}")
    if state["iteration"] < 0:
        raise UsageError(f"{path} is damaged: iteration {state['iteration']} < 0")
    return state
