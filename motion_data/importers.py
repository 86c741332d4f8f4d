"""Importers: track files of every supported format -> :class:`~motion_data.clips.Sequence`.

Formats (``fmt``):

``tracks``
    CoTracker-style track files. ``.npz`` holding ``tracks`` ``(T, N, 2)`` or
    ``(B, T, N, 2)`` float (x, y) pixels, optional ``visibility`` of the same leading shape
    (bool, or float probability where > 0.5 is visible), ``image_size`` ``(H, W)`` and
    ``start_frame`` (scalar or ``(B,)`` int: the source-video frame of each sequence's
    frame 0). ``.pt`` holds the same as a dict of tensors (or a bare tracks tensor).
    ``.npy`` holds the tracks array only. CoTracker's own key names ``pred_tracks`` and
    ``pred_visibility`` are accepted for ``tracks`` and ``visibility``. ``(B, T, N, 2)``
    without ``start_frame`` is B independent sequences (CoTracker's batch convention): the
    train/validation split treats each as its own source (``Sequence.group``); with
    ``start_frame`` they are windows of one video and stay together.
``amplify-h5``
    AMPLIFY's preprocessed LIBERO HDF5: ``root/<view>/tracks`` ``(n, 16, N, 2)`` and
    ``root/<view>/vis`` ``(n, 16, N)`` (``visibility`` is accepted too), pixels of a
    128 x 128 frame. Sequence i of a view starts at frame i (AMPLIFY re-initialises its
    query grid at every frame).
``atm-h5``
    ATM's HDF5: ``root/<view>/tracks`` ``(1, T, N, 2)`` normalised to [0, 1],
    ``root/<view>/vis`` ``(1, T, N)``; frame size from ``root/<view>/video``'s shape
    (channels first or last) or ``image_size``.
``laps-pt``
    One clip per ``.pt`` file: normalised velocities ``(T-1, N, 2)`` in [-1, 1] with scale
    ``(W-1)/2 = 7`` reference pixels (W = 15), every step valid. The format holds no
    positions: they are rebuilt by a cumulative sum of the pixel velocities starting at the
    frame centre ``(ref_size/2, ref_size/2)`` (``LAPS_ORIGIN``), so AMPLIFY-rule labels of
    such clips depend on that choice (a track can leave the frame and be clamped).

For the HDF5 formats the ``root`` group is optional (views may sit at the top level);
``views`` picks views (all views holding ``tracks`` when None).

``image_size`` (the argument) is the fallback frame size ``(H, W)`` for files that do not
carry one (``.npy``, a bare ``.pt`` tensor, an ATM file without ``video``); a frame size
stored in the file wins. Coordinates are rescaled to a ``ref_size`` square frame.

Auto-detection (``fmt="auto"``, :func:`detect_format`):

- ``.npz`` / ``.npy`` -> ``tracks``.
- ``.h5`` / ``.hdf5``: the first view's ``tracks``. Rank 4 with ``n > 1``, or
  ``shape[1] == 16`` and some coordinate > 1 -> ``amplify-h5``; else coordinates all within
  [0, 1] -> ``atm-h5``; anything else cannot be detected (InputError).
- ``.pt``: a dict with ``tracks`` -> ``tracks``; a rank-3 ``(T-1, N, 2)`` tensor with all
  values in [-1, 1] -> ``laps-pt``; another rank-3/4 tensor -> ``tracks``.

Safety: nothing is unpickled (``np.load(allow_pickle=False)``,
``torch.load(weights_only=True)``). Every problem (empty or truncated file, wrong ranks or
keys, NaN/inf, zero points) raises :class:`InputError` with a one-line message starting with
the path. A whole file is read and checked before its first Sequence is yielded, so a bad
file yields nothing.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .clips import InputError, Sequence, tracks_to_sequence
from .labels import DEFAULT_REF_SIZE, half_window

FORMATS = ("tracks", "amplify-h5", "atm-h5", "laps-pt")
TRACK_EXTS = (".npz", ".npy", ".pt")
H5_EXTS = (".h5", ".hdf5")
SUPPORTED_EXTS = TRACK_EXTS + H5_EXTS
AMPLIFY_FRAME = 128
LAPS_SCALE = half_window()  # (W-1)/2 with the default W = 15
LAPS_ORIGIN = 0.5  # laps-pt positions start at the frame centre, in units of ref_size


class MissingDependency(ImportError):
    """An optional package needed for a format is not installed."""


def _h5py():
    try:
        import h5py
    except ImportError:
        raise MissingDependency("reading HDF5 (.h5/.hdf5) inputs needs h5py: pip install h5py") from None
    return h5py


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependency("reading .pt inputs needs torch: pip install torch") from None
    return torch


# ---------------------------------------------------------------- listing / detection


def list_inputs(paths) -> list[str]:
    """Files to import: folders are searched recursively for supported files
    (``.npz .npy .pt .h5 .hdf5``; a laps-pt folder is just a folder of ``.pt`` files, one
    input each); files are taken as given. Returns a sorted, de-duplicated list of str.
    A missing path raises InputError; a folder with no supported file gives no inputs.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, _dirs, files in os.walk(p):
                for f in files:
                    if f.lower().endswith(SUPPORTED_EXTS):
                        out.add(str(Path(root) / f))
        elif p.is_file():
            out.add(str(p))
        else:
            raise InputError(f"{p}: no such file or folder")
    return sorted(out)


def _ext(path) -> str:
    return Path(path).suffix.lower()


def detect_format(path) -> str:
    """The format of ``path`` (see the module docstring for the rules)."""
    path = str(path)
    ext = _ext(path)
    if ext in (".npz", ".npy"):
        return "tracks"
    if ext in H5_EXTS:
        with _open_h5(path) as f:
            root = _h5_root(f)
            views = _h5_views(path, root, None)
            ds = root[views[0]]["tracks"]
            shape = ds.shape
            if len(shape) != 4 or shape[-1] != 2:
                raise InputError(f"{path}: cannot detect format: {views[0]}/tracks has shape {shape}, expected (n,T,N,2)")
            data = _finite_or_raise(path, f"{views[0]}/tracks", ds[: min(shape[0], 4)])
            big = data.size > 0 and float(np.abs(data).max()) > 1.0
            if shape[0] > 1 or (shape[1] == 16 and big):
                return "amplify-h5"
            if not big and data.size > 0 and float(data.min()) >= 0.0:
                return "atm-h5"
            raise InputError(f"{path}: cannot detect format: {views[0]}/tracks {shape} is neither AMPLIFY "
                             "pixels (n,16,N,2) nor ATM [0,1] coordinates (1,T,N,2); pass --format")
    if ext == ".pt":
        obj = _torch_load(path)
        if isinstance(obj, dict):
            if "tracks" in obj or "pred_tracks" in obj:
                return "tracks"
            raise InputError(f"{path}: cannot detect format: dict without 'tracks' (keys {sorted(map(str, obj))})")
        arr = _to_numpy(path, "tensor", obj)
        if arr.ndim == 3 and arr.shape[-1] == 2 and arr.size and np.isfinite(arr).all() and np.abs(arr).max() <= 1.0:
            return "laps-pt"
        if arr.ndim in (3, 4):
            return "tracks"
        raise InputError(f"{path}: cannot detect format: tensor of shape {arr.shape}")
    raise InputError(f"{path}: cannot detect format from extension {ext!r} (supported: {' '.join(SUPPORTED_EXTS)})")


# ---------------------------------------------------------------- low-level readers


def _check_nonempty(path):
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        raise InputError(f"{path}: empty file")


def _np_array(path, key, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise InputError(f"{path}: {key} is a pickled object array; refused (save plain numeric arrays)") from None
        raise InputError(f"{path}: cannot read {key}: {e}") from None


# deflate cannot expand data more than ~1032:1: a larger claim is a lying archive
_MAX_DEFLATE_RATIO = 1032


def _check_npy_header(path, f, available: int, what: str):
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
        raise InputError(f"{path}: {what} is not a valid .npy array ({' '.join(str(e).split())})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: {what} is a pickled object array; refused (save plain numeric arrays)")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > available - header:
        raise InputError(f"{path}: {what} is truncated or forged: its header declares shape {tuple(shape)} "
                         f"({declared} bytes), the file holds {max(0, available - header)}")


def _load_npy(path) -> dict:
    _check_nonempty(path)
    try:
        with open(path, "rb") as f:
            _check_npy_header(path, f, os.path.getsize(path), "the array")
        arr = np.load(path, allow_pickle=False)
    except InputError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise InputError(f"{path}: holds a pickled object array; refused (save plain numeric arrays)") from None
        raise InputError(f"{path}: not a valid .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: not a valid .npy file ({e})") from None
    return {"tracks": arr}


def _load_npz(path) -> dict:
    _check_nonempty(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for zi in zf.infolist():
                if not zi.filename.endswith(".npy"):
                    continue
                what = zi.filename[:-4]
                if zi.compress_type != zipfile.ZIP_STORED and zi.file_size > _MAX_DEFLATE_RATIO * max(zi.compress_size, 1):
                    raise InputError(f"{path}: {what} claims {zi.file_size} bytes from {zi.compress_size} compressed; "
                                     f"refused (not a plausible archive)")
                with zf.open(zi) as f:
                    _check_npy_header(path, f, zi.file_size, what)
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise InputError(f"{path}: not an .npz archive")
            for k in z.files:
                try:
                    out[k] = z[k]
                except ValueError as e:
                    if "pickle" in str(e).lower():
                        raise InputError(f"{path}: {k} is a pickled object array; refused (save plain numeric arrays)") from None
                    raise InputError(f"{path}: cannot read {k} ({e})") from None
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise InputError(f"{path}: truncated or not a valid .npz archive ({type(e).__name__}: {e})".replace("\n", " ")) from None
    return out


def _torch_load(path):
    _check_nonempty(path)
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise InputError(f"{path}: {_torch_load_problem(e, path)}") from None


def _torch_load_problem(e: Exception, path=None) -> str:
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


def _to_numpy(path, key, value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = _np_array(path, key, value)
    if arr.dtype == object:
        raise InputError(f"{path}: {key} is not a numeric array")
    return arr


def _load_pt_tracks(path) -> dict:
    obj = _torch_load(path)
    if isinstance(obj, dict):
        return {str(k): _to_numpy(path, str(k), v) for k, v in obj.items()}
    return {"tracks": _to_numpy(path, "tracks", obj)}


def _open_h5(path):
    h5py = _h5py()
    _check_nonempty(path)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: truncated or not a valid HDF5 file ({str(e).splitlines()[0]})") from None


def _h5_root(f):
    return f["root"] if "root" in f else f


def _h5_views(path, root, views) -> list[str]:
    h5py = _h5py()
    avail = sorted(k for k in root.keys() if isinstance(root[k], h5py.Group) and "tracks" in root[k])
    if views:
        missing = [v for v in views if v not in avail]
        if missing:
            raise InputError(f"{path}: view(s) {missing} not found (available: {avail})")
        return list(views)
    if not avail:
        raise InputError(f"{path}: no view group with a 'tracks' dataset")
    return avail


def _h5_read(path, group, name):
    try:
        return np.asarray(group[name][()])
    except KeyError:
        raise InputError(f"{path}: missing dataset {group.name}/{name}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read {group.name}/{name} ({str(e).splitlines()[0]})") from None


def _h5_vis(path, group):
    """``vis`` (the issue's layout) or ``visibility`` (AMPLIFY's generic preprocessing); None if absent."""
    for name in ("vis", "visibility"):
        if name in group:
            return _h5_read(path, group, name)
    return None


def _finite_or_raise(path, key, arr):
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{path}: {key} must be numeric, got dtype {arr.dtype}")
    return arr


# ---------------------------------------------------------------- format readers


def _image_size(path, value, fallback):
    if value is None:
        value = fallback
    if value is None:
        raise InputError(f"{path}: no image_size in the file; pass --image-size H W")
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 2 or not np.isfinite(arr).all() or (arr <= 0).any():
        raise InputError(f"{path}: image_size must be two positive numbers (H, W), got {np.asarray(value).tolist()}")
    return (float(arr[0]), float(arr[1]))


def _batched(path, tracks, vis, start_frame, kind="tracks"):
    """Bring tracks to (B, T, N, 2), vis to (B, T, N) or None, start_frame to (B,) int."""
    tracks = _finite_or_raise(path, kind, tracks)
    if tracks.ndim == 3:
        tracks = tracks[None]
        if vis is not None:
            vis = np.asarray(vis)[None]
    if tracks.ndim != 4 or tracks.shape[-1] != 2:
        raise InputError(f"{path}: {kind} must be (T, N, 2) or (B, T, N, 2), got shape {tracks.shape}")
    B, T, N, _ = tracks.shape
    if B == 0 or T == 0 or N == 0:
        raise InputError(f"{path}: {kind} is empty (shape {tracks.shape}: zero sequences, frames or points)")
    if vis is not None:
        vis = np.asarray(vis)
        if vis.dtype != np.bool_ and not np.issubdtype(vis.dtype, np.number):
            raise InputError(f"{path}: visibility must be bool or numeric, got dtype {vis.dtype}")
        if vis.shape != (B, T, N):
            raise InputError(f"{path}: visibility shape {vis.shape} does not match tracks {tracks.shape[:-1]}")
    if start_frame is None:
        sf = np.zeros(B, np.int64)
    else:
        sf = np.asarray(start_frame)
        if not np.issubdtype(sf.dtype, np.number) or not np.isfinite(sf).all():
            raise InputError(f"{path}: start_frame must be integers, got {sf!r}")
        if sf.ndim == 0:
            sf = np.full(B, int(sf), np.int64)
        elif sf.shape != (B,):
            raise InputError(f"{path}: start_frame must be a scalar or ({B},), got shape {sf.shape}")
        sf = sf.astype(np.int64)
    return tracks, vis, sf


def _sequences(path, tracks, vis, sf, image_size, ref_size, index0=0, independent=False):
    """Sequences of a batched file; ``independent``: each is its own split group (DESIGN.md)."""
    out = []
    for b in range(tracks.shape[0]):
        group = f"{path}#{index0 + b}" if independent and tracks.shape[0] > 1 else path
        try:
            out.append(tracks_to_sequence(path, index0 + b, tracks[b], None if vis is None else vis[b],
                                          image_size, ref_size, int(sf[b]), group))
        except InputError as e:
            # tracks_to_sequence names "path[i]"; keep the path first, one line
            raise InputError(str(e).replace("\n", " ")) from None
    return out


def _read_tracks(path, ref_size, image_size) -> list[Sequence]:
    ext = _ext(path)
    if ext == ".npz":
        d = _load_npz(path)
    elif ext == ".npy":
        d = _load_npy(path)
    elif ext == ".pt":
        d = _load_pt_tracks(path)
    else:
        raise InputError(f"{path}: track files must be .npz, .npy or .pt, got {ext!r}")
    key = next((k for k in ("tracks", "pred_tracks") if k in d), None)  # ours, CoTracker's
    if key is None:
        raise InputError(f"{path}: missing key 'tracks' or 'pred_tracks' (keys: {sorted(d)})")
    vis = next((d[k] for k in ("visibility", "vis", "pred_visibility") if k in d), None)
    tracks, vis, sf = _batched(path, d[key], vis, d.get("start_frame"))
    size = _image_size(path, d.get("image_size"), image_size)
    return _sequences(path, tracks, vis, sf, size, ref_size, independent="start_frame" not in d)


def _h5_view_tracks(path, views, expected: str):
    """``(view, group, tracks, vis)`` of each selected view of an HDF5 track file (kept open
    while the caller's loop body runs)."""
    with _open_h5(path) as f:
        root = _h5_root(f)
        for view in _h5_views(path, root, views):
            g = root[view]
            tracks = _h5_read(path, g, "tracks")
            vis = _h5_vis(path, g)
            if tracks.ndim != 4:
                raise InputError(f"{path}: {view}/tracks must be {expected}, got shape {tracks.shape}")
            yield view, g, tracks, vis


def _read_amplify(path, ref_size, views) -> list[Sequence]:
    out = []
    for view, _, tracks, vis in _h5_view_tracks(path, views, "(n, T, N, 2)"):
        tracks, vis, sf = _batched(path, tracks, vis, np.arange(tracks.shape[0]), f"{view}/tracks")
        out += _sequences(path, tracks, vis, sf, (AMPLIFY_FRAME, AMPLIFY_FRAME), ref_size, len(out))
    return out


def _video_size(video_shape):
    """(H, W) from a video dataset shape, channels first (..., C, H, W) or last (..., H, W, C)."""
    if len(video_shape) < 3:
        return None
    if video_shape[-1] in (1, 3, 4):
        return video_shape[-3], video_shape[-2]
    return video_shape[-2], video_shape[-1]


def _read_atm(path, ref_size, image_size, views) -> list[Sequence]:
    out = []
    for view, g, tracks, vis in _h5_view_tracks(path, views, "(1, T, N, 2)"):
        tracks, vis, sf = _batched(path, tracks, vis, None, f"{view}/tracks")
        size = _image_size(path, _video_size(g["video"].shape) if "video" in g else None, image_size)
        # normalised [0, 1] -> pixels of the frame (x by W, y by H)
        px = tracks.astype(np.float64) * np.array([size[1], size[0]])
        out += _sequences(path, px, vis, sf, size, ref_size, len(out))
    return out


def _read_laps(path, ref_size) -> list[Sequence]:
    obj = _torch_load(path)
    if isinstance(obj, dict):
        keys = [k for k in ("velocities", "vel", "velocity") if k in obj]
        if not keys:
            raise InputError(f"{path}: laps-pt file holds a dict without a velocity tensor (keys {sorted(map(str, obj))})")
        obj = obj[keys[0]]
    v = _finite_or_raise(path, "velocities", _to_numpy(path, "velocities", obj)).astype(np.float64)
    if v.ndim != 3 or v.shape[-1] != 2:
        raise InputError(f"{path}: laps-pt velocities must be (T-1, N, 2), got shape {v.shape}")
    if v.shape[0] < 1 or v.shape[1] < 1:
        raise InputError(f"{path}: laps-pt velocities are empty (shape {v.shape})")
    if not np.isfinite(v).all():
        t, n = np.argwhere(~np.isfinite(v).all(-1))[0]
        raise InputError(f"{path}: non-finite velocity at step {t}, point {n}")
    if np.abs(v).max() > 1.0 + 1e-6:
        raise InputError(f"{path}: laps-pt velocities must be normalised to [-1, 1], max |v| = {np.abs(v).max():.3g}")
    # positions by a cumulative sum from the frame centre (module docstring)
    start = np.full((1, v.shape[1], 2), LAPS_ORIGIN * ref_size)
    pos = np.concatenate([start, start + np.cumsum(v * LAPS_SCALE, axis=0)]).astype(np.float32)
    return [Sequence(path, 0, pos, np.ones(pos.shape[:2], bool), 0)]


def read_sequences(path, fmt: str = "auto", *, ref_size: int = DEFAULT_REF_SIZE, image_size=None,
                   views=None) -> list[Sequence]:
    """All sequences of one input file, fully checked (see :func:`iter_sequences`)."""
    path = str(path)
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"tracks": lambda: _read_tracks(path, ref_size, image_size),
               "amplify-h5": lambda: _read_amplify(path, ref_size, views),
               "atm-h5": lambda: _read_atm(path, ref_size, image_size, views),
               "laps-pt": lambda: _read_laps(path, ref_size)}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; choose auto or one of {FORMATS}")
    try:
        return readers[fmt]()
    except MemoryError as e:  # e.g. an HDF5 dataset declaring an enormous shape
        raise InputError(f"{path}: too large to load ({' '.join(str(e).split())})") from None


def iter_sequences(path, fmt: str = "auto", *, ref_size: int = DEFAULT_REF_SIZE, image_size=None,
                   views=None) -> Iterator[Sequence]:
    """Yield the :class:`Sequence` s of one input file.

    ``fmt``: ``auto`` or one of :data:`FORMATS`; ``ref_size``: side of the reference frame
    velocities are expressed in; ``image_size``: fallback ``(H, W)`` for files without one;
    ``views``: HDF5 views to read (all when None). Raises InputError ("<path>: <problem>")
    before yielding anything when the file is bad.
    """
    yield from read_sequences(path, fmt, ref_size=ref_size, image_size=image_size, views=views)
