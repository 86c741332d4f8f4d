"""Whether a build folder's manifest, shards and ``stats.zarr`` describe the same clips."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError
from motion_data.build.manifest import MANIFEST_NAME, read_manifest
from motion_data.build.shards import index_shard
from motion_data.build.store import PER_CLIP
from motion_data.common.labels import step_valid
from motion_data.common.static_filter import METRICS
from motion_data.read.shard_reader import read_sample


def verify_build(build_dir, samples: bool = True) -> int:
    """Check that ``manifest.parquet``, the shards and ``stats.zarr`` describe the same clips.

    Every manifest row's byte range must be exactly one sample of that key in its shard
    (from the tar headers), every shard under ``shards/`` must hold only the manifest's
    samples, and the store must have one row per clip; with ``samples`` each sample's stored
    per-point statistics must also equal its store row. Raises DataError naming the
    manifest and the shard at the first disagreement; returns the number of clips.
    """
    build_dir = Path(build_dir)
    where = build_dir / MANIFEST_NAME
    table = read_manifest(build_dir)
    ids = table.column("clip_id").to_pylist()
    shard = table.column("shard").to_pylist()
    off = table.column("offset").to_numpy()
    size = table.column("size").to_numpy()
    checksum = table.column("checksum").to_numpy()
    rows_of: dict = {}
    for i, s in enumerate(shard):
        rows_of.setdefault(s, []).append(i)
    for s, rows in rows_of.items():
        try:
            index = {k: (o, n) for k, o, n in index_shard(build_dir / s)}
        except DataError as e:
            raise DataError(f"{where}: disagrees with the shards: {e}") from None
        for i in rows:
            got = index.get(ids[i])
            if got != (int(off[i]), int(size[i])):
                has = f"has it at offset {got[0]}, size {got[1]}" if got else "has no such sample"
                raise DataError(f"{where}: row {i} ({ids[i]}) says {s} offset {off[i]}, size {size[i]}; "
                                    f"the shard {has}")
        if len(index) != len(rows):
            extra = sorted(set(index) - {ids[i] for i in rows})[:3]
            raise DataError(f"{where}: {s} holds {len(index)} samples, the manifest lists {len(rows)} "
                                f"(not listed: {extra})")
    listed = {Path(s).name for s in rows_of}
    for p in sorted((build_dir / "shards").glob("*.tar")):
        if p.name not in listed:
            raise DataError(f"{where}: shards/{p.name} is not in the manifest")
    try:
        g = BuildDir(build_dir).store
    except DataError as e:
        raise DataError(f"{where}: disagrees with the store: {e}") from None
    if int(g.attrs["n_clips"]) != len(ids):
        raise DataError(f"{where}: {len(ids)} rows, {build_dir / 'stats.zarr'} has {g.attrs['n_clips']} clips")
    if samples and ids:
        st = {k: np.asarray(g[f"stats/{k}"][:]) for k in PER_CLIP}
        for i in range(len(ids)):
            try:
                smp = read_sample(build_dir / shard[i], int(off[i]), int(size[i]), ids[i], int(checksum[i]))
            except DataError as e:
                raise DataError(f"{where}: row {i}: {e}") from None
            mine = np.stack([st[m][i] for m in METRICS])
            if not (np.array_equal(smp["stats"], mine)
                    and np.array_equal(step_valid(smp["vis"]).sum(0), st["valid_count"][i])):
                raise DataError(f"{where}: row {i} ({ids[i]}): statistics in {shard[i]} differ from "
                                    f"{build_dir / 'stats.zarr'} row {i}")
    return len(ids)
