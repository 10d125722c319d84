"""Read pickles from the internet without running them: only numpy arrays, dtypes and plain containers.

A pickle names the globals it needs (`module.name`) and calls them while loading; that is how a
file runs code. `RestrictedUnpickler` admits only the few globals that rebuild numpy arrays,
scalars and dtypes (and `_codecs.encode`, which Python 3 uses for `bytes` in protocol-2 pickles)
and refuses everything else before it is imported, so nothing in a refused file runs.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import os
import pickle
import stat
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import DataError

# (module, name) as written in the file -> (module to import, attribute)
_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    ("builtins", "set"): ("builtins", "set"),
    ("builtins", "frozenset"): ("builtins", "frozenset"),
    ("builtins", "bytearray"): ("builtins", "bytearray"),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = ("numpy._core.multiarray", "_reconstruct")
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = ("numpy._core.multiarray", "scalar")
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = ("numpy._core.numeric", "_frombuffer")

_HEAD = 512


def _resolve(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # numpy < 2 has numpy.core, not numpy._core
        return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), name)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that admits only numpy arrays/scalars/dtypes and plain containers."""

    def __init__(self, file: Any, path: Path | str, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (copy_reg, __builtin__) -> Python 3 names; Python 3 names pass unchanged
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        target = _ALLOWED.get((module, name))
        if target is None:
            raise DataError(
                f"refused to load {self.path}: it asks for the global {module}.{name}, which is not a "
                "numpy array, dtype or plain container (nothing in the file was run)"
            )
        return _resolve(*target)


class _Progress:
    """A binary file whose reads advance a progress bar (what the unpickler needs: read, readline)."""

    def __init__(self, file: Any, bar: tqdm):
        self.file, self.bar = file, bar

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        self.bar.update(len(data))
        return data

    def readline(self) -> bytes:
        line = self.file.readline()
        self.bar.update(len(line))
        return line


def one_line(text: object) -> str:
    """`text` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def require_regular_file(path: Path) -> None:
    """DataError unless `path` is a regular file: opening a FIFO blocks until something writes to it, and a
    device or socket is no dataset file (checked with stat, before any open)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        what = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise DataError(f"{path} is {what}, not a data file: replace it with the dataset's file")


def read_head(path: Path, n: int = _HEAD) -> bytes:
    require_regular_file(path)
    with open(path, "rb") as f:
        return f.read(n)


def reject_web_page(path: Path, head: bytes | None = None) -> None:
    """Raise DataError when `path` is empty or an HTML page (what a dead download link returns)."""
    head = read_head(path) if head is None else head
    if not head:
        raise DataError(f"{path} is empty (0 bytes): the download or copy failed; fetch it again")
    if head.lstrip()[:1] == b"<":
        raise DataError(
            f"{path} is a web page (HTML), not data: the download failed and returned a web page "
            "instead of the file; download it again from a working source"
        )


def load_pickle(path: Path, encoding: str = "latin1", progress: bool = True) -> Any:
    """Load a pickle with `RestrictedUnpickler`; every failure is a one-line DataError naming the file.

    `encoding` decodes Python-2 `str` objects: 'latin1' (numpy arrays of Python-2 pickles) or 'bytes'.
    """
    path = Path(path)
    reject_web_page(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as raw, tqdm(
            total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=not progress, leave=False
        ) as bar:
            return RestrictedUnpickler(_Progress(raw, bar), path, encoding=encoding).load()
    except DataError:
        raise
    except EOFError:
        raise DataError(f"{path} is truncated (it ends in the middle of the data): copy or download it again") from None
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc):
            raise DataError(
                f"{path} is truncated (it ends in the middle of the data): copy or download it again"
            ) from None
        raise DataError(f"{path} is not a readable pickle ({one_line(exc)})") from None
    except MemoryError:
        raise DataError(f"{path} does not fit in memory ({size / 2**30:.1f} GiB)") from None
    except Exception as exc:  # a malformed file can fail inside numpy or the pickle machine in many ways
        raise DataError(f"{path} is not a readable pickle ({type(exc).__name__}: {one_line(exc)})") from None
