"""``BUILD/manifest.parquet``: one row per clip, in the row order of ``stats.zarr``.

Columns (docs/DESIGN.md, binding): clip_id, source (the input file's path relative to the
input root, ``importers.source_name``), sequence, start_frame, shard (relative to
the build folder), offset, size (byte range of the sample in its tar), dynamic_ratio and
center_share under the build filter, mean_speed, visible_fraction; checksum
(``shards.array_checksum`` of the sample's arrays, compared by the readers); split_group
(the unit the train/validation split keeps together: the source file, or ``file#b`` for
the b-th independent sequence of a file without ``start_frame``, docs/DESIGN.md).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path, remove_stale
from .errors import UserError

MANIFEST_NAME = "manifest.parquet"
SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("sequence", pa.int64()),
    ("start_frame", pa.int64()),
    ("shard", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("dynamic_ratio", pa.float32()),
    ("center_share", pa.float32()),
    ("mean_speed", pa.float32()),
    ("visible_fraction", pa.float32()),
    ("checksum", pa.int64()),
    ("split_group", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)


class ManifestError(UserError, RuntimeError):
    """A manifest is missing, malformed or inconsistent; the message names the file."""


def source_hash8(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:8]


def clip_prefix(source: str) -> str:
    """``{stem}-{hash8}``: the part of a clip id shared by all clips of one source."""
    return f"{Path(source).stem}-{source_hash8(source)}"


def clip_id(source: str, sequence: int, start_frame: int, prefix: str | None = None) -> str:
    """``{stem}-{hash8}-s{sequence:04d}-f{start_frame:06d}``; hash8 = first 8 hex digits of
    the sha1 of ``source`` (the name relative to the input root, so moving the input folder
    keeps the ids). ``prefix`` (from ``clip_prefix``) skips recomputing it."""
    return f"{prefix or clip_prefix(source)}-s{int(sequence):04d}-f{int(start_frame):06d}"


def to_table(columns: dict) -> pa.Table:
    """Column dict (lists or arrays) -> a table with the binding schema."""
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"manifest columns missing: {missing}")
    return pa.table({c: pa.array(np.asarray(columns[c]) if c not in ("clip_id", "source", "shard", "split_group")
                                 else list(columns[c]), type=SCHEMA.field(c).type) for c in COLUMNS},
                    schema=SCHEMA)


def write_manifest(path, table_or_columns) -> Path:
    """Validate and write atomically (temporary name, then rename)."""
    table = table_or_columns if isinstance(table_or_columns, pa.Table) else to_table(table_or_columns)
    validate(table, where=str(path))
    path = Path(path)
    remove_stale(path)  # left by a killed writer
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def validate(table: pa.Table, where: str = "manifest", build_dir=None) -> pa.Table:
    """Check schema, unique clip ids and byte ranges; with ``build_dir`` also shard presence."""
    if not table.schema.equals(SCHEMA):
        names = table.schema.names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            old = " (an older build format; rebuild it with `python -m preprocess build-shards`)" \
                if "checksum" in missing else ""
            raise ManifestError(f"{where}: missing columns {missing}{old}")
        try:
            table = table.select(list(COLUMNS)).cast(SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ManifestError(f"{where}: column types do not match the manifest schema ({e})") from None
    ids = table.column("clip_id")
    if ids.null_count or len(pc.unique(ids)) != len(ids):
        raise ManifestError(f"{where}: clip_id values must be unique and non-null")
    off = table.column("offset").to_numpy()
    size = table.column("size").to_numpy()
    if len(off) and ((off < 0).any() or (size <= 0).any() or (off % 512).any()):
        raise ManifestError(f"{where}: invalid byte ranges (offsets must be >= 0 multiples of 512, sizes > 0)")
    if build_dir is not None:
        for s in pc.unique(table.column("shard")).to_pylist():
            p = Path(build_dir) / s
            if not p.is_file():
                raise ManifestError(f"{where}: shard {s} does not exist under {build_dir}")
    return table


def read_manifest(path, build_dir=None) -> pa.Table:
    """Read and validate; ``path`` may be the build folder."""
    path = Path(path)
    if path.is_dir():
        build_dir = path if build_dir is None else build_dir
        path = path / MANIFEST_NAME
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ManifestError(f"{path}: cannot read manifest ({e})") from None
    return validate(table, where=str(path), build_dir=build_dir)


def verify_build(build_dir, samples: bool = True) -> int:
    """Check that ``manifest.parquet``, the shards and ``stats.zarr`` describe the same clips.

    Every manifest row's byte range must be exactly one sample of that key in its shard
    (from the tar headers), every shard under ``shards/`` must hold only the manifest's
    samples, and the store must have one row per clip; with ``samples`` each sample's stored
    per-point statistics must also equal its store row. Raises ManifestError naming the
    manifest and the shard at the first disagreement; returns the number of clips.
    """
    from .labels import step_valid
    from .shard_reader import read_sample
    from .shards import ShardError, index_shard
    from .stats import METRICS
    from .builddir import BuildDir, BuildDirError
    from .store import PER_CLIP

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
        except ShardError as e:
            raise ManifestError(f"{where}: disagrees with the shards: {e}") from None
        for i in rows:
            got = index.get(ids[i])
            if got != (int(off[i]), int(size[i])):
                has = f"has it at offset {got[0]}, size {got[1]}" if got else "has no such sample"
                raise ManifestError(f"{where}: row {i} ({ids[i]}) says {s} offset {off[i]}, size {size[i]}; "
                                    f"the shard {has}")
        if len(index) != len(rows):
            extra = sorted(set(index) - {ids[i] for i in rows})[:3]
            raise ManifestError(f"{where}: {s} holds {len(index)} samples, the manifest lists {len(rows)} "
                                f"(not listed: {extra})")
    listed = {Path(s).name for s in rows_of}
    for p in sorted((build_dir / "shards").glob("*.tar")):
        if p.name not in listed:
            raise ManifestError(f"{where}: shards/{p.name} is not in the manifest")
    try:
        g = BuildDir(build_dir).store
    except BuildDirError as e:
        raise ManifestError(f"{where}: disagrees with the store: {e}") from None
    if int(g.attrs["n_clips"]) != len(ids):
        raise ManifestError(f"{where}: {len(ids)} rows, {build_dir / 'stats.zarr'} has {g.attrs['n_clips']} clips")
    if samples and ids:
        import numpy as np

        st = {k: np.asarray(g[f"stats/{k}"][:]) for k in PER_CLIP}
        for i in range(len(ids)):
            try:
                smp = read_sample(build_dir / shard[i], int(off[i]), int(size[i]), ids[i], int(checksum[i]))
            except ShardError as e:
                raise ManifestError(f"{where}: row {i}: {e}") from None
            mine = np.stack([st[m][i] for m in METRICS])
            if not (np.array_equal(smp["stats"], mine)
                    and np.array_equal(step_valid(smp["vis"]).sum(0), st["valid_count"][i])):
                raise ManifestError(f"{where}: row {i} ({ids[i]}): statistics in {shard[i]} differ from "
                                    f"{build_dir / 'stats.zarr'} row {i}")
    return len(ids)
