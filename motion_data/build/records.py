"""The per-shard work of build-shards and its resume records.

For each shard the statistics and class histograms of all its clips are computed in one
kernel call, the tar is written (atomic), then a sidecar record ``OUT/.work/rec-NNNNNN.npz``
(stats rows, manifest fields, sparse histograms, resume cursor). A re-run resumes after the
last valid record.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from motion_data.common.errors import DataError

from motion_data.build import manifest as mf
from motion_data.common.atomic import atomic_open
from motion_data.build.pool import resolve_refs
from motion_data.common.labels import DEFAULT_LABEL_RULE
from motion_data.build.shards import encode_sample, sample_checksum, shard_name, write_shard
from motion_data.common.static_filter import METRICS, StaticFilter
from motion_data.build.stats import dynamic_ratio, keep_mask, shard_stats
from motion_data.build.store import PER_CLIP

# fixed member time: the same build gives byte-identical shards (any worker count, resumed or not)
SHARD_MTIME = 0


def clip_metrics(st: dict, S: int, flt: StaticFilter) -> dict:
    """Manifest figures of each clip from its per-point statistics."""
    vc = st["valid_count"].astype(np.int64)
    cc = st["center_count"].astype(np.int64)
    N = vc.shape[1]
    keep = keep_mask(st[flt.metric], st["valid_count"], flt.threshold, flt.min_keep)
    kv = (vc * keep).sum(1)
    nvalid = vc.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        center = np.where(kv > 0, (cc * keep).sum(1) / np.maximum(kv, 1), 0.0)
        speed = np.where(nvalid > 0, (st["mean"].astype(np.float64) * vc).sum(1) / np.maximum(nvalid, 1), 0.0)
    return {"dynamic_ratio": dynamic_ratio(st[flt.metric], st["valid_count"], flt),
            "center_share": center.astype(np.float32), "mean_speed": speed.astype(np.float32),
            "visible_fraction": (nvalid / float(S * N)).astype(np.float32)}


def _sparse(a: np.ndarray):
    """(flat indices, values) of the non-zero entries, indices ascending. Only rows whose
    last column (the point count) is non-zero can hold counts, so only those are scanned:
    the rank histograms are large and almost empty."""
    rows2 = a.reshape(-1, a.shape[-1])
    rows = np.flatnonzero(rows2[:, -1])
    sub = rows2[rows]
    r, c = np.nonzero(sub)
    return (rows[r] * a.shape[-1] + c).astype(np.int64), sub[r, c]


def add_sparse(dst: np.ndarray, idx, val):
    np.add.at(dst.reshape(-1), idx, val)


def _save_npz(path: Path, **arrays):
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


@dataclass
class ShardContext:
    out: Path
    work: Path
    W: int
    ref_size: int
    flt: StaticFilter
    label_rule: str = DEFAULT_LABEL_RULE


def write_shard_and_record(ctx: ShardContext, k: int, clips: dict, names: dict, cursor, finished: list, N: int) -> int:
    """Stats + histograms over the shard's clips (one kernel call each), tar, then record.

    ``names`` maps the shard's input indices to ``(path, clip id prefix)``.
    """
    pos, vis = resolve_refs(clips["pos"]), resolve_refs(clips["vis"])
    C, S = vis.shape[0], vis.shape[1] - 1
    # statistics and all histograms in one pass
    st, hists = shard_stats(pos, vis, ctx.W, ctx.ref_size, ctx.label_rule)
    stats3 = np.stack([st[m] for m in METRICS], axis=1)  # (C, 3, N)
    samples = []
    for i in range(C):
        j, sq, sf = int(clips["input"][i]), int(clips["sequence"][i]), int(clips["start_frame"][i])
        src, prefix = names[j]
        cid = mf.clip_id(src, sq, sf, prefix)
        meta = {"source": src, "sequence": sq, "start_frame": sf, "ref_size": ctx.ref_size, "W": ctx.W,
                "label_rule": ctx.label_rule}
        samples.append(encode_sample(cid, pos[i], vis[i], stats3[i], meta))
    checksum = np.array([sample_checksum(x) for x in samples], np.int64)
    index = write_shard(ctx.out / "shards" / shard_name(k), samples, mtime=SHARD_MTIME)
    hist = {}
    for m in METRICS:
        points, topk = hists[m]
        hist[f"{m}_points_idx"], hist[f"{m}_points_val"] = _sparse(points)
        hist[f"{m}_topk_idx"], hist[f"{m}_topk_val"] = _sparse(topk)
    met = clip_metrics(st, S, ctx.flt)
    _save_npz(ctx.work / f"rec-{k:06d}.npz",
              **{f"stat_{n}": st[n] for n in PER_CLIP}, **{f"m_{n}": v for n, v in met.items()}, **hist,
              input=clips["input"], sequence=clips["sequence"], start_frame=clips["start_frame"],
              independent=clips["independent"], checksum=checksum,
              offset=np.array([o for _, o, _ in index], np.int64), size=np.array([s for _, _, s in index], np.int64),
              cursor=np.array(cursor, np.int64), N=np.array(N), S=np.array(S),
              shard_bytes=np.array(os.path.getsize(ctx.out / "shards" / shard_name(k))),
              finished=np.array(json.dumps(finished)))
    return C


def _shard_matches(out: Path, k: int, z) -> bool:
    shard = out / "shards" / shard_name(k)
    return shard.is_file() and shard.stat().st_size == int(z["shard_bytes"])


def record_ok(work: Path, out: Path, k: int) -> bool:
    """Whether record k is readable and its shard is there with the recorded size (reads the
    record's size member only, not its arrays)."""
    try:
        with np.load(work / f"rec-{k:06d}.npz", allow_pickle=False) as z:
            return _shard_matches(out, k, z)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False


def load_record(work: Path, out: Path, k: int) -> dict | None:
    """Record k, or None when it is missing, unreadable, or its shard is missing or of another size."""
    try:
        with np.load(work / f"rec-{k:06d}.npz", allow_pickle=False) as z:
            r = {key: z[key] for key in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    return r if _shard_matches(out, k, r) else None


def record_clips(work: Path, k: int) -> int:
    """Clips in record k (reads that one member only)."""
    p = work / f"rec-{k:06d}.npz"
    try:
        with np.load(p, allow_pickle=False) as z:
            return len(z["input"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{p}: shard record missing or broken ({type(e).__name__}); re-run the build to rewrite "
                        f"it") from None


def load_records(work: Path, out: Path) -> list[dict]:
    """Consecutive valid records from 0; the first broken one (or missing shard) ends the list."""
    recs = []
    while (r := load_record(work, out, len(recs))) is not None:
        recs.append(r)
    k = len(recs)
    # later records are not trusted once one is missing: their shards are rewritten
    for p in work.glob("rec-*.npz"):
        if int(p.stem.split("-")[1]) >= k:
            p.unlink()
    return recs
