"""Synthetic point tracks that look like real robot/video tracks (CoTracker-style files).

Each clip tracks a ``grid x grid`` lattice of query points over ``frames`` frames of a square
``image_size`` frame. The scene, back to front:

- a static background: the points only carry tracker noise (most points, most steps);
- 0-3 rigid objects (ellipses) that translate and rotate during part of the clip;
- with probability ``arm_prob`` an articulated arm of 2-3 links (capsules) hinged at a base
  near the frame's bottom edge, whose joints rotate during part of the clip;
- optional camera shake (a small random walk of the whole frame), in ``shake_prob`` of clips.

A point follows the frontmost layer it lies on at frame 0. It is invisible while it is
behind a shape of a nearer layer or outside the frame, and during rare tracker dropouts.
All motion amplitudes are given in reference pixels (of a 128 x 128 frame), so the label
statistics do not depend on ``image_size``. Everything is vectorised over clips; the output
is deterministic given the seed.

With the defaults the labels (window 16, W = 15) are in the range of real robot data:
the centre class holds ~94% of valid labels before filtering and ~60% after the
``p95@0.04, min_keep=16`` static filter (``tests/test_synth.py`` checks 85-97% and 50-70%).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from motion_data.common.atomic import atomic_open
from motion_data.common.errors import UserError, some_names
from motion_data.common.labels import DEFAULT_GRID, DEFAULT_REF_SIZE, DEFAULT_T

SYNTH_JSON = "synth.json"
# synth's own files: data files, the record, and their atomic-write temporaries
_OWN = re.compile(r"^\.?(synth-\d{6}\.npz|synth\.json)(\.tmp\d+)?$")


@dataclass
class SynthConfig:
    grid: int = DEFAULT_GRID
    frames: int = DEFAULT_T
    image_size: int = 256
    # tracker noise (reference px, per coordinate and frame); a few points are noisier
    noise_std: float = 0.04
    noisy_fraction: float = 0.03
    noisy_std: float = 0.15
    # rigid objects: count probabilities for 0, 1, 2, 3 objects
    object_count_p: tuple = (0.2, 0.35, 0.3, 0.15)
    object_radius: tuple = (0.08, 0.18)       # semi-axes, fraction of the frame
    object_speed: tuple = (0.6, 4.0)          # reference px per frame while moving
    object_spin: float = 0.04                 # max |rad per frame|
    # articulated arm
    arm_prob: float = 0.6
    arm_link_length: tuple = (0.22, 0.36)     # fraction of the frame
    arm_link_radius: tuple = (0.035, 0.06)    # fraction of the frame
    arm_joint_speed: float = 0.05            # max |rad per frame| per joint
    # camera shake (random-walk std, reference px per frame) in a share of the clips
    camera_shake: float = 0.1
    shake_prob: float = 0.1
    # tracker dropouts: share of points losing the track for a few frames
    dropout_fraction: float = 0.02

    def __post_init__(self):
        if self.grid < 1 or self.frames < 2 or self.image_size < 8:
            raise ValueError(f"synth: need grid >= 1, frames >= 2, image_size >= 8; got {self.grid}, {self.frames}, {self.image_size}")
        p = np.asarray(self.object_count_p, float)
        if p.ndim != 1 or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"synth: object_count_p must be probabilities summing to 1, got {self.object_count_p}")
        for name in ("noise_std", "noisy_fraction", "noisy_std", "camera_shake", "shake_prob", "arm_prob",
                     "dropout_fraction", "object_spin", "arm_joint_speed"):
            if getattr(self, name) < 0:
                raise ValueError(f"synth: {name} must be >= 0, got {getattr(self, name)}")


def _rot(v, ang):
    """Rotate vectors ``v`` (..., 2) by angles ``ang`` (...)."""
    c, s = np.cos(ang), np.sin(ang)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def _active_profile(rng, B, K, T):
    """(B, K, T) cumulative 'frames of motion' g(t): 0 before the start, rising by 1 per
    frame with smooth ends while active, then flat. Motion covers part of the clip."""
    t = np.arange(T, dtype=np.float64)
    start = rng.uniform(-0.5 * T, 0.5 * T, size=(B, K, 1))
    dur = rng.uniform(0.5 * T, 1.5 * T, size=(B, K, 1))
    ramp = np.clip(rng.uniform(1.0, 3.0, size=(B, K, 1)), 1e-3, None)
    # speed in [0, 1]: smooth trapezoid, then integrate
    up = np.clip((t - start) / ramp, 0, 1)
    down = np.clip((start + dur - t) / ramp, 0, 1)
    speed = np.minimum(up, down)
    g = np.cumsum(speed, axis=-1) - speed[..., :1]
    return g


def _in_ellipse(p, centre, axes, ang):
    """p (B,T,N,2), centre (B,T,2), axes (B,2), ang (B,T) -> (B,T,N) bool."""
    d = _rot(p - centre[:, :, None], -ang[:, :, None])
    return (d[..., 0] / axes[:, None, None, 0]) ** 2 + (d[..., 1] / axes[:, None, None, 1]) ** 2 <= 1.0


def _seg_dist(p, a, b):
    """Distance of p (B,T,N,2) to segments a->b (B,T,2) -> (B,T,N)."""
    ab = (b - a)[:, :, None]
    ap = p - a[:, :, None]
    den = np.maximum((ab ** 2).sum(-1), 1e-12)
    u = np.clip((ap * ab).sum(-1) / den, 0, 1)
    return np.linalg.norm(ap - u[..., None] * ab, axis=-1)


@dataclass(frozen=True)
class _Grid:
    """The clips' shape: ``B`` clips of ``T`` frames tracking ``N`` query points ``q0`` (B, N, 2)
    in an ``S`` x ``S`` frame; ``px`` image pixels per reference pixel."""
    B: int
    T: int
    N: int
    S: float
    px: float
    q0: np.ndarray


def _query_grid(n_clips: int, cfg: SynthConfig) -> _Grid:
    """CoTracker-style grid of queries at frame 0, the same in every clip."""
    B, G, S = int(n_clips), cfg.grid, float(cfg.image_size)
    c = (np.arange(G) + 0.5) * S / G
    gx, gy = np.meshgrid(c, c)
    q = np.stack([gx.ravel(), gy.ravel()], -1)  # (N, 2)
    return _Grid(B, cfg.frames, G * G, S, S / DEFAULT_REF_SIZE, np.broadcast_to(q, (B, G * G, 2)))


def _rigid_objects(rng, cfg: SynthConfig, g: _Grid, pos, layer):
    """Move the points on 0-3 ellipses with them; later objects lie in front. Returns the
    positions, the layers (1..K on object k) and each object's silhouette ``(layer id,
    active (B,), centre (B, T, 2), axes (B, 2), angle (B, T))``."""
    B, T, S, q0 = g.B, g.T, g.S, g.q0
    layer, silhouettes = layer.copy(), []
    K = len(cfg.object_count_p) - 1
    n_obj = rng.choice(K + 1, size=B, p=np.asarray(cfg.object_count_p, float))
    if K == 0:
        return pos, layer, silhouettes
    centre0 = rng.uniform(0.1 * S, 0.9 * S, size=(B, K, 2))
    axes = rng.uniform(*cfg.object_radius, size=(B, K, 2)) * S
    ang0 = rng.uniform(0, np.pi, size=(B, K))
    heading = rng.uniform(0, 2 * np.pi, size=(B, K))
    speed = np.exp(rng.uniform(*np.log(cfg.object_speed), size=(B, K))) * g.px
    vel = speed[..., None] * np.stack([np.cos(heading), np.sin(heading)], -1)
    spin = rng.uniform(-cfg.object_spin, cfg.object_spin, size=(B, K))
    prof = _active_profile(rng, B, K, T)  # (B, K, T)
    for k in range(K):
        active = n_obj > k
        centre = centre0[:, k, None] + vel[:, k, None] * prof[:, k, :, None]  # (B, T, 2)
        ang = ang0[:, k, None] + spin[:, k, None] * prof[:, k]
        own = active[:, None] & _in_ellipse(q0[:, None], centre[:, :1], axes[:, k], ang[:, :1])[:, 0]
        layer[own] = k + 1
        moved = centre[:, :, None] + _rot(q0[:, None] - centre0[:, None, None, k],
                                           (ang - ang0[:, k, None])[:, :, None])
        pos = np.where(own[:, None, :, None], moved, pos)
        silhouettes.append((k + 1, active, centre, axes[:, k], ang))
    return pos, layer, silhouettes


@dataclass(frozen=True)
class _Arm:
    """An articulated arm per clip: link i of clip b (when ``on[:, i]``) is a capsule of
    ``radius[:, i]`` from ``joints[i]`` to ``joints[i + 1]`` (each (B, T, 2))."""
    layer: int
    on: np.ndarray
    joints: list
    radius: np.ndarray


def _arm(rng, cfg: SynthConfig, g: _Grid, layer_id: int) -> tuple[_Arm, np.ndarray]:
    """Draw the arms (2-3 links hinged near the bottom edge, in ``arm_prob`` of the clips)
    and their motion; also the absolute link angles (B, L, T)."""
    B, T, S, L = g.B, g.T, g.S, 3
    has_arm = rng.uniform(size=B) < cfg.arm_prob
    n_links = rng.integers(2, L + 1, size=B)
    base = np.stack([rng.uniform(0.15 * S, 0.85 * S, size=B), np.full(B, 1.02 * S)], -1)
    length = rng.uniform(*cfg.arm_link_length, size=(B, L)) * S
    radius = rng.uniform(*cfg.arm_link_radius, size=(B, L)) * S
    theta0 = np.concatenate([rng.uniform(-np.pi * 0.85, -np.pi * 0.15, size=(B, 1)),
                             rng.uniform(-1.2, 1.2, size=(B, L - 1))], axis=1)
    omega = rng.uniform(-cfg.arm_joint_speed, cfg.arm_joint_speed, size=(B, L))
    garm = _active_profile(rng, B, 1, T)[:, 0]  # joints move together, like a commanded motion
    theta = theta0[:, :, None] + omega[:, :, None] * garm[:, None, :]  # (B, L, T)
    alpha = np.cumsum(theta, axis=1)  # absolute link angles
    joints = [np.broadcast_to(base[:, None], (B, T, 2))]
    for i in range(L):
        d = length[:, i, None, None] * np.stack([np.cos(alpha[:, i]), np.sin(alpha[:, i])], -1)
        joints.append(joints[-1] + d)
    on = has_arm[:, None] & (n_links[:, None] > np.arange(L))
    return _Arm(layer_id, on, joints, radius), alpha


def _move_with_arm(arm: _Arm, alpha, g: _Grid, pos, layer):
    """Points on a link at frame 0 (the nearest link's) turn with it; returns positions and layers."""
    q0, L = g.q0, arm.radius.shape[1]
    best = np.full((g.B, g.N), np.inf)
    arm_link = np.full((g.B, g.N), -1)
    for i in range(L):
        dist0 = _seg_dist(q0[:, None], arm.joints[i][:, :1], arm.joints[i + 1][:, :1])[:, 0]
        mine = arm.on[:, i, None] & (dist0 <= arm.radius[:, i, None]) & (dist0 < best)
        best = np.where(mine, dist0, best)
        arm_link = np.where(mine, i, arm_link)
    for i in range(L):
        own = arm_link == i
        local = _rot(q0 - arm.joints[i][:, 0, None], -alpha[:, i, 0, None])  # (B, N, 2)
        moved = arm.joints[i][:, :, None] + _rot(local[:, None], alpha[:, i, :, None])
        pos = np.where(own[:, None, :, None], moved, pos)
    layer = layer.copy()
    layer[arm_link >= 0] = arm.layer
    return pos, layer


def _unoccluded(pos, layer, silhouettes, arm: _Arm) -> np.ndarray:
    """(B, T, N) bool: the point is not behind a shape of a nearer layer."""
    vis = np.ones(pos.shape[:-1], bool)
    for lay, active, centre, ax, ang in silhouettes:
        inside = active[:, None, None] & _in_ellipse(pos, centre, ax, ang)
        vis &= ~(inside & (layer[:, None, :] < lay))
    arm_inside = np.zeros(pos.shape[:-1], bool)
    for i in range(arm.radius.shape[1]):
        dist = _seg_dist(pos, arm.joints[i], arm.joints[i + 1])
        arm_inside |= arm.on[:, i, None, None] & (dist <= arm.radius[:, i, None, None])
    return vis & ~(arm_inside & (layer[:, None, :] < arm.layer))


def _camera_shake(rng, cfg: SynthConfig, g: _Grid) -> np.ndarray:
    """(B, T, 2) offset of the whole frame: a random walk in ``shake_prob`` of the clips."""
    shaky = rng.uniform(size=g.B) < cfg.shake_prob
    steps = rng.normal(0, cfg.camera_shake * g.px, size=(g.B, g.T, 2)) * shaky[:, None, None]
    steps[:, 0] = 0
    return np.cumsum(steps, axis=1)


def _dropouts(rng, cfg: SynthConfig, g: _Grid) -> np.ndarray:
    """(B, T, N) bool: the tracker lost the point (a few frames, ``dropout_fraction`` of points)."""
    B, T, N = g.B, g.T, g.N
    drop = rng.uniform(size=(B, N)) < cfg.dropout_fraction
    d0 = rng.integers(0, T, size=(B, N))
    dlen = rng.integers(1, max(2, T // 3), size=(B, N))
    t = np.arange(T)[None, :, None]
    return drop[:, None] & (t >= d0[:, None]) & (t < (d0 + dlen)[:, None])


def _tracker_noise(rng, cfg: SynthConfig, g: _Grid) -> np.ndarray:
    """(B, T, N, 2) noise, heavier on a few (textureless) points."""
    std = np.where(rng.uniform(size=(g.B, g.N)) < cfg.noisy_fraction, cfg.noisy_std, cfg.noise_std) * g.px
    return rng.normal(size=(g.B, g.T, g.N, 2)) * std[:, None, :, None]


def synth_clips(n_clips: int, seed=0, cfg: SynthConfig | None = None, with_layers: bool = False) -> dict:
    """``n_clips`` synthetic clips.

    Returns ``tracks`` ``(B, T, N, 2)`` float32 (x, y) pixels of the ``image_size`` square,
    ``visibility`` ``(B, T, N)`` bool, ``image_size`` ``[H, W]`` int64 and ``start_frame``
    ``(B,)`` int64 (clip b starts at ``b * frames``, as if cut from one long recording).
    ``seed`` is an int or a ``numpy.random.Generator``. ``with_layers`` adds ``layer``
    ``(B, N)`` int64: 0 background, 1..3 objects, 4 arm (the layer each point is on).
    """
    cfg = cfg or SynthConfig()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    g = _query_grid(n_clips, cfg)
    pos = np.broadcast_to(g.q0[:, None], (g.B, g.T, g.N, 2)).copy()
    layer = np.zeros((g.B, g.N), np.int64)  # 0 background, 1..K objects, K+1 arm
    # the draws keep this order (objects, arm, shake, dropouts, noise): the output is fixed by the seed
    pos, layer, silhouettes = _rigid_objects(rng, cfg, g, pos, layer)
    arm, alpha = _arm(rng, cfg, g, len(cfg.object_count_p))
    pos, layer = _move_with_arm(arm, alpha, g, pos, layer)
    vis = _unoccluded(pos, layer, silhouettes, arm)
    pos = pos + _camera_shake(rng, cfg, g)[:, :, None]
    vis &= (pos >= 0).all(-1) & (pos[..., 0] < g.S) & (pos[..., 1] < g.S)
    vis &= ~_dropouts(rng, cfg, g)
    pos = pos + _tracker_noise(rng, cfg, g)
    out = {
        "tracks": pos.astype(np.float32),
        "visibility": vis,
        "image_size": np.array([cfg.image_size, cfg.image_size], np.int64),
        "start_frame": np.arange(g.B, dtype=np.int64) * g.T,
    }
    if with_layers:
        out["layer"] = layer
    return out


def prepare_out(out_dir, overwrite: bool = False) -> list[Path]:
    """Make ``out_dir`` ready for synth; returns the earlier synth files it removed.

    A new or empty folder is used as it is. A folder holding anything else is refused
    (UserError), since build-shards would read old and new files together; with
    ``overwrite`` earlier synth output (``synth-NNNNNN.npz``, ``synth.json`` and their
    temporaries) is removed, but a folder that also holds other files is still refused
    and nothing is removed.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    own = [p for p in entries if p.is_file() and _OWN.match(p.name)]
    other = [p for p in entries if p not in own]
    if other:
        raise UserError(f"{out}: holds files that synth did not write ({some_names((p.name for p in other), 3)}); "
                        f"build-shards would read them "
                        f"with the synthetic ones; choose a new or empty --out")
    if own and not overwrite:
        raise UserError(f"{out}: holds earlier synth output ({len(own)} files); pass --overwrite to replace it, "
                        f"or choose a new or empty --out")
    for p in own:
        p.unlink()
    return own


def write_synth(out_dir, n_clips: int, seed: int = 0, cfg: SynthConfig | None = None,
                clips_per_file: int = 100, progress=None) -> list[str]:
    """Write ``ceil(n_clips / clips_per_file)`` files ``synth-NNNNNN.npz`` into ``out_dir``.

    File i is generated from ``numpy.random.default_rng([seed, i])``, so a file does not
    depend on how many files are written. Writes are atomic (temp name + rename).
    ``progress`` is an optional callable called with the number of clips written.
    """
    cfg = cfg or SynthConfig()
    if n_clips < 1 or clips_per_file < 1:
        raise ValueError(f"synth: need clips >= 1 and clips_per_file >= 1, got {n_clips}, {clips_per_file}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, lo in enumerate(range(0, n_clips, clips_per_file)):
        n = min(clips_per_file, n_clips - lo)
        d = synth_clips(n, np.random.default_rng([seed, i]), cfg)
        d["start_frame"] = d["start_frame"] + lo * cfg.frames
        path = os.path.join(out_dir, f"synth-{i:06d}.npz")
        with atomic_open(path, "wb") as f:
            np.savez_compressed(f, **d)
        paths.append(path)
        if progress is not None:
            progress(n)
    return paths


def config_dict(cfg: SynthConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def clips_from_sequences(seqs, window: int = DEFAULT_T, stride: int = 8):
    """Stack the windows of Sequences into ``(C, window, N, 2)`` positions and ``(C, window, N)`` visibility."""
    from motion_data.common.clips import cut_windows

    pos, vis = [], []
    for s in seqs:
        for _start, p, m in cut_windows(s, window, stride):
            pos.append(p)
            vis.append(m)
    if not pos:
        return np.zeros((0, window, 0, 2), np.float32), np.zeros((0, window, 0), bool)
    return np.stack(pos), np.stack(vis)
