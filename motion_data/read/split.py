"""Deterministic train/validation split of a build's clips (``data.val_split``).

Rule (depends only on the manifest, never on file order or a random seed):
- With at least ``MIN_SOURCES_FOR_FILE_SPLIT`` source files, whole sources are held out:
  sources are ordered by the sha1 of their name (relative to the build's input root, so
  moving the input folder keeps the split) and taken until the held-out clips reach
  ``val_split`` of all clips (at least one source, never all of them). Clips of a held-out
  video never leak into training.
- With fewer sources, each source contributes a contiguous block of time: the last
  ``round(val_split * n)`` of its ``n`` clips by start frame (none for a one-clip source).
  Training keeps only clips whose frames ``[start, start + T)`` end before the first frame of
  that block, so overlapping training windows next to the block are dropped (the gap) and
  no validation window shares a frame with a training window. Frames are indexed per
  source file, so clips of different sequences of one file are treated as sharing frames.
A "source" here is the manifest's ``split_group``: the file, or ``file#b`` for each of B
independent sequences of a file without ``start_frame`` (docs/DESIGN.md).
"""
from __future__ import annotations

import hashlib

import numpy as np
from motion_data.common.errors import SettingError

MIN_SOURCES_FOR_FILE_SPLIT = 5


def _source_order(sources) -> list[str]:
    return sorted(set(sources), key=lambda s: (hashlib.sha1(s.encode()).hexdigest(), s))


def split_clips(source, start_frame, val_split: float, T: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)`` sorted int64 row indices of the manifest.

    source: per-clip source path; start_frame: per-clip first frame; T: frames per clip.
    """
    source = np.asarray(source, dtype=object)
    start = np.asarray(start_frame, dtype=np.int64)
    C = len(source)
    if not 0.0 <= val_split < 1.0:
        raise SettingError(f"data.val_split must be in [0, 1), got {val_split}")
    if C == 0 or val_split == 0.0:
        return np.arange(C, dtype=np.int64), np.zeros(0, np.int64)
    order = _source_order(source.tolist())
    if len(order) >= MIN_SOURCES_FOR_FILE_SPLIT:
        counts = {s: 0 for s in order}
        for s in source:
            counts[s] += 1
        held, n_held = set(), 0
        for s in order[:-1]:
            if n_held >= val_split * C and held:
                break
            held.add(s)
            n_held += counts[s]
        is_val = np.fromiter((s in held for s in source), bool, C)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)
    train, val = [], []
    for s in order:
        rows = np.flatnonzero(source == s)
        rows = rows[np.argsort(start[rows], kind="stable")]
        n_val = int(round(val_split * len(rows))) if len(rows) > 1 else 0
        if n_val == 0:
            train.append(rows)
            continue
        n_val = min(n_val, len(rows) - 1)
        block = rows[len(rows) - n_val:]
        first = start[block].min()
        val.append(rows[start[rows] >= first])
        train.append(rows[start[rows] + T <= first])
    cat = lambda xs: np.sort(np.concatenate(xs)).astype(np.int64) if xs else np.zeros(0, np.int64)
    return cat(train), cat(val)


def split_manifest(man: dict, val_split: float, T: int) -> tuple[np.ndarray, np.ndarray]:
    """``split_clips`` of a build's manifest columns (``split_group``, ``start_frame``)."""
    return split_clips(man["split_group"], man["start_frame"], val_split, T)
