"""Ground-truth point tracks from a simulator recording (DESIGN.md "Target-domain data").

Pure numpy; no simulator needed. A recording holds, per frame, the camera pose, the depth
map (metres along the optical axis), the pose of every body and, on the frames where a
window starts, a map of which body each pixel shows (from the segmentation render).

A window's 20x20 grid (``video.grid_points``, the same grid the LK tracker uses) is placed
on its first frame: each point is unprojected with that frame's depth, attached rigidly to
the body under it and, on every later frame of the window, moved with that body and
projected back. A point is visible while it lies inside the frame and in front of (or
within ``tol`` of) the rendered depth there, i.e. where the depth test passes. Positions
outside the frame are clipped to its border (and invisible), so a file never carries
coordinates far off the image.

Camera convention (MuJoCo): ``cam_mat`` columns are the camera's x (right), y (up) and
z (backwards) axes in world coordinates; ``fovy`` is the vertical field of view; image
rows run top to bottom, pixel ``(row, col)`` covers ``[col, col+1) x [row, row+1)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from motion_data.common.clips import window_starts
from motion_data.common.labels import DEFAULT_GRID, DEFAULT_T
from motion_data.sources.video import grid_points

DEPTH_TOL_ABS = 0.01  # m: a point this far behind the rendered surface still counts as visible
DEPTH_TOL_REL = 0.02  # plus this share of its distance (slanted surfaces, nearest-pixel lookup)


def focal_px(fovy_deg: float, height: int) -> float:
    """Focal length in pixels of a camera with vertical field of view ``fovy_deg``."""
    return 0.5 * height / np.tan(np.deg2rad(fovy_deg) / 2.0)


@dataclass(frozen=True)
class Camera:
    pos: np.ndarray  # (3,) world position
    mat: np.ndarray  # (3, 3) columns = camera x, y, z axes in world coordinates
    fovy: float      # degrees, vertical
    size: tuple      # (H, W) pixels

    @property
    def f(self) -> float:
        return focal_px(self.fovy, self.size[0])


def project(points, cam: Camera):
    """World points ``(..., 3)`` -> pixel positions ``(..., 2)`` (x, y) and depth ``(...)`` (m)."""
    pc = (np.asarray(points, np.float64) - cam.pos) @ cam.mat  # camera coordinates: R^T (p - c)
    z = -pc[..., 2]
    H, W = cam.size
    with np.errstate(divide="ignore", invalid="ignore"):
        u = W / 2.0 + cam.f * pc[..., 0] / z
        v = H / 2.0 - cam.f * pc[..., 1] / z
    return np.stack([u, v], -1), z


def unproject(uv, depth, cam: Camera) -> np.ndarray:
    """Pixel positions ``(n, 2)`` with depths ``(n,)`` -> world points ``(n, 3)``."""
    uv = np.asarray(uv, np.float64)
    d = np.asarray(depth, np.float64)
    H, W = cam.size
    pc = np.stack([(uv[:, 0] - W / 2.0) / cam.f * d, -(uv[:, 1] - H / 2.0) / cam.f * d, -d], -1)
    return cam.pos + pc @ cam.mat.T


def pixel_of(uv, size):
    """Nearest pixel (row, col) of positions ``(..., 2)`` and whether it lies inside the frame."""
    H, W = size
    uv = np.asarray(uv)
    inside = np.isfinite(uv).all(-1) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    col = np.clip(np.floor(np.nan_to_num(uv[..., 0])), 0, W - 1).astype(np.int64)
    row = np.clip(np.floor(np.nan_to_num(uv[..., 1])), 0, H - 1).astype(np.int64)
    return row, col, inside


def attach(uv, depth_map, body_map, body_pos, body_mat, cam: Camera):
    """Attach points at pixel positions ``uv`` (n, 2) to the body under each of them.

    Returns ``(body (n,), local (n, 3))``: the body index and the point in that body's frame.
    Pixels that show no body (``body_map < 0``, e.g. the sky) go to body 0, the static world.
    """
    row, col, _ = pixel_of(uv, cam.size)
    body = np.asarray(body_map)[row, col].astype(np.int64)
    body[body < 0] = 0
    world = unproject(uv, np.asarray(depth_map)[row, col], cam)
    # local = R_b^T (p - x_b)
    local = np.einsum("nji,nj->ni", np.asarray(body_mat)[body], world - np.asarray(body_pos)[body])
    return body, local


def follow(body, local, body_pos, body_mat) -> np.ndarray:
    """World positions ``(n, 3)`` of attached points, given one frame's body poses."""
    return np.asarray(body_pos)[body] + np.einsum("nij,nj->ni", np.asarray(body_mat)[body], local)


def depth_visible(uv, z, depth_map, size, tol_abs=DEPTH_TOL_ABS, tol_rel=DEPTH_TOL_REL) -> np.ndarray:
    """The depth test: inside the frame, in front of the camera and not behind the rendered surface."""
    row, col, inside = pixel_of(uv, size)
    surface = np.asarray(depth_map)[row, col]
    return inside & (z > 0) & (z <= surface + tol_abs + tol_rel * z)


@dataclass
class Recording:
    """What the simulator hands over for one rollout (F frames, B bodies)."""
    cam_pos: np.ndarray    # (F, 3)
    cam_mat: np.ndarray    # (F, 3, 3)
    fovy: float
    size: tuple            # (H, W)
    depth: np.ndarray      # (F, H, W) float32, metres along the optical axis
    body_pos: np.ndarray   # (F, B, 3)
    body_mat: np.ndarray   # (F, B, 3, 3)
    body_maps: dict        # frame -> (H, W) body index per pixel (-1: none); needed at window starts

    def camera(self, t: int) -> Camera:
        return Camera(self.cam_pos[t], self.cam_mat[t], self.fovy, tuple(self.size))


def window_tracks(rec: Recording, start: int, window: int = DEFAULT_T, grid: int = DEFAULT_GRID):
    """Tracks ``(window, N, 2)`` float32 and visibility ``(window, N)`` of the grid placed at ``start``."""
    H, W = rec.size
    q = grid_points(H, W, grid).astype(np.float64)
    body, local = attach(q, rec.depth[start], rec.body_maps[start], rec.body_pos[start],
                         rec.body_mat[start], rec.camera(start))
    tracks = np.empty((window, len(q), 2), np.float32)
    vis = np.empty((window, len(q)), bool)
    for k in range(window):
        t = start + k
        uv, z = project(follow(body, local, rec.body_pos[t], rec.body_mat[t]), rec.camera(t))
        vis[k] = depth_visible(uv, z, rec.depth[t], rec.size)
        uv = np.nan_to_num(uv, nan=0.0, posinf=float(max(H, W)), neginf=0.0)
        tracks[k, :, 0] = np.clip(uv[:, 0], 0.0, W)
        tracks[k, :, 1] = np.clip(uv[:, 1], 0.0, H)
    return tracks, vis


def rollout_tracks(rec: Recording, window: int = DEFAULT_T, stride: int = 4, grid: int = DEFAULT_GRID) -> dict:
    """All windows of a recording as a CoTracker-style track-file dict (``video.write_track_file``)."""
    n_frames = rec.depth.shape[0]
    starts = window_starts(n_frames, window, stride)
    if len(starts) == 0:
        raise ValueError(f"a rollout of {n_frames} frames is shorter than one window ({window})")
    pairs = [window_tracks(rec, int(s), window, grid) for s in starts]
    return {
        "tracks": np.stack([p[0] for p in pairs]),
        "visibility": np.stack([p[1] for p in pairs]),
        "image_size": np.array(rec.size, np.int64),
        "start_frame": starts,
    }
