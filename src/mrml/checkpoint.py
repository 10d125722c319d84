"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), checked on load."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

FORMAT = "mrml-checkpoint-v1"


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint of run folder `run_dir`; one-line UsageError when missing or foreign."""
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
    return state
