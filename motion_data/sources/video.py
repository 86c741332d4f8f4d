"""Point tracks from real videos: OpenCV pyramidal Lucas-Kanade on a re-initialised grid.

A ``grid x grid`` lattice of query points is placed at the start of every window (a window
of ``window`` frames starts every ``stride`` frames) and tracked frame to frame with
``cv2.calcOpticalFlowPyrLK``. A point is visible while LK reports it found, the
forward-backward check (track back to the previous frame, distance <= ``fb_threshold`` px)
passes and it is inside the frame; once lost it stays invisible for the rest of its window,
since LK cannot re-identify it. All active windows are tracked in one LK call per frame, so
overlapping windows cost little more than one.

The result is the CoTracker-style track-file layout (``tracks`` ``(B, window, N, 2)`` x, y
pixels, ``visibility`` ``(B, window, N)``, ``image_size`` ``(H, W)``, ``start_frame``
``(B,)``) that :mod:`motion_data.sources.importers` reads. OpenCV (``opencv-python-headless``) is an
optional dependency, imported when tracking starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from motion_data.common.atomic import atomic_open
from motion_data.common.errors import DataError
from motion_data.common.labels import DEFAULT_GRID, DEFAULT_T

VTEST_PATH = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"


def find_sample_video() -> str | None:
    """Path of OpenCV's sample ``vtest.avi`` (Debian package ``opencv-doc``), or None."""
    return VTEST_PATH if os.path.isfile(VTEST_PATH) else None


def _cv2():
    try:
        import cv2
    except ImportError:
        from motion_data.common.errors import SettingError

        raise SettingError("tracking videos needs OpenCV: pip install opencv-python-headless") from None
    return cv2


@dataclass
class TrackConfig:
    window: int = DEFAULT_T
    stride: int = 8
    grid: int = DEFAULT_GRID
    max_frames: int | None = None
    win_size: int = 21         # LK search window (px)
    max_level: int = 3         # pyramid levels above the full image
    fb_threshold: float = 1.0  # forward-backward error (px) above which a point is lost

    def __post_init__(self):
        if self.window < 2 or self.stride < 1 or self.grid < 1:
            raise ValueError(f"track-video: need window >= 2, stride >= 1, grid >= 1; got "
                             f"{self.window}, {self.stride}, {self.grid}")
        if self.max_frames is not None and self.max_frames < self.window:
            raise ValueError(f"track-video: max_frames ({self.max_frames}) is shorter than the window ({self.window})")


def grid_points(H: int, W: int, grid: int) -> np.ndarray:
    """``(grid*grid, 2)`` float32 (x, y) cell centres, row-major (y outer), like CoTracker's grid."""
    xs = (np.arange(grid) + 0.5) * W / grid
    ys = (np.arange(grid) + 0.5) * H / grid
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], -1).astype(np.float32)


def _lk_step(cv2, prev_gray, gray, p0, cfg: TrackConfig):
    """Pyramidal Lucas-Kanade of the ``(P, 2)`` points ``p0`` from one frame to the next, with a
    forward-backward check; returns (new positions, good). A lost point keeps its last position
    (and is invisible), so garbage never enters the file."""
    win = (cfg.win_size, cfg.win_size)
    crit = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 0.01)
    H, W = gray.shape[:2]
    p0 = np.ascontiguousarray(p0, np.float32).reshape(-1, 1, 2)
    p1, st1, _ = cv2.calcOpticalFlowPyrLK(prev_gray, gray, p0, None, winSize=win, maxLevel=cfg.max_level, criteria=crit)
    pb, stb, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, p1, None, winSize=win, maxLevel=cfg.max_level, criteria=crit)
    p0, p1, pb = p0.reshape(-1, 2), p1.reshape(-1, 2), pb.reshape(-1, 2)
    fb = np.linalg.norm(pb - p0, axis=1)
    good = (st1.ravel() == 1) & (stb.ravel() == 1) & (fb <= cfg.fb_threshold) & np.isfinite(p1).all(1)
    good &= (p1[:, 0] >= 0) & (p1[:, 0] <= W - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= H - 1)
    return np.where(good[:, None], p1, p0), good


def track_video(path, cfg: TrackConfig | None = None, progress: bool = False) -> dict:
    """Track a re-initialised point grid through the video at ``path``.

    Returns ``tracks`` ``(B, window, N, 2)`` float32, ``visibility`` ``(B, window, N)`` bool,
    ``image_size`` ``[H, W]`` int64 and ``start_frame`` ``(B,)`` int64. Raises DataError
    ("<path>: <problem>") when the video cannot be read or is shorter than one window.
    """
    cv2 = _cv2()
    cfg = cfg or TrackConfig()
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise DataError(f"{path}: cannot open as a video")
    total = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    if cfg.max_frames:
        total = min(total, cfg.max_frames) if total else cfg.max_frames
    N = cfg.grid * cfg.grid
    active = {}  # start frame -> [tracks (window, N, 2), vis (window, N), filled frames]
    done_tracks, done_vis, done_start = [], [], []
    prev_gray = None
    H = W = None
    q = None
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit="frame", desc=os.path.basename(path), disable=not progress, leave=False)
    f = 0
    try:
        while cfg.max_frames is None or f < cfg.max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            if H is None:
                H, W = gray.shape[:2]
                q = grid_points(H, W, cfg.grid)
            if prev_gray is not None and active:
                starts = sorted(active)
                p0 = np.concatenate([active[s][0][active[s][2] - 1] for s in starts])
                p1, good = _lk_step(cv2, prev_gray, gray, p0, cfg)
                for i, s in enumerate(starts):
                    tr, vis, k = active[s]
                    sl = slice(i * N, (i + 1) * N)
                    tr[k] = p1[sl]
                    vis[k] = vis[k - 1] & good[sl]
                    active[s][2] = k + 1
            for s in [s for s in active if active[s][2] == cfg.window]:
                tr, vis, _ = active.pop(s)
                done_tracks.append(tr)
                done_vis.append(vis)
                done_start.append(s)
            if f % cfg.stride == 0:
                tr = np.zeros((cfg.window, N, 2), np.float32)
                vis = np.zeros((cfg.window, N), bool)
                tr[0] = q
                vis[0] = True
                active[f] = [tr, vis, 1]
            prev_gray = gray
            f += 1
            bar.update(1)
    finally:
        bar.close()
        cap.release()
    if H is None:
        raise DataError(f"{path}: no frame could be decoded")
    if not done_tracks:
        raise DataError(f"{path}: only {f} frames, shorter than one window of {cfg.window}")
    order = np.argsort(done_start)
    return {
        "tracks": np.stack(done_tracks)[order],
        "visibility": np.stack(done_vis)[order],
        "image_size": np.array([H, W], np.int64),
        "start_frame": np.asarray(done_start, np.int64)[order],
    }


def write_track_file(path, data: dict) -> str:
    """Write a track-file dict as ``.npz`` atomically (temp name + rename)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, **data)
    return path
