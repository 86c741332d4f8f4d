"""Clips of a build read back from its shards, and label counts over some of them.

    read_clips(build, rows)                  # (positions, visibility, stats), checked
    class_counts(build, flt, rows=train)     # (W*W,) kept-label counts of those clips
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError
from motion_data.common.static_filter import StaticFilter
from motion_data.read.batch import BatchRecipe, make_batch
from motion_data.read.ranges import ranges_for
from motion_data.read.shard_reader import SampleRefs, read_batch


def read_clips(build: BuildDir, rows, fds=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(positions (B, T, N, 2) reference px, visibility (B, T, N), stats (B, 3, N))`` of
    manifest rows, read from the shards and checked (``shard_reader.read_batch``);
    DataError names the shard. ``fds``: a caller's range source (``ranges.ranges_for``) kept open across calls."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= build.n_clips):
        raise ValueError(f"clip rows must be in [0, {build.n_clips}), got {rows.min()}..{rows.max()}")
    man = build.read_columns
    own = fds is None
    fds = ranges_for(build.root) if own else fds
    try:
        refs = SampleRefs([str(build.root / man["shard"][i]) for i in rows], [man["offset"][i] for i in rows],
                          [man["size"][i] for i in rows], [man["clip_id"][i] for i in rows],
                          [man["checksum"][i] for i in rows])
        pos, vis, st, ok, err = read_batch(fds, refs, build.T, build.N)
    finally:
        if own:
            fds.close()
    if not ok.all():
        raise DataError(next(e for e in err if e is not None))
    return pos, vis, st


def class_counts(build: BuildDir, flt: StaticFilter, rows=None, progress: bool = False) -> np.ndarray:
    """Kept-label counts ``(W*W,)`` int64 under ``flt`` over manifest ``rows`` (all clips: None).

    The histograms sum over every clip, so the given clips are read and labelled as the
    loader does (``batch.make_batch``: same labels, same loss mask). When the histograms are
    exact for the filter and the other clips are fewer (a validation split), those are read
    instead and their counts subtracted from the whole build's."""
    if rows is None:
        return build.class_counts(flt)
    rows = np.unique(np.asarray(rows, np.int64))
    rest = np.setdiff1d(np.arange(build.n_clips), rows)
    if len(rest) < len(rows) and build.hist_exact(flt):
        return build.class_counts(flt) - _read_counts(build, flt, rest, progress)
    return _read_counts(build, flt, rows, progress)


def _read_counts(build: BuildDir, flt: StaticFilter, rows: np.ndarray, progress: bool, chunk: int = 256):
    K = build.W * build.W
    counts = np.zeros(K, np.int64)
    fds = ranges_for(build.root)  # one descriptor per shard for the whole pass, not per chunk
    try:
        for lo in tqdm(range(0, len(rows), chunk), desc="class counts", unit="chunk", disable=not progress):
            r = rows[lo:lo + chunk]
            pos, vis, st = read_clips(build, r, fds)
            b = make_batch(pos, vis, st, [""] * len(r), BatchRecipe.of_build(build, flt))
            counts += np.bincount(b["labels"][b["mask"]].numpy(), minlength=K)[:K]
    finally:
        fds.close()
    return counts
