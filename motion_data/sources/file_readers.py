"""Low-level readers of track files for the importers: ``.npy``/``.npz`` (header and
size checks before reading, no pickles), ``.pt`` (``torch.load(weights_only=True)``) and
HDF5 (h5py, optional). Every problem is a DataError whose one line starts with the path.
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from motion_data.common.errors import DataError, SettingError, one_line


def _h5py():
    try:
        import h5py
    except ImportError:
        raise SettingError("reading HDF5 (.h5/.hdf5) inputs needs h5py: pip install h5py") from None
    return h5py


def _torch():
    try:
        import torch
    except ImportError:
        raise SettingError("reading .pt inputs needs torch: pip install torch") from None
    return torch




def check_nonempty(path):
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        raise DataError(f"{path}: empty file")


def np_array(path, key, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise DataError(f"{path}: {key} is a pickled object array; refused (save plain numeric arrays)") from None
        raise DataError(f"{path}: cannot read {key}: {e}") from None


# deflate cannot expand data more than ~1032:1: a larger claim is a lying archive
_MAX_DEFLATE_RATIO = 1032


def check_npy_header(path, f, available: int, what: str):
    """Refuse an ``.npy`` stream whose header declares more data than the file holds.

    numpy allocates the declared array before reading it: a forged header could otherwise
    ask for terabytes (MemoryError) or, under memory overcommit, get the process killed.
    ``f`` is positioned at the start of the stream; ``available``: its bytes.
    """
    fmt = np.lib.format
    try:
        start = f.tell()
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            return  # let np.load report the unsupported version
        header = f.tell() - start
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"{path}: {what} is not a valid .npy array ({one_line(e)})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: {what} is a pickled object array; refused (save plain numeric arrays)")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > available - header:
        raise DataError(f"{path}: {what} is truncated or forged: its header declares shape {tuple(shape)} "
                         f"({declared} bytes), the file holds {max(0, available - header)}")


def load_npy(path) -> dict:
    check_nonempty(path)
    try:
        with open(path, "rb") as f:
            check_npy_header(path, f, os.path.getsize(path), "the array")
        arr = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path}: holds a pickled object array; refused (save plain numeric arrays)") from None
        raise DataError(f"{path}: not a valid .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a valid .npy file ({e})") from None
    return {"tracks": arr}


def load_npz(path) -> dict:
    check_nonempty(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for zi in zf.infolist():
                if not zi.filename.endswith(".npy"):
                    continue
                what = zi.filename[:-4]
                if zi.compress_type != zipfile.ZIP_STORED and zi.file_size > _MAX_DEFLATE_RATIO * max(zi.compress_size, 1):
                    raise DataError(f"{path}: {what} claims {zi.file_size} bytes from {zi.compress_size} compressed; "
                                     f"refused (not a plausible archive)")
                with zf.open(zi) as f:
                    check_npy_header(path, f, zi.file_size, what)
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: not an .npz archive")
            for k in z.files:
                try:
                    out[k] = z[k]
                except ValueError as e:
                    if "pickle" in str(e).lower():
                        raise DataError(f"{path}: {k} is a pickled object array; refused (save plain numeric arrays)") from None
                    raise DataError(f"{path}: cannot read {k} ({e})") from None
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"{path}: truncated or not a valid .npz archive ({type(e).__name__}: {e})".replace("\n", " ")) from None
    return out


def torch_load(path):
    check_nonempty(path)
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise DataError(f"{path}: {torch_load_problem(e, path)}") from None


def torch_load_problem(e: Exception, path=None) -> str:
    """One line out of torch's multi-paragraph load errors (which advise unsafe loading)."""
    text = str(e)
    if path is not None and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a torch zip archive without its end: cut short
                return "truncated torch file (the zip archive has no central directory)"
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"holds a pickled object ({m.group(1)}); refused (only tensors and plain containers are loaded)"
    if "Weights only load failed" in text or "invalid load key" in text:
        return "not a torch tensor file, or truncated (torch.load(weights_only=True) failed)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = re.split(r"(?<=\.)\s", first)[0]
    return f"cannot load with torch.load(weights_only=True): {type(e).__name__}: {first}"


def to_numpy(path, key, value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np_array(path, key, value)
    if arr.dtype == object:
        raise DataError(f"{path}: {key} is not a numeric array")
    return arr


def load_pt_tracks(path) -> dict:
    obj = torch_load(path)
    if isinstance(obj, dict):
        return {str(k): to_numpy(path, str(k), v) for k, v in obj.items()}
    return {"tracks": to_numpy(path, "tracks", obj)}


def open_h5(path):
    h5py = _h5py()
    check_nonempty(path)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: truncated or not a valid HDF5 file ({str(e).splitlines()[0]})") from None


def h5_root(f):
    return f["root"] if "root" in f else f


def h5_views(path, root, views) -> list[str]:
    h5py = _h5py()
    avail = sorted(k for k in root.keys() if isinstance(root[k], h5py.Group) and "tracks" in root[k])
    if views:
        missing = [v for v in views if v not in avail]
        if missing:
            raise DataError(f"{path}: view(s) {missing} not found (available: {avail})")
        return list(views)
    if not avail:
        raise DataError(f"{path}: no view group with a 'tracks' dataset")
    return avail


def h5_read(path, group, name):
    try:
        return np.asarray(group[name][()])
    except KeyError:
        raise DataError(f"{path}: missing dataset {group.name}/{name}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read {group.name}/{name} ({str(e).splitlines()[0]})") from None


def h5_vis(path, group):
    """``vis`` (this project's layout) or ``visibility`` (AMPLIFY's generic preprocessing); None if absent."""
    for name in ("vis", "visibility"):
        if name in group:
            return h5_read(path, group, name)
    return None


def finite_or_raise(path, key, arr):
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: {key} must be numeric, got dtype {arr.dtype}")
    return arr
