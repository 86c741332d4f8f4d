"""Sequences (what importers yield) and their cutting into fixed-length clips."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class InputError(ValueError):
    """Bad input: the message names the file and the problem (one line)."""


@dataclass
class Sequence:
    """One continuous track sequence of a source file, already in reference pixels.

    vel: ``(S, N, 2)`` float32 per-step displacements in pixels of a ref_size x ref_size
    frame (S = frames - 1); valid: ``(S, N)`` bool, visible at both ends of the step;
    start_frame: frame index of step 0 in the source (for time-block validation splits).
    """

    source: str
    index: int
    vel: np.ndarray
    valid: np.ndarray
    start_frame: int = 0


def tracks_to_sequence(source: str, index: int, tracks, vis, image_size, ref_size: int,
                       start_frame: int = 0) -> Sequence:
    """Pixel tracks ``(T, N, 2)`` (x, y) of an ``image_size = (H, W)`` frame -> Sequence.

    Raises InputError naming ``source`` for NaN/inf coordinates of visible points, wrong
    shapes or a bad image size.
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    where = f"{source}[{index}]"
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise InputError(f"{where}: tracks must be (T, N, 2), got {tracks.shape}")
    T, N, _ = tracks.shape
    if T < 2 or N < 1:
        raise InputError(f"{where}: need at least 2 frames and 1 point, got T={T}, N={N}")
    if vis is None:
        vis = np.ones((T, N), bool)
    else:
        vis = np.asarray(vis)
        if vis.shape != (T, N):
            raise InputError(f"{where}: visibility shape {vis.shape} does not match tracks {tracks.shape[:2]}")
        vis = vis > 0.5 if vis.dtype != np.bool_ else vis
    try:
        H, W = (float(x) for x in np.asarray(image_size).reshape(-1)[:2])
    except (TypeError, ValueError):
        raise InputError(f"{where}: bad image_size {image_size!r}") from None
    if not (np.isfinite(H) and np.isfinite(W) and H > 0 and W > 0):
        raise InputError(f"{where}: image_size must be positive (H, W), got {image_size!r}")
    finite = np.isfinite(tracks)
    if not finite.all():  # (one flat check first: the per-point test and the copy are slow)
        bad = ~(finite[..., 0] & finite[..., 1])
        if (bad & vis).any():
            t, n = np.argwhere(bad & vis)[0]
            raise InputError(f"{where}: non-finite coordinate at frame {t}, point {n}")
        # invisible points may carry garbage; they never contribute to a valid step
        tracks = np.where(bad[..., None], 0.0, tracks)
    scale = np.array([ref_size / W, ref_size / H])
    vel = (np.diff(tracks, axis=0) * scale).astype(np.float32)
    valid = vis[:-1] & vis[1:]
    return Sequence(source, index, vel, valid, int(start_frame))


def cut_windows(seq: Sequence, window: int, stride: int):
    """Yield ``(start_frame, vel (window-1, N, 2), valid (window-1, N))`` clips.

    A window of ``window`` frames spans ``window - 1`` steps; windows start every
    ``stride`` frames; a tail shorter than a window is dropped.
    """
    steps = window - 1
    S = seq.vel.shape[0]
    for s in range(0, S - steps + 1, stride):
        yield seq.start_frame + s, seq.vel[s:s + steps], seq.valid[s:s + steps]
