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
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from motion_data.common.atomic import atomic_path, remove_stale, temp_path
from motion_data.common.errors import DataError
from motion_data.common.storage import Url, is_url, location

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
        raise DataError(f"manifest columns missing: {missing}")
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


ROW_GROUP = 1 << 17  # rows a streamed manifest gathers before it writes a row group


class ManifestWriter:
    """The manifest written piece by piece (``write(columns)``, then ``close()``), so a build's
    finalize never holds it whole: each piece is validated as it comes, clip ids are checked
    unique over all pieces by a 64-bit hash per id (8 bytes per clip; read back and compared
    exactly only if two hashes meet), and the file appears under its name only when closed."""

    def __init__(self, path):
        self.path = Path(path)
        remove_stale(self.path)
        self.tmp = temp_path(self.path)
        self.writer = pq.ParquetWriter(self.tmp, SCHEMA)
        self.buf, self.n, self.hashes = [], 0, []

    def write(self, columns: dict) -> None:
        t = validate(to_table(columns), where=str(self.path))
        self.hashes.append(np.fromiter(map(hash, t.column("clip_id").to_pylist()), np.int64, len(t)))
        self.buf.append(t)
        self.n += len(t)
        if self.n >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.buf:
            t = pa.concat_tables(self.buf)
            self.writer.write_table(t, row_group_size=len(t))
            self.buf, self.n = [], 0

    def close(self) -> Path:
        try:
            self._flush()
            self.writer.close()
            h = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)
            self.hashes = []
            h.sort()  # in place: 8 bytes per clip in all
            if (h[1:] == h[:-1]).any():
                validate(pq.read_table(self.tmp, columns=["clip_id"]), where=str(self.path))
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 (already closed or broken: the temp goes anyway)
            pass
        self.tmp.unlink(missing_ok=True)


def validate(table: pa.Table, where: str = "manifest", build_dir=None) -> pa.Table:
    """Check the schema of the table's columns (all of ``COLUMNS``, or a subset read with
    ``read_manifest(columns=)``), unique clip ids and byte ranges; with ``build_dir`` also
    that the shards exist."""
    names = table.schema.names
    want = pa.schema([SCHEMA.field(c) for c in names if c in COLUMNS])
    if not table.schema.equals(want) or len(names) != len(want):
        try:
            table = table.select([c for c in names if c in COLUMNS]).cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{where}: column types do not match the manifest schema ({e})") from None
    if "clip_id" in names:
        ids = table.column("clip_id")
        if ids.null_count or len(pc.unique(ids)) != len(ids):
            raise DataError(f"{where}: clip_id values must be unique and non-null")
    if "offset" in names and "size" in names:
        off = table.column("offset").to_numpy()
        size = table.column("size").to_numpy()
        if len(off) and ((off < 0).any() or (size <= 0).any() or (off % 512).any()):
            raise DataError(f"{where}: invalid byte ranges (offsets must be >= 0 multiples of 512, sizes > 0)")
    if build_dir is not None and "shard" in names and not is_url(build_dir):
        # (remote builds: a missing shard is named by the first read of it, storage.Url)
        for s in pc.unique(table.column("shard")).to_pylist():
            p = Path(build_dir) / s
            if not p.is_file():
                raise DataError(f"{where}: shard {s} does not exist under {build_dir}")
    return table


def read_manifest(path, build_dir=None, columns=None) -> pa.Table:
    """The one manifest reader: read (all columns, or ``columns``) and validate; ``path`` may
    be the build folder. DataError names the file."""
    path = location(path)
    if path.is_dir() if isinstance(path, Path) else not path.name.endswith(".parquet"):
        build_dir = path if build_dir is None else build_dir
        path = path / MANIFEST_NAME
    cols = list(COLUMNS if columns is None else columns)
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        raise ValueError(f"no manifest columns {unknown}; the manifest has {list(COLUMNS)}")
    try:
        with (path.open("rb") if isinstance(path, Url) else open(path, "rb")) as f:
            have = pq.read_schema(f).names
            missing = [c for c in cols if c not in have]
            if missing:
                old = " (an older build format; rebuild it with `python -m preprocess build-shards`)" \
                    if "checksum" in missing else ""
                raise DataError(f"{path}: missing columns {missing}{old}")
            f.seek(0)
            table = pq.read_table(f, columns=cols)
    except DataError:
        raise
    except (OSError, ValueError, pa.ArrowInvalid) as e:  # remote filesystems raise their own OSError/ValueError kinds
        raise DataError(f"{path}: cannot read manifest ({type(e).__name__}: {e})") from None
    return validate(table, where=str(path), build_dir=build_dir)
