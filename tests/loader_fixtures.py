"""A tiny build folder in the binding layout (stats.zarr, shards/*.tar, manifest.parquet).

Written directly with the core writers so the loader tests control shard sizes, sources and
per-clip motion; ``tests/conftest.py``'s ``tiny_build`` (from the build issue) is the
end-to-end counterpart.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from motion_data.build import shards
from motion_data.common.labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W, normalize, step_valid, velocities
from motion_data.common.static_filter import METRICS, StaticFilter
from conftest import point_stats
from motion_data.build.stats import dynamic_ratio
from motion_data.build.store import store_attrs


def synth_clips(n_clips: int, n_points: int = 16, steps: int = 15, seed: int = 0):
    """Positions (C, steps+1, N, 2) in px with a per-clip share of moving points (so dynamic
    ratios differ) and visibility (C, steps+1, N)."""
    rng = np.random.default_rng(seed)
    vel = np.zeros((n_clips, steps, n_points, 2), np.float32)
    for c in range(n_clips):
        n_dyn = int(rng.integers(0, n_points + 1))
        dyn = rng.permutation(n_points)[:n_dyn]
        vel[c, :, dyn] = rng.normal(0, 2.5, (n_dyn, steps, 2)).astype(np.float32)
        vel[c] += rng.normal(0, 0.02, vel[c].shape).astype(np.float32)  # tracker noise
    start = rng.uniform(20, 108, (n_clips, 1, n_points, 2))
    pos = np.concatenate([start, start + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    vis = rng.random((n_clips, steps + 1, n_points)) > 0.05
    return pos, vis


def write_build(root, shard_sizes=(5, 3, 4), n_points: int = 16, T: int = 16, sources=None,
                stride: int = 4, seed: int = 0) -> Path:
    """Write a build folder; clips of each source are consecutive windows ``stride`` apart."""
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    C = int(sum(shard_sizes))
    pos, vis = synth_clips(C, n_points, T - 1, seed)
    vel, valid = velocities(pos), step_valid(vis)
    st = point_stats(pos, vis, DEFAULT_W)
    sources = sources or ["videos/a.h5", "videos/b.h5"]
    src = [sources[i * len(sources) // C] for i in range(C)]
    start = np.zeros(C, np.int64)
    for s in sorted(set(src)):
        idx = [i for i in range(C) if src[i] == s]
        start[idx] = np.arange(len(idx)) * stride
    ids = []
    for i in range(C):
        h = hashlib.sha1(src[i].encode()).hexdigest()[:8]
        ids.append(f"{Path(src[i]).stem}-{h}-s0000-f{start[i]:06d}")
    rows = {"shard": [], "offset": [], "size": [], "checksum": []}
    i0 = 0
    for k, n in enumerate(shard_sizes):
        rel = f"shards/{shards.shard_name(k)}"
        samples = [shards.encode_sample(ids[i], pos[i], vis[i],
                                        np.stack([st[m][i] for m in METRICS]),
                                        {"source": src[i], "sequence": 0, "start_frame": int(start[i])})
                   for i in range(i0, i0 + n)]
        for key, off, size in shards.write_shard(root / rel, samples):
            rows["shard"].append(rel)
            rows["offset"].append(off)
            rows["size"].append(size)
        rows["checksum"] += [shards.sample_checksum(x) for x in samples]
        i0 += n
    flt = StaticFilter(enable=True)
    dr = dynamic_ratio(st["p95"], st["valid_count"], flt)
    vn = normalize(vel, DEFAULT_W)
    speed = np.linalg.norm(vn, axis=-1)
    g = zarr.open_group(str(root / "stats.zarr"), mode="w")
    g.attrs.update(store_attrs(W=DEFAULT_W, ref_size=DEFAULT_REF_SIZE, T=T, N=n_points, n_clips=C,
                               build_filter={"metric": "p95", "threshold": 0.04, "min_keep": 16},
                               label_rule=DEFAULT_LABEL_RULE))
    for name in (*METRICS, "center_count", "valid_count"):
        a = g.create_array(f"stats/{name}", shape=st[name].shape, dtype=st[name].dtype, chunks=(max(C, 1), n_points))
        a[:] = st[name]
    table = pa.table({
        "clip_id": ids, "source": src, "sequence": np.zeros(C, np.int64), "start_frame": start,
        "shard": rows["shard"], "offset": np.asarray(rows["offset"], np.int64), "size": np.asarray(rows["size"], np.int64),
        "dynamic_ratio": dr.astype(np.float32), "center_share": np.zeros(C, np.float32),
        "mean_speed": np.array([speed[i][valid[i]].mean() if valid[i].any() else 0 for i in range(C)], np.float32),
        "visible_fraction": valid.mean(axis=(1, 2)).astype(np.float32),
        "checksum": np.asarray(rows["checksum"], np.int64), "split_group": src,
    })
    pq.write_table(table, root / "manifest.parquet")
    return root
