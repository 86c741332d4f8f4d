"""Webdataset tar shards: the sample layout, atomic shard writing, random access by offset.

A sample (key = clip id) holds (DESIGN.md "Artifacts")
  ``pos.npy``    (T, N, 2) float32 (x, y) positions in reference pixels,
  ``vis.npy``    (T, N) bool visibility (velocities and valid steps follow from these two),
  ``stats.npy``  (3, N) float32 per-point mean, p95, max of ``||v_norm||`` (stats.METRICS order),
  ``json``       small metadata (source, sequence, start frame, ref_size, W, label rule).
Any webdataset reader can read the shards. For exact random access the writer returns, per
sample, the byte offset of its first tar header and the byte length up to the end of its
last member; ``shard_reader`` (the one reader) parses just that range. ``array_checksum`` of
each sample's arrays goes into the manifest (column ``checksum``); the reader compares it.
"""
from __future__ import annotations

import io
import json
import zlib
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from motion_data.common.atomic import atomic_open
from motion_data.common.errors import DataError

SAMPLE_EXTS = ("pos.npy", "vis.npy", "stats.npy", "json")

def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_sample(clip_id: str, pos: np.ndarray, vis: np.ndarray, stats: np.ndarray, meta: dict) -> dict:
    return {
        "__key__": clip_id,
        "pos.npy": np.ascontiguousarray(pos, dtype=np.float32),
        "vis.npy": np.ascontiguousarray(vis, dtype=np.bool_),
        "stats.npy": np.ascontiguousarray(stats, dtype=np.float32),
        "json": meta,
    }


def array_checksum(pos: np.ndarray, vis: np.ndarray, stats: np.ndarray) -> int:
    """CRC-32 of a sample's array data (C-order bytes of pos, vis, stats, in that order):
    the manifest's ``checksum`` column. Headers are not covered: readers check those."""
    c = 0
    for a in (pos, vis, stats):
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), c)
    return c


def sample_checksum(sample: dict) -> int:
    """``array_checksum`` of an ``encode_sample`` dict."""
    return array_checksum(sample["pos.npy"], sample["vis.npy"], sample["stats.npy"])


_NPY_HEADERS: dict = {}
# member fields as webdataset.TarWriter sets them (the shards stay byte-identical to its output)
_TAR_USER = "bigdata"
_TAR_MODE = 0o444


class _MemberInfo(tarfile.TarInfo):
    """A TarInfo made for one ``addfile`` call: ``addfile`` may use it as is instead of
    copying it first (a copy costs as much as the header itself)."""

    __slots__ = ()

    def __copy__(self):
        return self


def _npy_bytes(a: np.ndarray) -> bytes:
    """``numpy.lib.format.write_array`` bytes (what webdataset stores for ``.npy``), with the
    header made once per (dtype, shape) instead of once per array."""
    spec = (a.dtype.str, a.shape)
    head = _NPY_HEADERS.get(spec)
    if head is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a, allow_pickle=False)
        head = buf.getvalue()[:buf.tell() - a.nbytes]
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[spec] = head
    return head + a.tobytes()


def _encode_members(sample: dict) -> list[tuple[str, bytes]]:
    """(extension, bytes) in webdataset's member order (sorted by extension)."""
    out = []
    for ext in sorted(k for k in sample if not k.startswith("_")):
        v = sample[ext]
        if ext.endswith(".npy"):
            v = _npy_bytes(np.ascontiguousarray(v))
        elif ext == "json":
            v = json.dumps(v).encode("utf-8")
        elif isinstance(v, str):
            v = v.encode("utf-8")
        out.append((ext, bytes(v)))
    return out


def write_shard(path: str | os.PathLike, samples: list[dict], mtime: int | None = None) -> list[tuple[str, int, int]]:
    """Write ``samples`` (from ``encode_sample``) to ``path`` atomically.

    Returns ``[(key, offset, size), ...]`` in sample order. The tar is written under a
    temporary name and renamed only when complete, so a final name never holds a partial
    shard. ``mtime`` (integer seconds; default now) is every member's time: a fixed value
    makes the bytes reproducible.

    The bytes are exactly what ``webdataset.TarWriter`` writes for these samples (a test
    checks it); members go through ``tarfile`` in plain ustar format directly, which costs
    about half of TarWriter's per-member overhead (its encoder dispatch and pax-format
    header path), the build's largest per-clip cost.
    """
    path = Path(path)
    keys = [s["__key__"] for s in samples]
    if len(set(keys)) != len(keys):
        raise DataError(f"{path}: duplicate clip id among the samples")
    mtime = int(time.time()) if mtime is None else int(mtime)
    index = []
    with atomic_open(path, "wb") as f:  # the temp is removed if writing fails
        # copybufsize: each member's data in one write
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 22) as tf:
            for s in samples:
                key = s["__key__"]
                start = f.tell()
                for ext, data in _encode_members(s):
                    ti = _MemberInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), mtime, _TAR_MODE
                    ti.uname = ti.gname = _TAR_USER
                    tf.addfile(ti, io.BytesIO(data))
                # the sample's byte range: first header .. padded end of its last member
                index.append((key, start, f.tell() - start))
    return index


def index_shard(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """``(key, offset, size)`` for each sample of a shard, by scanning its tar headers."""
    out: list[list] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                end = m.offset_data + ((m.size + 511) // 512) * 512
                if out and out[-1][0] == key:
                    out[-1][2] = end - out[-1][1]
                else:
                    out.append([key, m.offset, end - m.offset])
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read shard ({e})") from None
    return [tuple(x) for x in out]
