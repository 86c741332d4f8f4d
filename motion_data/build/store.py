"""``BUILD/stats.zarr``: per-clip per-point statistics, score histograms and build parameters.

Layout (docs/DESIGN.md, binding): attrs ``format_version``, ``W``, ``ref_size``, ``T``, ``N``,
``metrics``, ``hist_bin_width``, ``hist_nbins``, ``hist_rank_max``, ``build_filter``,
``label_rule`` (``labels.LABEL_RULES``: which rule made every label of the build),
``n_clips``; arrays ``stats/<metric>`` (C, N) float32, ``stats/center_count`` and
``stats/valid_count`` (C, N) uint8, ``hist/<metric>/points`` (NBINS, W*W+1) int64,
``hist/<metric>/topk`` (NBINS, RANK_MAX, W*W+1) int64, ``label_ring`` (W*W,) int64.
Row i of every per-clip array is row i of ``manifest.parquet``.

The store is written under a temporary name and renamed into place when complete, so
``stats.zarr`` either does not exist or is whole.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from motion_data.common.atomic import remove_stale, temp_path
from motion_data.common.labels import LABEL_RULES, ring_map
from motion_data.common.static_filter import METRICS
from motion_data.build.stats import HIST_BIN_WIDTH, HIST_NBINS, HIST_RANK_MAX
from motion_data.common.errors import DataError
from motion_data.common.storage import Url, location, storage_options

# 2: shards hold positions + visibility, manifest checksums, label_rule attribute
FORMAT_VERSION = 2
REBUILD_HINT = "rebuild it with `python -m preprocess build-shards`"
STORE_NAME = "stats.zarr"
FLOAT_ARRAYS = METRICS
COUNT_ARRAYS = ("center_count", "valid_count")
PER_CLIP = FLOAT_ARRAYS + COUNT_ARRAYS
# rows per chunk of the per-clip arrays: ~1.6 MB per float chunk at N=400
CHUNK_ROWS = 1024

def empty_hists(W: int) -> dict:
    """Zeroed ``{metric: (points, topk)}`` histograms, to sum batches into."""
    K = W * W + 1
    return {m: (np.zeros((HIST_NBINS, K), np.int64), np.zeros((HIST_NBINS, HIST_RANK_MAX, K), np.int64))
            for m in METRICS}


class StoreWriter:
    """Streams per-clip rows into a new store at a temporary path; ``close`` renames it.

    Rows are buffered to whole chunks so every chunk is written exactly once.
    """

    def __init__(self, path, n_clips: int, N: int, attrs: dict):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        remove_stale(self.path)
        self.n_clips, self.N = int(n_clips), int(N)
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        chunks = (max(1, min(CHUNK_ROWS, self.n_clips)), max(1, self.N))
        self.arrays = {}
        for name in PER_CLIP:
            dtype = "float32" if name in FLOAT_ARRAYS else "uint8"
            self.arrays[name] = self.group.create_array(f"stats/{name}", shape=(self.n_clips, self.N),
                                                        dtype=dtype, chunks=chunks, fill_value=0)
        self.attrs = dict(attrs)
        self._buf: dict[str, list] = {k: [] for k in PER_CLIP}
        self._buffered = 0
        self._written = 0
        self._chunk = chunks[0]

    def append(self, rows: dict) -> None:
        """Add ``{name: (c, N) array}`` rows for the next ``c`` clips."""
        c = len(rows[PER_CLIP[0]])
        for k in PER_CLIP:
            a = np.asarray(rows[k])
            if a.shape != (c, self.N):
                raise DataError(f"{self.path}: rows of {k} have shape {a.shape}, expected {(c, self.N)}")
            self._buf[k].append(a)
        self._buffered += c
        if self._buffered >= self._chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._buffered:
            return
        joined = {k: np.concatenate(v) for k, v in self._buf.items()}
        n = self._buffered if final else (self._buffered // self._chunk) * self._chunk
        if self._written + self._buffered > self.n_clips:
            raise DataError(f"{self.path}: more rows than the {self.n_clips} clips announced")
        for k, a in joined.items():
            self.arrays[k][self._written:self._written + n] = a[:n]
            self._buf[k] = [a[n:]] if n < len(a) else []
        self._written += n
        self._buffered -= n

    def close(self, hists: dict, W: int) -> Path:
        """Write histograms, ring map and attrs, then rename the store into place."""
        self._flush(final=True)
        if self._written != self.n_clips:
            raise DataError(f"{self.path}: {self._written} rows written, {self.n_clips} announced")
        for m in METRICS:
            points, topk = hists[m]
            self.group.create_array(f"hist/{m}/points", data=np.asarray(points, np.int64))
            self.group.create_array(f"hist/{m}/topk", data=np.asarray(topk, np.int64))
        self.group.create_array("label_ring", data=ring_map(W))
        self.group.attrs.update(self.attrs)
        replace_dir(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def store_attrs(*, W: int, ref_size: int, T: int, N: int, build_filter, n_clips: int, label_rule: str) -> dict:
    """The binding attribute set; ``build_filter`` is a StaticFilter or its dict."""
    bf = build_filter if isinstance(build_filter, dict) else {
        "metric": build_filter.metric, "threshold": float(build_filter.threshold),
        "min_keep": int(build_filter.min_keep)}
    return {"format_version": FORMAT_VERSION, "W": int(W), "ref_size": int(ref_size), "T": int(T), "N": int(N),
            "metrics": list(METRICS), "hist_bin_width": HIST_BIN_WIDTH, "hist_nbins": HIST_NBINS,
            "hist_rank_max": HIST_RANK_MAX, "build_filter": dict(bf), "n_clips": int(n_clips),
            "label_rule": str(label_rule)}


def write_store(path, stats: dict, hists: dict, attrs: dict) -> Path:
    """One-shot writer: ``stats`` holds whole (C, N) arrays for every per-clip name."""
    C = len(stats[PER_CLIP[0]])
    w = StoreWriter(path, C, attrs["N"], {**attrs, "n_clips": C})
    try:
        w.append(stats)
        return w.close(hists, attrs["W"])
    except BaseException:
        w.abort()
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an old one at ``final`` is removed first."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def open_store(path) -> zarr.Group:
    """Open a store read-only, checking its format version and shapes."""
    path = location(path)
    if isinstance(path, Url):
        if path.name != STORE_NAME and (path / STORE_NAME / "zarr.json").exists():
            path = path / STORE_NAME
        try:
            from zarr.storage import FsspecStore

            g = zarr.open_group(store=FsspecStore.from_url(str(path), storage_options=storage_options(),
                                                           read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, OSError) as e:
            raise DataError(f"{path}: not a stats store ({type(e).__name__}: {e})") from None
    else:
        if path.is_dir() and path.name != STORE_NAME and (path / STORE_NAME).exists():
            path = path / STORE_NAME
        try:
            g = zarr.open_group(str(path), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a stats store ({e})") from None
    v = g.attrs.get("format_version")
    if v != FORMAT_VERSION:
        raise DataError(f"{path.parent}: a build of store format {v!r}, this code reads format {FORMAT_VERSION}; "
                         f"{REBUILD_HINT}")
    if g.attrs.get("label_rule") not in LABEL_RULES:
        raise DataError(f"{path}: attribute label_rule {g.attrs.get('label_rule')!r} is not one of {LABEL_RULES}")
    C, N = g.attrs["n_clips"], g.attrs["N"]
    for k in PER_CLIP:
        if tuple(g[f"stats/{k}"].shape) != (C, N):
            raise DataError(f"{path}: stats/{k} has shape {g[f'stats/{k}'].shape}, attrs say {(C, N)}")
    return g


def read_attrs(path) -> dict:
    return dict(open_store(path).attrs)


def read_stats(path, names=PER_CLIP, rows=slice(None)) -> dict:
    """``{name: (C, N) ndarray}`` for the requested per-clip arrays (optionally a row range)."""
    g = open_store(path)
    return {k: np.asarray(g[f"stats/{k}"][rows]) for k in names}
