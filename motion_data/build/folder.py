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
        if not (self.store_path / "zarr.json" if isinstance(self.store_path, Url) else self.store_path).exists():
            raise DataError(f"{self.store_path}: not found (is {self.root} a build-shards output folder? "
                                f"{REBUILD_HINT})")
        return open_store(self.store_path)  # its errors name the folder and the rebuild command

    @cached_property
    def attrs(self) -> dict:
        return dict(self.store.attrs)

    def _int(self, key: str) -> int:
        try:
            return int(self.attrs[key])
        except KeyError:
            raise DataError(f"{self.store_path}: attribute {key!r} missing; {REBUILD_HINT}") from None

    W = property(lambda self: self._int("W"), doc="window size (labels are W*W classes)")
    N = property(lambda self: self._int("N"), doc="points per clip")
    T = property(lambda self: self._int("T"), doc="frames per clip")
    S = property(lambda self: self._int("T") - 1, doc="steps per clip (T - 1)")
    ref_size = property(lambda self: self._int("ref_size"), doc="reference frame size in pixels")
    n_clips = property(lambda self: self._int("n_clips"), doc="clips in the build")

    @property
    def label_rule(self) -> str:
        """The rule (``labels.LABEL_RULES``) that made every label of the build."""
        return str(self.attrs["label_rule"])

    @property
    def build_filter(self) -> StaticFilter:
        """The recorded build filter (the evaluation mask's, docs/DESIGN.md Trainer)."""
        return recorded_filter(self.attrs)

    def info(self) -> dict:
        """W, T, N, n_clips, ref_size, label_rule and build_filter as one dict."""
        return {"W": self.W, "T": self.T, "N": self.N, "n_clips": self.n_clips, "ref_size": self.ref_size,
                "label_rule": self.label_rule, "build_filter": self.build_filter}

    def check_compatible(self, *, W: int | None = None, N: int | None = None, T: int | None = None,
                         what: str = "the model"):
        """A one-line DataError when the build's W/N/T differ from ``what``'s (None: not checked)."""
        want = {"W": W, "N": N, "T": T}
        bad = [k for k, v in want.items() if v is not None and int(v) != getattr(self, k)]
        if bad:
            have = ", ".join(f"{k}={getattr(self, k)}" for k in bad)
            need = ", ".join(f"{k}={want[k]}" for k in bad)
            raise DataError(f"{self.root}: the build has {have} but {what} has {need}; use a build made "
                                f"with the same window and grid, or retrain")

    def per_clip(self, name: str, rows=slice(None)) -> np.ndarray:
        """``(C, N)`` per-clip array ``stats/<name>`` (optionally a row range)."""
        return np.asarray(self.store[f"stats/{name}"][rows])

    # ---------------------------------------------------------------- histograms and counts
    def histograms(self, metrics) -> dict:
        """``{metric: (points, topk)}`` int64 class histograms binned by point score."""
        a = self.attrs
        if abs(float(a.get("hist_bin_width", -1)) - HIST_BIN_WIDTH) > 1e-12 or int(a.get("hist_nbins", -1)) != HIST_NBINS:
            raise DataError(f"{self.store_path}: histogram bins (width {a.get('hist_bin_width')}, "
                                f"{a.get('hist_nbins')} bins) differ from this version's ({HIST_BIN_WIDTH}, "
                                f"{HIST_NBINS}); {REBUILD_HINT}")
        out = {}
        for m in metrics:
            try:
                out[m] = (np.asarray(self.store[f"hist/{m}/points"][:]), np.asarray(self.store[f"hist/{m}/topk"][:]))
            except KeyError:
                raise DataError(f"{self.store_path}: no class histograms for metric {m!r}") from None
        return out

    def class_counts(self, static_filter: StaticFilter) -> np.ndarray:
        """Kept-label counts ``(W*W,)`` int64 of every clip under ``static_filter`` (all valid
        labels when off), from the build's histograms: no shard is read. Counts over some
        clips: ``read.clips.class_counts``."""
        (points, topk), = self.histograms([static_filter.metric]).values()
        if points.shape[-1] != self.W * self.W + 1:
            raise DataError(f"{self.store_path}: histograms are for {points.shape[-1] - 1} classes, "
                                f"expected W*W={self.W * self.W}")
        if static_filter.enable:
            counts, _ = filtered_counts_from_hist(points, topk, static_filter.threshold, static_filter.min_keep)
        else:
            counts = points.sum(axis=0)[:-1]
        return np.asarray(counts).astype(np.int64)

    def hist_exact(self, flt: StaticFilter) -> bool:
        """Whether the histograms count ``flt``'s kept labels exactly (off, or a threshold on a
        bin edge with min_keep within the recorded ranks)."""
        if not flt.enable:
            return True
        edge = HIST_EDGES[threshold_bin(flt.threshold)]
        return flt.min_keep <= HIST_RANK_MAX and (np.float32(flt.threshold) == edge or flt.threshold <= 0)

    def rows_of(self, clip_ids) -> np.ndarray:
        """Manifest rows of ``clip_ids``; DataError naming the first one the build lacks."""
        row = {c: i for i, c in enumerate(self.read_columns["clip_id"])}
        missing = [c for c in clip_ids if c not in row]
        if missing:
            raise DataError(f"{self.manifest_path}: no clip {missing[0]!r} ({len(missing)} of {len(clip_ids)} "
                                f"missing); pass the build those clips come from")
        return np.fromiter((row[c] for c in clip_ids), np.int64, len(clip_ids))

    @cached_property
    def read_columns(self) -> dict:
        return self.manifest(["clip_id", "shard", "offset", "size", "checksum"])

    # ---------------------------------------------------------------- the manifest
    def manifest(self, columns=None) -> dict:
        """``{column: list}`` of ``manifest.parquet`` (all columns, or ``columns``), one row per
        clip in the store's row order (``manifest.read_manifest``: schema and ranges checked)."""
        try:
            man = read_manifest(self.manifest_path, columns=columns).to_pydict()
        except DataError as e:
            msg = one_line(e)
            raise DataError(msg if "build-shards" in msg or isinstance(self.root, Url) else f"{msg}; {REBUILD_HINT}") from None
        n = len(next(iter(man.values()))) if man else 0
        if n != self.n_clips:
            raise DataError(f"{self.manifest_path}: {n} rows but {self.store_path} holds {self.n_clips} clips; "
                                f"{REBUILD_HINT}")
        return man

    def manifest_table(self):
        """The validated manifest as a pyarrow table (DataError names the file)."""
        return read_manifest(self.root, build_dir=self.root)

