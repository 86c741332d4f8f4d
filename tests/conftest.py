"""Shared fixtures: generated CoTracker-style track files and a tiny finished build.

``tiny_build`` is a real ``build-shards`` output (stats.zarr, 3 shards of uneven size,
manifest.parquet, build.json) of 60 clips with N = 100 points and T = 16 frames, built
from four ``.npz`` track files with a static background and some moving points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from motion_data.common import labels as L

TINY_GRID = 10            # N = 100 points
TINY_MAXCOUNT = 25        # 60 clips -> shards of 25, 25, 10
TINY_FILES = (("cam_a.npz", 3, 0), ("cam_b.npz", 3, 1), ("cam_c.npz", 3, 2), ("solo.npz", 1, 3))  # name, B, seed
TINY_T = 56               # 55 steps -> 6 windows of 16 frames at stride 8


def make_tracks(B=2, T=40, grid=TINY_GRID, image_size=(96, 128), seed=0, moving=(0.1, 0.5), occlusion=0.05):
    """``(tracks (B,T,N,2) float32 px, visibility (B,T,N) bool)``: a static point grid with
    tracker jitter, a share of points (per sequence, drawn from ``moving``) moving with a
    smooth random velocity of 0.3-4 px/frame, and short occlusions."""
    rng = np.random.default_rng(seed)
    H, W = image_size
    xs, ys = np.meshgrid(np.linspace(6, W - 6, grid), np.linspace(6, H - 6, grid))
    base = np.stack([xs.ravel(), ys.ravel()], -1)  # (N, 2)
    N = base.shape[0]
    tracks = np.repeat(base[None, None], B, 0).repeat(T, 1).astype(np.float64)
    tracks += rng.normal(0, 0.05, tracks.shape)  # tracker jitter on static points
    vis = np.ones((B, T, N), bool)
    for b in range(B):
        share = rng.uniform(*moving)
        mov = rng.permutation(N)[: max(1, int(share * N))]
        speed = rng.uniform(0.3, 4.0)
        ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.15, T))
        v = speed * np.stack([np.cos(ang), np.sin(ang)], -1)  # (T, 2) px/frame, shared by the object
        v = v[:, None, :] * rng.uniform(0.6, 1.4, (1, len(mov), 1))
        tracks[b, :, mov] += np.cumsum(v, 0).transpose(1, 0, 2)
        n_occ = int(occlusion * N)
        for n in rng.choice(N, n_occ, replace=False):
            t0 = rng.integers(0, T - 3)
            vis[b, t0:t0 + rng.integers(2, 6), n] = False
    return tracks.astype(np.float32), vis


def make_track_file(path, B=2, T=40, grid=TINY_GRID, image_size=(96, 128), seed=0, **kw) -> Path:
    """Write a CoTracker-style ``.npz`` (tracks, visibility, image_size) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tracks, vis = make_tracks(B, T, grid, image_size, seed, **kw)
    np.savez(path, tracks=tracks, visibility=vis, image_size=np.array(image_size, np.int64))
    return path


@pytest.fixture(scope="session")
def tiny_tracks(tmp_path_factory) -> Path:
    """Folder of the four track files ``tiny_build`` is built from."""
    d = tmp_path_factory.mktemp("tiny_tracks")
    for name, B, seed in TINY_FILES:
        make_track_file(d / name, B=B, T=TINY_T, seed=seed)
    return d


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_tracks) -> Path:
    """A finished build folder: 60 clips, N=100, T=16, shards of 25/25/10 clips."""
    from motion_data.build.build_shards import build
    from motion_data.build.setup import Options

    out = tmp_path_factory.mktemp("tiny_build") / "build"
    build([str(tiny_tracks)], out, Options(maxcount=TINY_MAXCOUNT), progress=False)
    return out


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny ops run faster without thread hand-offs, and float
    sums do not depend on the machine's core count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def point_stats(pos, vis, W=L.DEFAULT_W, ref_size=L.DEFAULT_REF_SIZE, rule=L.DEFAULT_LABEL_RULE):
    """The per-point statistics of clips, from the build's own kernel (``stats.shard_stats``)."""
    from motion_data.build.stats import shard_stats

    return shard_stats(pos, vis, W, ref_size, rule)[0]


def class_histograms(pos, vis, metric, W=L.DEFAULT_W, ref_size=L.DEFAULT_REF_SIZE, rule=L.DEFAULT_LABEL_RULE):
    """``(points, topk)`` of one metric, from the build's own kernel (``stats.shard_stats``)."""
    from motion_data.build.stats import shard_stats

    return shard_stats(pos, vis, W, ref_size, rule)[1][metric]
