"""The one reader of a build folder (docs/DESIGN.md "Artifacts"): paths, ``stats.zarr``
attributes (format version checked), the manifest, the store, the class histograms, the
label rule, the class counts under a filter and the W/N/T compatibility check.

    b = BuildDir(path)
    b.W, b.N, b.T, b.label_rule, b.build_filter   # attributes
    b.manifest(["clip_id", "shard"])              # {column: list}, one row per clip
    b.histograms(["p95"])                         # {metric: (points, topk)}
    b.class_counts(static_filter)                 # (W*W,) kept-label counts, every clip
    b.class_counts(static_filter, rows=train_rows)  # the same over some clips (read from the shards)
    b.check_compatible(W=15, N=400, what="...")   # one-line error when they differ
    b.read_clips(b.rows_of(["clip-id"]))         # (positions, visibility, stats) from the shards

Every failure is a :class:`BuildDirError` (a ValueError) whose one line names the file
and the way out.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .manifest import MANIFEST_NAME, read_manifest
from .stats import (HIST_BIN_WIDTH, HIST_EDGES, HIST_NBINS, HIST_RANK_MAX, StaticFilter, filtered_counts_from_hist,
                    recorded_filter, threshold_bin)
from .store import REBUILD_HINT, STORE_NAME, StoreError, open_store
from .errors import UserError, one_line


class BuildDirError(UserError, ValueError):
    """A build folder is missing, of another format or inconsistent; names the file."""


class BuildDir:
    """A ``python -m preprocess build-shards`` output folder, read lazily (each part once)."""

    def __init__(self, root):
        self.root = Path(root)
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
        if not self.store_path.exists():
            raise BuildDirError(f"{self.store_path}: not found (is {self.root} a build-shards output folder? "
                                f"{REBUILD_HINT})")
        try:
            return open_store(self.store_path)
        except StoreError as e:
            raise BuildDirError(str(e)) from None  # names the folder and the rebuild command

    @cached_property
    def attrs(self) -> dict:
        return dict(self.store.attrs)

    def _int(self, key: str) -> int:
        try:
            return int(self.attrs[key])
        except KeyError:
            raise BuildDirError(f"{self.store_path}: attribute {key!r} missing; {REBUILD_HINT}") from None

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
        """A one-line BuildDirError when the build's W/N/T differ from ``what``'s (None: not checked)."""
        want = {"W": W, "N": N, "T": T}
        bad = [k for k, v in want.items() if v is not None and int(v) != getattr(self, k)]
        if bad:
            have = ", ".join(f"{k}={getattr(self, k)}" for k in bad)
            need = ", ".join(f"{k}={want[k]}" for k in bad)
            raise BuildDirError(f"{self.root}: the build has {have} but {what} has {need}; use a build made "
                                f"with the same window and grid, or retrain")

    def per_clip(self, name: str, rows=slice(None)) -> np.ndarray:
        """``(C, N)`` per-clip array ``stats/<name>`` (optionally a row range)."""
        return np.asarray(self.store[f"stats/{name}"][rows])

    # ---------------------------------------------------------------- histograms and counts
    def histograms(self, metrics) -> dict:
        """``{metric: (points, topk)}`` int64 class histograms binned by point score."""
        a = self.attrs
        if abs(float(a.get("hist_bin_width", -1)) - HIST_BIN_WIDTH) > 1e-12 or int(a.get("hist_nbins", -1)) != HIST_NBINS:
            raise BuildDirError(f"{self.store_path}: histogram bins (width {a.get('hist_bin_width')}, "
                                f"{a.get('hist_nbins')} bins) differ from this version's ({HIST_BIN_WIDTH}, "
                                f"{HIST_NBINS}); {REBUILD_HINT}")
        out = {}
        for m in metrics:
            try:
                out[m] = (np.asarray(self.store[f"hist/{m}/points"][:]), np.asarray(self.store[f"hist/{m}/topk"][:]))
            except KeyError:
                raise BuildDirError(f"{self.store_path}: no class histograms for metric {m!r}") from None
        return out

    def class_counts(self, static_filter: StaticFilter, rows=None, progress: bool = False) -> np.ndarray:
        """Kept-label counts ``(W*W,)`` int64 under ``static_filter`` (all valid labels when off).

        ``rows=None``: every clip, from the build's histograms (no shard is read). ``rows``:
        manifest row indices (e.g. the training split of ``split.split_manifest``); the
        histograms sum over all clips, so shards are read and labelled as the loader does
        (``batch.make_batch``: same labels, same loss mask). When the histograms are exact
        for the filter, only the other clips (the smaller validation split) are read and
        their counts subtracted from the whole build's."""
        if rows is not None:
            rows = np.unique(np.asarray(rows, np.int64))
            rest = np.setdiff1d(np.arange(self.n_clips), rows)
            if len(rest) < len(rows) and self._hist_exact(static_filter):
                return self.class_counts(static_filter) - self._rows_class_counts(static_filter, rest, progress)
            return self._rows_class_counts(static_filter, rows, progress)
        (points, topk), = self.histograms([static_filter.metric]).values()
        if points.shape[-1] != self.W * self.W + 1:
            raise BuildDirError(f"{self.store_path}: histograms are for {points.shape[-1] - 1} classes, "
                                f"expected W*W={self.W * self.W}")
        if static_filter.enable:
            counts, _ = filtered_counts_from_hist(points, topk, static_filter.threshold, static_filter.min_keep)
        else:
            counts = points.sum(axis=0)[:-1]
        return np.asarray(counts).astype(np.int64)

    def _hist_exact(self, flt: StaticFilter) -> bool:
        """Whether the histograms count ``flt``'s kept labels exactly (off, or a threshold on a
        bin edge with min_keep within the recorded ranks)."""
        if not flt.enable:
            return True
        edge = HIST_EDGES[threshold_bin(flt.threshold)]
        return flt.min_keep <= HIST_RANK_MAX and (np.float32(flt.threshold) == edge or flt.threshold <= 0)

    def _rows_class_counts(self, flt: StaticFilter, rows: np.ndarray, progress: bool, chunk: int = 256) -> np.ndarray:
        from tqdm import tqdm

        from .batch import make_batch  # imports torch: only for this path

        from .shard_reader import FdCache

        K = self.W * self.W
        counts = np.zeros(K, np.int64)
        fds = FdCache()  # one descriptor per shard for the whole pass, not per chunk
        try:
            for lo in tqdm(range(0, len(rows), chunk), desc="class counts", unit="chunk", disable=not progress):
                r = rows[lo:lo + chunk]
                pos, vis, st = self.read_clips(r, fds)
                b = make_batch(pos, vis, st, [""] * len(r), flt, self.W, ref_size=self.ref_size,
                               label_rule=self.label_rule)
                counts += np.bincount(b["labels"][b["mask"]].numpy(), minlength=K)[:K]
        finally:
            fds.close()
        return counts

    # ---------------------------------------------------------------- clips
    def read_clips(self, rows, fds=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(positions (B, T, N, 2) reference px, visibility (B, T, N), stats (B, 3, N))`` of
        manifest rows, read from the shards and checked (``shard_reader.read_batch``);
        ShardError names the shard. ``fds``: a caller's ``FdCache`` kept open across calls."""
        from .shard_reader import FdCache, read_batch
        from .shards import ShardError

        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_clips):
            raise ValueError(f"clip rows must be in [0, {self.n_clips}), got {rows.min()}..{rows.max()}")
        man = self._read_columns
        own = fds is None
        fds = FdCache() if own else fds
        try:
            pos, vis, st, ok, err = read_batch(
                fds, [str(self.root / man["shard"][i]) for i in rows], [man["offset"][i] for i in rows],
                [man["size"][i] for i in rows], [man["clip_id"][i] for i in rows],
                [man["checksum"][i] for i in rows], self.T, self.N)
        finally:
            if own:
                fds.close()
        if not ok.all():
            raise ShardError(next(e for e in err if e is not None))
        return pos, vis, st

    def rows_of(self, clip_ids) -> np.ndarray:
        """Manifest rows of ``clip_ids``; BuildDirError naming the first one the build lacks."""
        row = {c: i for i, c in enumerate(self._read_columns["clip_id"])}
        missing = [c for c in clip_ids if c not in row]
        if missing:
            raise BuildDirError(f"{self.manifest_path}: no clip {missing[0]!r} ({len(missing)} of {len(clip_ids)} "
                                f"missing); pass the build those clips come from")
        return np.fromiter((row[c] for c in clip_ids), np.int64, len(clip_ids))

    @cached_property
    def _read_columns(self) -> dict:
        return self.manifest(["clip_id", "shard", "offset", "size", "checksum"])

    # ---------------------------------------------------------------- the manifest
    def manifest(self, columns=None) -> dict:
        """``{column: list}`` of ``manifest.parquet`` (all columns, or ``columns``), one row per
        clip in the store's row order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            man = pq.read_table(self.manifest_path, columns=None if columns is None else list(columns)).to_pydict()
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise BuildDirError(f"{self.manifest_path}: cannot read ({one_line(e)}); "
                                f"{REBUILD_HINT}") from None
        n = len(next(iter(man.values()))) if man else 0
        if n != self.n_clips:
            raise BuildDirError(f"{self.manifest_path}: {n} rows but {self.store_path} holds {self.n_clips} clips; "
                                f"{REBUILD_HINT}")
        return man

    def manifest_table(self):
        """The validated manifest as a pyarrow table (ManifestError names the file)."""
        return read_manifest(self.root, build_dir=self.root)

