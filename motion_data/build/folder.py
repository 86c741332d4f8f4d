"""The one reader of a build folder (docs/DESIGN.md "Artifacts"): paths, ``stats.zarr``
attributes (format version checked), the manifest, the store, the class histograms, the
label rule, the class counts under a filter and the W/N/T compatibility check.

    b = BuildDir(path)
    b.W, b.N, b.T, b.label_rule, b.build_filter   # attributes
    b.manifest(["clip_id", "shard"])              # {column: list}, one row per clip
    b.histograms(["p95"])                         # {metric: (points, topk)}
    b.class_counts(static_filter)                 # (W*W,) kept-label counts, every clip
    b.check_compatible(W=15, N=400, what="...")   # one-line error when they differ
    b.rows_of(["clip-id"])                        # manifest rows of clips

Reading clips from the shards is ``read.clips`` (the reading side builds on this).

Every failure is a :class:`DataError` (a ValueError) whose one line names the file
and the way out.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from motion_data.build.manifest import MANIFEST_NAME, read_manifest
from motion_data.common.errors import DataError, one_line
from motion_data.common.storage import Url, location
from motion_data.common.static_filter import StaticFilter, recorded_filter
from motion_data.build.stats import HIST_BIN_WIDTH, HIST_EDGES, HIST_NBINS, HIST_RANK_MAX, filtered_counts_from_hist, threshold_bin
from motion_data.build.store import REBUILD_HINT, STORE_NAME, open_store

# ---------------------------------------------------------------- checks of what a build recorded


def open_build_store(root, store_path):
    """The ``stats.zarr`` group of the build in ``root``, read-only (``store.open_store``)."""
    if not (store_path / "zarr.json" if isinstance(store_path, Url) else store_path).exists():
        raise DataError(f"{store_path}: not found (is {root} a build-shards output folder? {REBUILD_HINT})")
    return open_store(store_path)  # its errors name the folder and the rebuild command


def recorded_int(attrs: dict, key: str, store_path) -> int:
    """The store attribute ``key`` as an int; a DataError when a build lacks it."""
    try:
        return int(attrs[key])
    except KeyError:
        raise DataError(f"{store_path}: attribute {key!r} missing; {REBUILD_HINT}") from None


def _int_attr(key: str, doc: str, less: int = 0) -> property:
    """A BuildDir property: store attribute ``key`` as an int, less ``less``."""
    return property(lambda self: recorded_int(self.attrs, key, self.store_path) - less, doc=doc)


def check_same_grid(root, have: dict, want: dict, what: str) -> None:
    """A one-line DataError naming the keys of ``have`` (the build's W/N/T) that differ from ``want``."""
    bad = [k for k in have if int(want[k]) != have[k]]
    if bad:
        has = ", ".join(f"{k}={have[k]}" for k in bad)
        need = ", ".join(f"{k}={want[k]}" for k in bad)
        raise DataError(f"{root}: the build has {has} but {what} has {need}; use a build made "
                        f"with the same window and grid, or retrain")


# ---------------------------------------------------------------- histograms and class counts


def check_hist_bins(attrs: dict, store_path) -> None:
    """The build's histograms are binned as this version bins them (else a rebuild is needed)."""
    if abs(float(attrs.get("hist_bin_width", -1)) - HIST_BIN_WIDTH) > 1e-12 or \
            int(attrs.get("hist_nbins", -1)) != HIST_NBINS:
        raise DataError(f"{store_path}: histogram bins (width {attrs.get('hist_bin_width')}, "
                        f"{attrs.get('hist_nbins')} bins) differ from this version's ({HIST_BIN_WIDTH}, "
                        f"{HIST_NBINS}); {REBUILD_HINT}")


def read_hist(store, store_path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(points, topk)`` class histograms of ``metric``."""
    try:
        return np.asarray(store[f"hist/{metric}/points"][:]), np.asarray(store[f"hist/{metric}/topk"][:])
    except KeyError:
        raise DataError(f"{store_path}: no class histograms for metric {metric!r}") from None


def counts_from_hists(points, topk, flt: StaticFilter, W: int, store_path) -> np.ndarray:
    """Kept-label counts ``(W*W,)`` int64 under ``flt`` (all valid labels when off) from one
    metric's histograms."""
    if points.shape[-1] != W * W + 1:
        raise DataError(f"{store_path}: histograms are for {points.shape[-1] - 1} classes, expected W*W={W * W}")
    if flt.enable:
        counts, _ = filtered_counts_from_hist(points, topk, flt.threshold, flt.min_keep)
    else:
        counts = points.sum(axis=0)[:-1]
    return np.asarray(counts).astype(np.int64)


def hist_exact(flt: StaticFilter) -> bool:
    """Whether the histograms count ``flt``'s kept labels exactly (off, or a threshold on a
    bin edge with min_keep within the recorded ranks)."""
    if not flt.enable:
        return True
    edge = HIST_EDGES[threshold_bin(flt.threshold)]
    return flt.min_keep <= HIST_RANK_MAX and (np.float32(flt.threshold) == edge or flt.threshold <= 0)


# ---------------------------------------------------------------- the manifest


def read_build_manifest(build: "BuildDir", columns) -> dict:
    """``{column: list}`` of ``build``'s manifest, as many rows as its store holds clips. A
    one-line error gains the rebuild hint unless it names a command already or the build is remote."""
    try:
        man = read_manifest(build.manifest_path, columns=columns).to_pydict()
    except DataError as e:
        msg = one_line(e)
        raise DataError(msg if "build-shards" in msg or isinstance(build.root, Url) else f"{msg}; {REBUILD_HINT}") from None
    n = len(next(iter(man.values()))) if man else 0
    if n != build.n_clips:
        raise DataError(f"{build.manifest_path}: {n} rows but {build.store_path} holds {build.n_clips} clips; "
                        f"{REBUILD_HINT}")
    return man


def rows_of(clip_id_column, clip_ids, manifest_path) -> np.ndarray:
    """Rows of ``clip_ids`` in a manifest's ``clip_id`` column; DataError naming the first one it lacks."""
    row = {c: i for i, c in enumerate(clip_id_column)}
    missing = [c for c in clip_ids if c not in row]
    if missing:
        raise DataError(f"{manifest_path}: no clip {missing[0]!r} ({len(missing)} of {len(clip_ids)} "
                        f"missing); pass the build those clips come from")
    return np.fromiter((row[c] for c in clip_ids), np.int64, len(clip_ids))


class BuildDir:
    """A ``python -m preprocess build-shards`` output folder, read lazily (each part once)."""

    def __init__(self, root):
        self.root = location(root)  # a Path, or a storage.Url for a remote build
        self.store_path = self.root / STORE_NAME
        self.manifest_path = self.root / MANIFEST_NAME
        self.shards_dir = self.root / "shards"
        self.build_json = self.root / "build.json"

    def __repr__(self):
        return f"BuildDir({str(self.root)!r})"

    # ---------------------------------------------------------------- the store
    @cached_property
    def store(self):
        """The ``stats.zarr`` group, read-only (format version, label rule and shapes checked)."""
        return open_build_store(self.root, self.store_path)

    @cached_property
    def attrs(self) -> dict:
        return dict(self.store.attrs)

    W = _int_attr("W", "window size (labels are W*W classes)")
    N = _int_attr("N", "points per clip")
    T = _int_attr("T", "frames per clip")
    S = _int_attr("T", "steps per clip (T - 1)", less=1)
    ref_size = _int_attr("ref_size", "reference frame size in pixels")
    n_clips = _int_attr("n_clips", "clips in the build")
    label_rule = property(lambda self: str(self.attrs["label_rule"]), doc="the rule (labels.LABEL_RULES) of every label")
    build_filter = property(lambda self: recorded_filter(self.attrs),
                            doc="the recorded build filter (the evaluation mask's, docs/DESIGN.md Trainer)")

    def info(self) -> dict:
        """W, T, N, n_clips, ref_size, label_rule and build_filter as one dict."""
        return {"W": self.W, "T": self.T, "N": self.N, "n_clips": self.n_clips, "ref_size": self.ref_size,
                "label_rule": self.label_rule, "build_filter": self.build_filter}

    def check_compatible(self, *, W: int | None = None, N: int | None = None, T: int | None = None,
                         what: str = "the model"):
        """A one-line DataError when the build's W/N/T differ from ``what``'s (None: not checked)."""
        want = {"W": W, "N": N, "T": T}
        check_same_grid(self.root, {k: getattr(self, k) for k, v in want.items() if v is not None}, want, what)

    def per_clip(self, name: str, rows=slice(None)) -> np.ndarray:
        """``(C, N)`` per-clip array ``stats/<name>`` (optionally a row range)."""
        return np.asarray(self.store[f"stats/{name}"][rows])

    # ---------------------------------------------------------------- histograms and counts
    def histograms(self, metrics) -> dict:
        """``{metric: (points, topk)}`` int64 class histograms binned by point score."""
        check_hist_bins(self.attrs, self.store_path)
        return {m: read_hist(self.store, self.store_path, m) for m in metrics}

    def class_counts(self, static_filter: StaticFilter) -> np.ndarray:
        """Kept-label counts ``(W*W,)`` int64 of every clip under ``static_filter`` (all valid
        labels when off), from the build's histograms: no shard is read. Counts over some
        clips: ``read.clips.class_counts``."""
        (points, topk), = self.histograms([static_filter.metric]).values()
        return counts_from_hists(points, topk, static_filter, self.W, self.store_path)

    hist_exact = staticmethod(hist_exact)

    def rows_of(self, clip_ids) -> np.ndarray:
        """Manifest rows of ``clip_ids``; DataError naming the first one the build lacks."""
        return rows_of(self.read_columns["clip_id"], clip_ids, self.manifest_path)

    @cached_property
    def read_columns(self) -> dict:
        return self.manifest(["clip_id", "shard", "offset", "size", "checksum"])

    # ---------------------------------------------------------------- the manifest
    def manifest(self, columns=None) -> dict:
        """``{column: list}`` of ``manifest.parquet`` (all columns, or ``columns``), one row per
        clip in the store's row order (``manifest.read_manifest``: schema and ranges checked)."""
        return read_build_manifest(self, columns)

    def manifest_table(self):
        """The validated manifest as a pyarrow table (DataError names the file)."""
        return read_manifest(self.root, build_dir=self.root)
