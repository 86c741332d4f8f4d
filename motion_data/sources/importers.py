"""Importers: track files of every supported format -> :class:`~motion_data.common.clips.Sequence`.

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
  [0, 1] -> ``atm-h5``; anything else cannot be detected (DataError).
- ``.pt``: a dict with ``tracks`` -> ``tracks``; a rank-3 ``(T-1, N, 2)`` tensor with all
  values in [-1, 1] -> ``laps-pt``; another rank-3/4 tensor -> ``tracks``.

Safety: nothing is unpickled (``np.load(allow_pickle=False)``,
``torch.load(weights_only=True)``). Every problem (empty or truncated file, wrong ranks or
keys, NaN/inf, zero points) raises :class:`DataError` with a one-line message starting with
the path. A whole file is read and checked before its first Sequence is yielded, so a bad
file yields nothing. With ``bad_sequences`` (build-shards ``--on-error skip``) a sequence
that fails its own checks is left out and reported, and the rest of the file is kept.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from motion_data.common.clips import Sequence, tracks_to_sequence
from motion_data.common.errors import DataError, one_line
from motion_data.sources.file_readers import (finite_or_raise, h5_read, h5_root, h5_views, h5_vis, load_npy, load_npz, load_pt_tracks,
                           open_h5, to_numpy, torch_load)
from motion_data.common.labels import DEFAULT_REF_SIZE, half_window

FORMATS = ("tracks", "amplify-h5", "atm-h5", "laps-pt")
TRACK_EXTS = (".npz", ".npy", ".pt")
H5_EXTS = (".h5", ".hdf5")
SUPPORTED_EXTS = TRACK_EXTS + H5_EXTS
AMPLIFY_FRAME = 128
LAPS_SCALE = half_window()  # (W-1)/2 with the default W = 15
LAPS_ORIGIN = 0.5  # laps-pt positions start at the frame centre, in units of ref_size


# ---------------------------------------------------------------- listing / detection


def input_root(paths) -> Path:
    """The folder input files are named relative to (:func:`source_name`): the deepest
    folder holding every given input (a folder given is its own base, a file its parent),
    as an absolute path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    bases = [os.path.abspath(p) if Path(p).is_dir() else os.path.dirname(os.path.abspath(p)) for p in paths]
    return Path(os.path.commonpath(bases))


def source_name(path, root) -> str:
    """``path`` relative to ``root`` (``/`` separated): the name a build records for an
    input (manifest ``source``, clip ids, the train/validation split), so moving the input
    folder changes none of them."""
    return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()


def list_inputs(paths) -> list[str]:
    """Files to import: folders are searched recursively for supported files
    (``.npz .npy .pt .h5 .hdf5``; a laps-pt folder is just a folder of ``.pt`` files, one
    input each); files are taken as given. Returns a de-duplicated list of str sorted by
    :func:`source_name` (so the order does not depend on where the inputs lie).
    A missing path raises DataError; a folder with no supported file gives no inputs.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = {}  # absolute path -> the path as found (one entry per file, however it was spelled)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, _dirs, files in os.walk(p):
                for f in files:
                    if f.lower().endswith(SUPPORTED_EXTS):
                        out.setdefault(os.path.abspath(Path(root) / f), str(Path(root) / f))
        elif p.is_file():
            out.setdefault(os.path.abspath(p), str(p))
        else:
            raise DataError(f"{p}: no such file or folder")
    root = input_root(paths) if out else None
    return sorted(out.values(), key=lambda f: (source_name(f, root), f))


def _ext(path) -> str:
    return Path(path).suffix.lower()


def detect_format(path) -> str:
    """The format of ``path`` (see the module docstring for the rules)."""
    path = str(path)
    ext = _ext(path)
    if ext in (".npz", ".npy"):
        return "tracks"
    if ext in H5_EXTS:
        with open_h5(path) as f:
            root = h5_root(f)
            views = h5_views(path, root, None)
            ds = root[views[0]]["tracks"]
            shape = ds.shape
            if len(shape) != 4 or shape[-1] != 2:
                raise DataError(f"{path}: cannot detect format: {views[0]}/tracks has shape {shape}, expected (n,T,N,2)")
            data = finite_or_raise(path, f"{views[0]}/tracks", ds[: min(shape[0], 4)])
            big = data.size > 0 and float(np.abs(data).max()) > 1.0
            if shape[0] > 1 or (shape[1] == 16 and big):
                return "amplify-h5"
            if not big and data.size > 0 and float(data.min()) >= 0.0:
                return "atm-h5"
            raise DataError(f"{path}: cannot detect format: {views[0]}/tracks {shape} is neither AMPLIFY "
                             "pixels (n,16,N,2) nor ATM [0,1] coordinates (1,T,N,2); pass --format")
    if ext == ".pt":
        obj = torch_load(path)
        if isinstance(obj, dict):
            if "tracks" in obj or "pred_tracks" in obj:
                return "tracks"
            raise DataError(f"{path}: cannot detect format: dict without 'tracks' (keys {sorted(map(str, obj))})")
        arr = to_numpy(path, "tensor", obj)
        if arr.ndim == 3 and arr.shape[-1] == 2 and arr.size and np.isfinite(arr).all() and np.abs(arr).max() <= 1.0:
            return "laps-pt"
        if arr.ndim in (3, 4):
            return "tracks"
        raise DataError(f"{path}: cannot detect format: tensor of shape {arr.shape}")
    raise DataError(f"{path}: cannot detect format from extension {ext!r} (supported: {' '.join(SUPPORTED_EXTS)})")


# ---------------------------------------------------------------- format readers


def _image_size(path, value, fallback):
    if value is None:
        value = fallback
    if value is None:
        raise DataError(f"{path}: no image_size in the file; pass its frame size as --image-size H,W (e.g. 480,640)")
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 2 or not np.isfinite(arr).all() or (arr <= 0).any():
        raise DataError(f"{path}: image_size must be two positive numbers (H, W), got {np.asarray(value).tolist()}")
    return (float(arr[0]), float(arr[1]))


@dataclass(frozen=True)
class _Batch:
    """A file's sequences as arrays: tracks (B, T, N, 2), vis (B, T, N) or None, start_frame (B,) int."""
    tracks: np.ndarray
    vis: np.ndarray | None
    start_frame: np.ndarray


def _batched(path, tracks, vis, start_frame, kind="tracks") -> _Batch:
    """Bring tracks to (B, T, N, 2), vis to (B, T, N) or None, start_frame to (B,) int."""
    tracks = finite_or_raise(path, kind, tracks)
    if tracks.ndim == 3:
        tracks = tracks[None]
        if vis is not None:
            vis = np.asarray(vis)[None]
    if tracks.ndim != 4 or tracks.shape[-1] != 2:
        raise DataError(f"{path}: {kind} must be (T, N, 2) or (B, T, N, 2), got shape {tracks.shape}")
    B, T, N, _ = tracks.shape
    if B == 0 or T == 0 or N == 0:
        raise DataError(f"{path}: {kind} is empty (shape {tracks.shape}: zero sequences, frames or points)")
    if vis is not None:
        vis = np.asarray(vis)
        if vis.dtype != np.bool_ and not np.issubdtype(vis.dtype, np.number):
            raise DataError(f"{path}: visibility must be bool or numeric, got dtype {vis.dtype}")
        if vis.shape != (B, T, N):
            raise DataError(f"{path}: visibility shape {vis.shape} does not match tracks {tracks.shape[:-1]}")
    if start_frame is None:
        sf = np.zeros(B, np.int64)
    else:
        sf = np.asarray(start_frame)
        if not np.issubdtype(sf.dtype, np.number) or not np.isfinite(sf).all():
            raise DataError(f"{path}: start_frame must be integers, got {sf!r}")
        if sf.ndim == 0:
            sf = np.full(B, int(sf), np.int64)
        elif sf.shape != (B,):
            raise DataError(f"{path}: start_frame must be a scalar or ({B},), got shape {sf.shape}")
        sf = sf.astype(np.int64)
    return _Batch(tracks, vis, sf)


def _sequences(path, batch: _Batch, image_size, ref_size, index0=0, independent=False, bad=None):
    """Sequences of a batched file; ``independent``: each is its own split group (docs/DESIGN.md).
    ``bad``: a list to collect the DataError of each sequence that fails its own checks
    (it is left out); None: the first such error fails the file."""
    out = []
    tracks, vis, sf = batch.tracks, batch.vis, batch.start_frame
    for b in range(tracks.shape[0]):
        group = f"{path}#{index0 + b}" if independent and tracks.shape[0] > 1 else path
        try:
            out.append(tracks_to_sequence(path, index0 + b, tracks[b], None if vis is None else vis[b],
                                          image_size, ref_size, int(sf[b]), group))
        except DataError as e:
            # tracks_to_sequence names "path[i]"; keep the path first, one line
            e = DataError(one_line(e))
            if bad is None:
                raise e from None
            bad.append(e)
    return out


def _read_tracks(path, ref_size, image_size, bad=None) -> list[Sequence]:
    ext = _ext(path)
    if ext == ".npz":
        d = load_npz(path)
    elif ext == ".npy":
        d = load_npy(path)
    elif ext == ".pt":
        d = load_pt_tracks(path)
    else:
        raise DataError(f"{path}: track files must be .npz, .npy or .pt, got {ext!r}")
    key = next((k for k in ("tracks", "pred_tracks") if k in d), None)  # ours, CoTracker's
    if key is None:
        raise DataError(f"{path}: missing key 'tracks' or 'pred_tracks' (keys: {sorted(d)})")
    vis = next((d[k] for k in ("visibility", "vis", "pred_visibility") if k in d), None)
    batch = _batched(path, d[key], vis, d.get("start_frame"))
    size = _image_size(path, d.get("image_size"), image_size)
    return _sequences(path, batch, size, ref_size, independent="start_frame" not in d, bad=bad)


def _h5_view_tracks(path, views, expected: str):
    """``(view, group, tracks, vis)`` of each selected view of an HDF5 track file (kept open
    while the caller's loop body runs)."""
    with open_h5(path) as f:
        root = h5_root(f)
        for view in h5_views(path, root, views):
            g = root[view]
            tracks = h5_read(path, g, "tracks")
            vis = h5_vis(path, g)
            if tracks.ndim != 4:
                raise DataError(f"{path}: {view}/tracks must be {expected}, got shape {tracks.shape}")
            yield view, g, tracks, vis


def _read_amplify(path, ref_size, views, bad=None) -> list[Sequence]:
    out, n = [], 0  # n: sequences so far, skipped ones included (indices stay those of the file)
    for view, _, tracks, vis in _h5_view_tracks(path, views, "(n, T, N, 2)"):
        batch = _batched(path, tracks, vis, np.arange(tracks.shape[0]), f"{view}/tracks")
        out += _sequences(path, batch, (AMPLIFY_FRAME, AMPLIFY_FRAME), ref_size, n, bad=bad)
        n += batch.tracks.shape[0]
    return out


def _video_size(video_shape):
    """(H, W) from a video dataset shape, channels first (..., C, H, W) or last (..., H, W, C)."""
    if len(video_shape) < 3:
        return None
    if video_shape[-1] in (1, 3, 4):
        return video_shape[-3], video_shape[-2]
    return video_shape[-2], video_shape[-1]


def _read_atm(path, ref_size, image_size, views, bad=None) -> list[Sequence]:
    out, n = [], 0
    for view, g, tracks, vis in _h5_view_tracks(path, views, "(1, T, N, 2)"):
        batch = _batched(path, tracks, vis, None, f"{view}/tracks")
        size = _image_size(path, _video_size(g["video"].shape) if "video" in g else None, image_size)
        # normalised [0, 1] -> pixels of the frame (x by W, y by H)
        px = batch.tracks.astype(np.float64) * np.array([size[1], size[0]])
        out += _sequences(path, _Batch(px, batch.vis, batch.start_frame), size, ref_size, n, bad=bad)
        n += px.shape[0]
    return out


def _read_laps(path, ref_size) -> list[Sequence]:
    obj = torch_load(path)
    if isinstance(obj, dict):
        keys = [k for k in ("velocities", "vel", "velocity") if k in obj]
        if not keys:
            raise DataError(f"{path}: laps-pt file holds a dict without a velocity tensor (keys {sorted(map(str, obj))})")
        obj = obj[keys[0]]
    v = finite_or_raise(path, "velocities", to_numpy(path, "velocities", obj)).astype(np.float64)
    if v.ndim != 3 or v.shape[-1] != 2:
        raise DataError(f"{path}: laps-pt velocities must be (T-1, N, 2), got shape {v.shape}")
    if v.shape[0] < 1 or v.shape[1] < 1:
        raise DataError(f"{path}: laps-pt velocities are empty (shape {v.shape})")
    if not np.isfinite(v).all():
        t, n = np.argwhere(~np.isfinite(v).all(-1))[0]
        raise DataError(f"{path}: non-finite velocity at step {t}, point {n}")
    if np.abs(v).max() > 1.0 + 1e-6:
        raise DataError(f"{path}: laps-pt velocities must be normalised to [-1, 1], max |v| = {np.abs(v).max():.3g}")
    # positions by a cumulative sum from the frame centre (module docstring)
    start = np.full((1, v.shape[1], 2), LAPS_ORIGIN * ref_size)
    pos = np.concatenate([start, start + np.cumsum(v * LAPS_SCALE, axis=0)]).astype(np.float32)
    return [Sequence(path, 0, pos, np.ones(pos.shape[:2], bool), 0)]


def read_sequences(path, fmt: str = "auto", *, ref_size: int = DEFAULT_REF_SIZE, image_size=None,
                   views=None, bad_sequences: list | None = None) -> list[Sequence]:
    """All sequences of one input file, fully checked (see :func:`iter_sequences`).

    ``bad_sequences``: when a list, a sequence that fails its own checks (e.g. a non-finite
    coordinate of a visible point) is left out and its DataError appended there, and the
    file's other sequences are returned; otherwise it fails the whole file.
    """
    path = str(path)
    if fmt == "auto":
        fmt = detect_format(path)
    bad = bad_sequences
    readers = {"tracks": lambda: _read_tracks(path, ref_size, image_size, bad),
               "amplify-h5": lambda: _read_amplify(path, ref_size, views, bad),
               "atm-h5": lambda: _read_atm(path, ref_size, image_size, views, bad),
               "laps-pt": lambda: _read_laps(path, ref_size)}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; choose auto or one of {FORMATS}")
    try:
        return readers[fmt]()
    except MemoryError as e:  # e.g. an HDF5 dataset declaring an enormous shape
        raise DataError(f"{path}: too large to load ({one_line(e)})") from None


def iter_sequences(path, fmt: str = "auto", *, ref_size: int = DEFAULT_REF_SIZE, image_size=None,
                   views=None, bad_sequences: list | None = None) -> Iterator[Sequence]:
    """Yield the :class:`Sequence` s of one input file.

    ``fmt``: ``auto`` or one of :data:`FORMATS`; ``ref_size``: side of the reference frame
    velocities are expressed in; ``image_size``: fallback ``(H, W)`` for files without one;
    ``views``: HDF5 views to read (all when None). Raises DataError ("<path>: <problem>")
    before yielding anything when the file is bad; ``bad_sequences`` as in :func:`read_sequences`.
    """
    yield from read_sequences(path, fmt, ref_size=ref_size, image_size=image_size, views=views,
                              bad_sequences=bad_sequences)
