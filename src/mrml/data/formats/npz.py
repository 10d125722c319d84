"""Arrays from `.npz` archives, memory-mapped when stored uncompressed; never unpickled."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..safe_pickle import one_line, reject_web_page

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def _memmap_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + _LOCAL_HEADER + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("object arrays are not admitted")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def load_npz(path: Path, key: str) -> np.ndarray:
    """Array `key` of the archive `path`: memory-mapped if stored, else read once; DataError on any fault."""
    reject_web_page(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if key not in names:
                raise DataError(f"{path} has no {key!r} array (it has: {', '.join(names)})")
            info = zf.getinfo(key + ".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                arr = _memmap_member(path, info)
                if arr.nbytes <= info.file_size:
                    return arr
                raise EOFError("member shorter than its header says")
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is truncated or not an .npz archive ({one_line(exc)}): copy or download it again") from None
    except Exception as exc:  # malformed headers fail in numpy in several ways
        raise DataError(f"{path} is not a readable .npz archive ({type(exc).__name__}: {one_line(exc)})") from None
