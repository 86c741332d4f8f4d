"""Per-point statistics, the static filter and the score-binned class histograms.

Hot loops are numba kernels (``cache=True`` so a second process starts fast); each has a
plain numpy reference in ``tests/test_stats.py``. Kernels take a clip's positions
``(T, N, 2)`` (reference px) and visibility ``(T, N)``; a step's velocity is
``p[t+1] - p[t]`` (float32) and it is valid when the point is visible at both ends. Labels
follow the build's rule (``labels.LABEL_RULES``, the integer ``labels.rule_code``).
Definitions follow DESIGN.md: speed = ``||v_norm||``; per-point ``mean``/``p95``/``max``
over valid steps (0 when a point has none); a point is dynamic when ``score >= threshold``; when fewer than ``min_keep``
points of a clip are dynamic, the ``min_keep`` highest-scoring points among those with a
valid step are kept instead (ties: lower point index first).
"""
from __future__ import annotations

import math
from collections import namedtuple

import numba
import numpy as np

from motion_data.common.label_kernels import _clip_labels, label_spec  # numba label functions (labels.py: reference)
from motion_data.common.labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, DEFAULT_W
from motion_data.common.static_filter import METRICS, StaticFilter

# Score histograms: uniform bins of HIST_BIN_WIDTH over [0, HIST_TOP) plus one overflow
# bin. Thresholds that are multiples of the bin width are answered exactly.
HIST_BIN_WIDTH = 0.0025
HIST_TOP = 0.5
HIST_NBINS = int(round(HIST_TOP / HIST_BIN_WIDTH)) + 1
# Lower bin edges as the float32 values keep_mask compares against: binning by these (not by
# floor(score / width)) makes "bin >= threshold_bin(t)" identical to "score >= float32(t)" at
# every edge, also for scores a few ulps either side of it.
HIST_EDGES = (np.arange(HIST_NBINS) * HIST_BIN_WIDTH).astype(np.float32)
# Ranks (within a clip) recorded for the min_keep correction; min_keep above this needs
# an exact pass.
HIST_RANK_MAX = 32


# One clip's work arrays (the kernels' scratch, reused clip after clip): quantised positions
# ``q`` (T, 2N), per-step speeds ``sp`` and labels ``labs`` (S, N), per point the valid-step
# count ``kk``, speed sum ``ssum``, centre count ``cc``, two largest speeds ``top1``/``top2``,
# and ``buf`` (S,) for the sort of a long clip.
ClipScratch = namedtuple("ClipScratch", "q sp labs kk ssum cc top1 top2 buf")
# The per-point outputs ``(C, N)``: the METRICS scores, then the counts.
PointStats = namedtuple("PointStats", "mean p95 max center_count valid_count")
# The score histograms: lower bin edges, bin width, ranks recorded, and the counts
# ``points`` / ``topk`` they fill (``shard_stats`` says what each holds).
Hists = namedtuple("Hists", "edges width rank_max points topk")


@numba.njit(cache=True)
def _clip_scratch(T, N):
    S = T - 1
    return ClipScratch(np.empty((T, 2 * N), np.int32), np.empty((S, N), np.float32), np.empty((S, N), np.int32),
                       np.empty(N, np.int32), np.empty(N, np.float64), np.empty(N, np.int32),
                       np.empty(N, np.float64), np.empty(N, np.float64), np.empty(S, np.float64))


@numba.njit(cache=True, inline="always")
def _clip_pass(pos, vis, ci, spec, w):
    """Speed ``sp`` and label ``labs`` ``(S, N)`` of every step of clip ``ci``, and per point
    its valid-step count, speed sum (in step order), centre count, largest and second
    largest speed (into the ``ClipScratch`` ``w``). Steps outer, points inner, branch-free,
    so the point loop vectorises."""
    q, sp, labs, kk, ssum, cc, top1, top2 = w.q, w.sp, w.labs, w.kk, w.ssum, w.cc, w.top1, w.top2
    S, N = sp.shape
    W = spec.W
    hf, one = np.float32((W - 1) / 2.0), np.float32(1.0)
    centre = (W // 2) * W + W // 2
    _clip_labels(pos, ci, spec, q, labs)
    for n in range(N):
        kk[n] = 0
        ssum[n] = 0.0
        cc[n] = 0
        top1[n] = -1.0
        top2[n] = -1.0
    for t in range(S):
        # one step, in loops simple enough to vectorise over the points
        pa, pb, st = pos[ci, t].reshape(-1), pos[ci, t + 1].reshape(-1), sp[t]
        for n in range(N):
            vx = pb[2 * n] - pa[2 * n]  # float32, as numpy's diff of the stored positions
            vy = pb[2 * n + 1] - pa[2 * n + 1]
            nx = min(max(vx / hf, -one), one)  # float32 throughout: twice the lanes of float64
            ny = min(max(vy / hf, -one), one)
            st[n] = math.sqrt(nx * nx + ny * ny)
        va, vb, lt = vis[ci, t], vis[ci, t + 1], labs[t]
        for n in range(N):
            ok = va[n] & vb[n]
            kk[n] += ok
            cc[n] += ok & (lt[n] == centre)
        for n in range(N):
            ok = va[n] & vb[n]
            v = st[n]
            ssum[n] += v * ok
            # (top1, top2) <- the two largest of (top1, top2, v); an invalid step counts as -1
            vv = v if ok else -1.0
            t1 = top1[n]
            top2[n] = max(top2[n], min(t1, vv))
            top1[n] = max(t1, vv)


@numba.njit(cache=True, inline="always")
def _store_clip(vis, ci, w, out):
    """Clip ``ci``'s row of the ``PointStats`` ``out`` from ``_clip_pass``'s sums in ``w``."""
    sp, kk, ssum, cc, top1, top2, buf = w.sp, w.kk, w.ssum, w.cc, w.top1, w.top2, w.buf
    mean, p95, mx, center_count, valid_count = out
    S, N = sp.shape
    for n in range(N):
        k = kk[n]
        valid_count[ci, n] = k
        center_count[ci, n] = cc[n]
        if k == 0:
            mean[ci, n] = 0.0
            p95[ci, n] = 0.0
            mx[ci, n] = 0.0
            continue
        mean[ci, n] = ssum[n] / k
        mx[ci, n] = top1[n]
        pos = 0.95 * (k - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, k - 1)
        frac = pos - lo
        # up to 21 valid steps the p95 lies between the two largest speeds, so no
        # sort is needed (S = 15 in practice); longer clips sort
        if lo == k - 1:
            p95[ci, n] = top1[n]
        elif lo == k - 2:
            p95[ci, n] = top2[n] + frac * (top1[n] - top2[n])
        else:
            m = 0
            for t in range(S):
                if vis[ci, t, n] and vis[ci, t + 1, n]:
                    buf[m] = sp[t, n]
                    m += 1
            srt = np.sort(buf[:k])
            p95[ci, n] = srt[lo] + frac * (srt[hi] - srt[lo])


@numba.njit(cache=True, inline="always")
def _clip_stats(pos, vis, ci, spec, w, out):
    _clip_pass(pos, vis, ci, spec, w)
    _store_clip(vis, ci, w, out)


def _clips_and_outputs(pos, vis, who: str):
    """Contiguous float32 positions and bool visibility checked as (C,T,N,2)/(C,T,N), and
    the per-point output arrays."""
    pos = np.ascontiguousarray(pos, dtype=np.float32)
    vis = np.ascontiguousarray(vis, dtype=np.bool_)
    if pos.ndim != 4 or pos.shape[-1] != 2 or vis.shape != pos.shape[:3]:
        raise ValueError(f"{who}: expected pos (C,T,N,2) and vis (C,T,N), got {pos.shape} and {vis.shape}")
    if not 2 <= pos.shape[1] <= 256:  # counts are uint8
        raise ValueError(f"{who}: need 2 to 256 frames per clip, got {pos.shape[1]}")
    C, N = vis.shape[0], vis.shape[2]
    out = {m: np.empty((C, N), np.float32) for m in METRICS}
    out["center_count"] = np.empty((C, N), np.uint8)
    out["valid_count"] = np.empty((C, N), np.uint8)
    return pos, vis, out


@numba.njit(cache=True, inline="always")
def _clip_order(scores_row, vc_row):
    """Indices of points with a valid step, by score descending, ties lower index first."""
    N = scores_row.shape[0]
    idx = np.empty(N, np.int64)
    m = 0
    for n in range(N):
        if vc_row[n] > 0:
            idx[m] = n
            m += 1
    idx = idx[:m]
    # stable sort on -score keeps lower index first among ties
    order = np.argsort(-scores_row[idx].astype(np.float64), kind="mergesort")
    return idx[order]


@numba.njit(cache=True, parallel=True)
def _keep_mask_kernel(scores, valid_count, threshold, min_keep, out):
    C, N = scores.shape
    for ci in numba.prange(C):
        nd = 0
        for n in range(N):
            d = scores[ci, n] >= threshold
            out[ci, n] = d
            nd += d
        if nd < min_keep:
            for n in range(N):
                out[ci, n] = False
            order = _clip_order(scores[ci], valid_count[ci])
            for j in range(min(min_keep, order.shape[0])):
                out[ci, order[j]] = True


def keep_mask(scores: np.ndarray, valid_count: np.ndarray, threshold: float, min_keep: int) -> np.ndarray:
    """``(C, N)`` bool: the static filter's kept points (DESIGN.md)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    valid_count = np.ascontiguousarray(valid_count)
    out = np.empty(scores.shape, np.bool_)
    _keep_mask_kernel(scores, valid_count, np.float32(threshold), int(min_keep), out)
    return out


@numba.njit(cache=True, parallel=True)
def _kept_count_kernel(scores, valid_count, threshold, min_keep, out):
    C, N = scores.shape
    for ci in numba.prange(C):
        nd = 0
        nv = 0
        for n in range(N):
            if scores[ci, n] >= threshold:
                nd += 1
            if valid_count[ci, n] > 0:
                nv += 1
        out[ci] = nd if nd >= min_keep else min(min_keep, nv)


def kept_counts(scores: np.ndarray, valid_count: np.ndarray, threshold: float, min_keep: int) -> np.ndarray:
    """``(C,)`` int32 number of kept points per clip, without forming the mask."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    valid_count = np.ascontiguousarray(valid_count)
    out = np.empty(scores.shape[0], np.int32)
    _kept_count_kernel(scores, valid_count, np.float32(threshold), int(min_keep), out)
    return out


def dynamic_ratio(scores, valid_count, flt: StaticFilter) -> np.ndarray:
    """``(C,)`` float32 kept share per clip under ``flt`` (1 when the filter is off)."""
    if not flt.enable:
        return np.ones(scores.shape[0], np.float32)
    return (kept_counts(scores, valid_count, flt.threshold, flt.min_keep) / scores.shape[1]).astype(np.float32)


def score_bin(scores: np.ndarray) -> np.ndarray:
    """Histogram bin of each score: the last float32 edge it reaches (last bin = overflow)."""
    s = np.asarray(scores, dtype=np.float32)
    out = np.empty(s.size, np.int64)
    _score_bin_kernel(np.ascontiguousarray(s).reshape(-1), HIST_EDGES, HIST_BIN_WIDTH, out)
    return out.reshape(s.shape)


def threshold_bin(threshold: float) -> int:
    """First bin counted as dynamic at ``threshold`` (exact for multiples of the width)."""
    return int(min(max(math.floor(threshold / HIST_BIN_WIDTH + 1e-6), 0), HIST_NBINS - 1)) if threshold > 0 else 0


@numba.njit(cache=True, inline="always")
def _edge_bin(s, edges, bw):
    nbins = edges.shape[0]
    b = min(max(int(math.floor(s / bw)), 0), nbins - 1)
    while b + 1 < nbins and s >= edges[b + 1]:
        b += 1
    while b > 0 and s < edges[b]:
        b -= 1
    return b


@numba.njit(cache=True, parallel=True)
def _score_bin_kernel(s, edges, bw, out):
    for i in numba.prange(s.shape[0]):
        out[i] = _edge_bin(s[i], edges, bw)


@numba.njit(cache=True, inline="always")
def _top_ranks(scores_row, vc_row, rank_max, top, rank):
    """``rank[n]`` = n's place (< rank_max) in ``_clip_order`` (score descending, ties lower
    index first, points with a valid step only), else -1; a partial insertion sort, since
    only the first ``rank_max`` places are recorded."""
    N = scores_row.shape[0]
    cnt = 0
    for n in range(N):
        rank[n] = -1
        if vc_row[n] == 0:
            continue
        s = scores_row[n]
        if cnt == rank_max and not s > scores_row[top[rank_max - 1]]:
            continue
        j = cnt if cnt < rank_max else rank_max - 1
        while j > 0 and scores_row[top[j - 1]] < s:
            top[j] = top[j - 1]
            j -= 1
        top[j] = n
        if cnt < rank_max:
            cnt += 1
    for j in range(cnt):
        rank[top[j]] = j


@numba.njit(cache=True)
def _shard_kernel(pos, vis, spec, out, hists):
    """``shard_stats``' pass: each clip's ``PointStats`` row into ``out`` and its points
    into the ``Hists`` counts."""
    C, T, N = vis.shape
    S = T - 1
    w = _clip_scratch(T, N)
    W = spec.W
    K = W * W
    centre = (W // 2) * W + W // 2
    edges, bw, rank_max, points, topk = hists
    labs, cc = w.labs, w.cc
    mean, p95, mx, valid_count = out.mean, out.p95, out.max, out.valid_count
    top = np.empty(rank_max, np.int64)
    rank = np.empty((3, N), np.int64)
    bins = np.empty((3, N), np.int64)
    for ci in range(C):
        _clip_stats(pos, vis, ci, spec, w, out)
        # METRICS order: mean, p95, max; the stored float32 scores are what is binned
        for m in range(3):
            sc = mean[ci] if m == 0 else (p95[ci] if m == 1 else mx[ci])
            _top_ranks(sc, valid_count[ci], rank_max, top, rank[m])
            for n in range(N):
                bins[m, n] = _edge_bin(sc[n], edges, bw)
        # point counts and centre labels per point (most labels are the centre: counted
        # at once), then the other labels step by step
        for m in range(3):
            for n in range(N):
                b = bins[m, n]
                points[m, b, K] += 1
                points[m, b, centre] += cc[n]
                r = rank[m, n]
                if r >= 0:
                    topk[m, b, r, K] += 1
                    topk[m, b, r, centre] += cc[n]
        for t in range(S):
            for n in range(N):
                lab = labs[t, n]
                if vis[ci, t, n] and vis[ci, t + 1, n] and lab != centre:
                    for m in range(3):
                        points[m, bins[m, n], lab] += 1
                        r = rank[m, n]
                        if r >= 0:
                            topk[m, bins[m, n], r, lab] += 1


def shard_stats(pos: np.ndarray, vis: np.ndarray, W: int = DEFAULT_W, ref_size: int = DEFAULT_REF_SIZE,
                rule: str = DEFAULT_LABEL_RULE):
    """Per-point statistics and score-binned class histograms of every metric, in one pass (the
    build's per-shard work; labels are computed once per step, each clip's point ranks by a
    partial sort).

    pos ``(C, T, N, 2)`` positions in reference pixels, vis ``(C, T, N)`` bool; ``rule`` makes
    the labels. Returns ``(stats, hists)``:
    - ``stats``: ``mean``, ``p95``, ``max`` ``(C, N)`` float32 and ``center_count``,
      ``valid_count`` ``(C, N)`` uint8 (T <= 256);
    - ``hists[metric] = (points, topk)``: ``points`` ``(HIST_NBINS, W*W+1)`` int64, per score
      bin the valid-step label counts of all points in that bin (last column: the number of
      points); ``topk`` ``(HIST_NBINS, HIST_RANK_MAX, W*W+1)`` the same restricted to the point
      of each rank (by score within its clip, among points with a valid step). The kept labels
      at threshold t and min_keep k are then ``sum(points[b >= bt]) + sum(topk[b < bt, :k])``:
      a clip with fewer than k dynamic points keeps its top k, whose scores below t are
      exactly the second term (``filtered_counts_from_hist``).
    Each equals its numpy reference in tests/test_stats.py."""
    pos, vis, st = _clips_and_outputs(pos, vis, "shard_stats")
    points = np.zeros((len(METRICS), HIST_NBINS, W * W + 1), np.int64)
    topk = np.zeros((len(METRICS), HIST_NBINS, HIST_RANK_MAX, W * W + 1), np.int64)
    _shard_kernel(pos, vis, label_spec(W, ref_size, rule), PointStats(*(st[k] for k in PointStats._fields)),
                  Hists(HIST_EDGES, HIST_BIN_WIDTH, HIST_RANK_MAX, points, topk))
    return st, {m: (points[i], topk[i]) for i, m in enumerate(METRICS)}


def filtered_counts_from_hist(points: np.ndarray, topk: np.ndarray, threshold: float, min_keep: int):
    """(class_counts ``(W*W,)``, kept point count) at a threshold, from the histograms."""
    if min_keep > topk.shape[1]:
        raise ValueError(f"min_keep={min_keep} exceeds the {topk.shape[1]} ranks stored in the histograms; use --exact")
    bt = threshold_bin(threshold)
    tot = points[bt:].sum(axis=0) + topk[:bt, :min_keep].sum(axis=(0, 1))
    return tot[:-1], int(tot[-1])
