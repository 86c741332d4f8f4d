"""Sequences (what importers yield) and their cutting into fixed-length clips."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from motion_data.common.labels import step_valid, velocities
from motion_data.common.errors import DataError


@dataclass
class Sequence:
    """One continuous track sequence of a source file, already in reference pixels.

    pos: ``(T, N, 2)`` float32 (x, y) positions in pixels of a ref_size x ref_size frame
    (docs/DESIGN.md "Units and labels"); vis: ``(T, N)`` bool; start_frame: frame index of
    frame 0 in the source (for time-block validation splits); group: the unit the
    train/validation split keeps together (the source file, or ``file#b`` for the b-th of
    several independent sequences of one file, docs/DESIGN.md).
    """

    source: str
    index: int
    pos: np.ndarray
    vis: np.ndarray
    start_frame: int = 0
    group: str = ""

    def __post_init__(self):
        self.group = self.group or self.source

    @property
    def vel(self) -> np.ndarray:
        """``(T-1, N, 2)`` per-step displacements (derived, float32)."""
        return velocities(self.pos)

    @property
    def valid(self) -> np.ndarray:
        """``(T-1, N)`` visible at both ends of the step (derived)."""
        return step_valid(self.vis)


def tracks_to_sequence(source: str, index: int, tracks, vis, image_size, ref_size: int,
                       start_frame: int = 0, group: str = "") -> Sequence:
    """Pixel tracks ``(T, N, 2)`` (x, y) of an ``image_size = (H, W)`` frame -> Sequence.

    Raises DataError naming ``source`` for NaN/inf coordinates of visible points, wrong
    shapes or a bad image size.
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    where = f"{source}[{index}]"
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise DataError(f"{where}: tracks must be (T, N, 2), got {tracks.shape}")
    T, N, _ = tracks.shape
    if T < 2 or N < 1:
        raise DataError(f"{where}: need at least 2 frames and 1 point, got T={T}, N={N}")
    if vis is None:
        vis = np.ones((T, N), bool)
    else:
        vis = np.asarray(vis)
        if vis.shape != (T, N):
            raise DataError(f"{where}: visibility shape {vis.shape} does not match tracks {tracks.shape[:2]}")
        vis = vis > 0.5 if vis.dtype != np.bool_ else vis
    try:
        H, W = (float(x) for x in np.asarray(image_size).reshape(-1)[:2])
    except (TypeError, ValueError):
        raise DataError(f"{where}: bad image_size {image_size!r}") from None
    if not (np.isfinite(H) and np.isfinite(W) and H > 0 and W > 0):
        raise DataError(f"{where}: image_size must be positive (H, W), got {image_size!r}")
    finite = np.isfinite(tracks)
    if not finite.all():  # (one flat check first: the per-point test and the copy are slow)
        bad = ~(finite[..., 0] & finite[..., 1])
        if (bad & vis).any():
            t, n = np.argwhere(bad & vis)[0]
            raise DataError(f"{where}: non-finite coordinate at frame {t}, point {n}")
        # invisible points may carry garbage; they never form a valid step
        tracks = np.where(bad[..., None], 0.0, tracks)
    scale = np.array([ref_size / W, ref_size / H])
    pos = (tracks * scale).astype(np.float32)
    if not np.isfinite(pos).all():  # finite pixels can still overflow float32
        t, n = np.argwhere(~np.isfinite(pos).all(-1))[0]
        raise DataError(f"{where}: coordinate out of range at frame {t}, point {n}")
    return Sequence(source, index, pos, np.ascontiguousarray(vis, bool), int(start_frame), group)


def window_starts(T: int, window: int, stride: int) -> np.ndarray:
    """The window rule: of ``T`` frames, windows of ``window`` frames start every ``stride``
    frames from 0; a tail shorter than a window is dropped."""
    if window < 2 or stride < 1:
        raise ValueError(f"need window >= 2 and stride >= 1, got {window}, {stride}")
    return np.arange(0, max(T - window + 1, 0), stride, dtype=np.int64)


def cut_windows(seq: Sequence, window: int, stride: int):
    """Yield ``(start_frame, pos (window, N, 2), vis (window, N))`` clips (``window_starts``)."""
    for s in window_starts(seq.pos.shape[0], window, stride).tolist():
        yield seq.start_frame + s, seq.pos[s:s + window], seq.vis[s:s + window]
